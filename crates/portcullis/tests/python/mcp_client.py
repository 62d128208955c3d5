"""Drives the proxy with the official MCP Python SDK client over mTLS: initialize, list
tools, call an allowed tool, a tool denied by name and one denied by argument value.
Usage: mcp_client.py URL CA_PEM CERT_PEM KEY_PEM. Prints one JSON object with the outcomes."""

import asyncio
import json
import ssl
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client


def tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    # The proxy is identified by its SPIFFE ID (a URI SAN), not by a host name.
    context.check_hostname = False
    context.load_cert_chain(cert, key)
    return context


async def outcome(call) -> dict:
    try:
        result = await call
    except Exception as error:  # the SDK raises its error type for JSON-RPC errors
        return {"error": str(error), "code": getattr(getattr(error, "error", None), "code", None)}
    if getattr(result, "is_error", False) or getattr(result, "isError", False):
        return {"tool_error": str(result.content)}
    return {"ok": [getattr(c, "text", str(c)) for c in result.content]}


async def main(url: str, ca: str, cert: str, key: str) -> None:
    client = httpx2.AsyncClient(verify=tls_context(ca, cert, key), timeout=30)
    report = {}
    async with streamable_http_client(url, http_client=client) as (read, write):
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            report["server"] = init.server_info.name if hasattr(init, "server_info") else str(init)
            tools = await session.list_tools()
            report["tools"] = sorted(tool.name for tool in tools.tools)
            report["search"] = await outcome(session.call_tool("search_tickets", {"query": "printer"}))
            report["delete"] = await outcome(session.call_tool("delete_everything", {}))
            report["small_refund"] = await outcome(session.call_tool("refund", {"amount": 50}))
            report["large_refund"] = await outcome(session.call_tool("refund", {"amount": 150}))
    print(json.dumps(report))


asyncio.run(main(*sys.argv[1:5]))
