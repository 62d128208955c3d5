"""Drives the proxy with the official OpenAI Python client over mTLS: a streamed chat
completion of an allowed model, and a denied model. Usage: openai_client.py BASE_URL CA_PEM
CERT_PEM KEY_PEM. Prints one JSON object with the outcomes."""

import json
import ssl
import sys

import httpx
import openai

base_url, ca, cert, key = sys.argv[1:5]
context = ssl.create_default_context(cafile=ca)
# The proxy is identified by its SPIFFE ID (a URI SAN), not by a host name.
context.check_hostname = False
context.load_cert_chain(cert, key)
client = openai.OpenAI(
    base_url=base_url,
    # The agent holds no model API key: the sidecar authorizes by workload identity.
    api_key="unused",
    http_client=httpx.Client(verify=context),
    max_retries=0,
)
report = {}
stream = client.chat.completions.create(
    model="cheap-model",
    messages=[{"role": "user", "content": "one two three"}],
    stream=True,
    max_tokens=100,
)
report["chunks"] = [chunk.choices[0].delta.content for chunk in stream if chunk.choices]
try:
    client.chat.completions.create(
        model="expensive-model", messages=[{"role": "user", "content": "hi"}]
    )
    report["denied"] = None
except openai.PermissionDeniedError as error:
    report["denied"] = {"status": error.status_code, "code": error.code, "message": error.message}
print(json.dumps(report))
