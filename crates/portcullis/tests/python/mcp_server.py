"""An MCP server built with the official Python SDK (MCPServer, Streamable HTTP), for the
proxy's integration tests. Usage: mcp_server.py PORT CALL_LOG. Every tool invocation appends
one JSON line {"tool", "arguments"} to CALL_LOG, so a test can prove a denied call never
reached the server."""

import json
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

port = int(sys.argv[1])
call_log = sys.argv[2]
server = MCPServer("triage-tools")


def record(tool: str, arguments: dict) -> None:
    with open(call_log, "a", encoding="utf-8") as log:
        log.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")


@server.tool()
def search_tickets(query: str) -> str:
    """Search support tickets."""
    record("search_tickets", {"query": query})
    return f"3 tickets match {query!r}"


@server.tool()
def refund(amount: int, ticket_id: str = "") -> str:
    """Refund a customer."""
    record("refund", {"amount": amount, "ticket_id": ticket_id})
    return f"refunded {amount}"


@server.tool()
def delete_everything() -> str:
    """Never allowed through the proxy."""
    record("delete_everything", {})
    return "deleted"


server.run(
    "streamable-http",
    host="127.0.0.1",
    port=port,
    # The proxy forwards the caller's Host (the proxy's address); DNS-rebinding protection
    # is for browsers reaching a local server and does not apply behind an mTLS sidecar.
    transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
)
