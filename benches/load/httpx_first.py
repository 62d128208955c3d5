"""First request of a fresh httpx client (what the OpenAI and MCP Python SDKs use), the TLS
handshake included, for each path of the first-byte benchmark in turn, round by round.

    python httpx_first.py DIR NAME=URL...   (DIR: the fixtures: ca.pem, agent.pem, agent-key.pem)

Prints one line per path: `NAME first_request httpx p50_ms=... p99_ms=...`.
"""

import ssl
import sys
import time

import httpx

ROUNDS = 200


def main() -> None:
    work, targets = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
    # The agent's SVID; the server's is a SPIFFE ID (a URI SAN, no DNS name), so the chain is
    # verified against the CA and the name check is off, as SPIFFE clients do.
    tls = ssl.create_default_context(cafile=f"{work}/ca.pem")
    tls.check_hostname = False
    tls.load_cert_chain(f"{work}/agent.pem", f"{work}/agent-key.pem")
    samples = {name: [] for name, _ in targets}
    for _ in range(ROUNDS):
        for name, url in targets:
            started = time.perf_counter()
            with httpx.Client(verify=tls) as client:
                response = client.get(f"{url}/bench/1k")
                response.read()
            samples[name].append(time.perf_counter() - started)
            if response.status_code != 200:
                sys.exit(f"{name}: status {response.status_code}")
    for name, values in samples.items():
        values.sort()

        def at(q: float) -> float:
            return values[round((len(values) - 1) * q)] * 1e3

        print(f"{name} first_request httpx p50_ms={at(0.5):.3f} p99_ms={at(0.99):.3f}")


if __name__ == "__main__":
    main()
