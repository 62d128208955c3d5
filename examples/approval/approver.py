#!/usr/bin/env python3
"""A small approver for Portcullis approval challenges (examples/approval/README.md).

    approver.py keygen --key approver_key.pem --jwks approval-jwks.json
    approver.py sign --key approver_key.pem --aud SPIFFE_ID --iss ISSUER --sub APPROVER \
        [--lifetime 300] < challenge.json

`sign` reads the 428 answer (or just its `challenge` object) on stdin, shows what is being
approved on stderr, and prints a grant for `x-portcullis-approval`: an ES256 JWT with
`aud` = the sidecar's SPIFFE ID, `digest` = the challenge digest, a fresh `jti`, and
`exp - iat` = --lifetime (at most the sidecar's approval.max_lifetime). A real approver asks a
person before signing; this one signs what it is given.

Needs the `cryptography` package.
"""

import argparse
import base64
import json
import sys
import time
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def keygen(args):
    key = ec.generate_private_key(ec.SECP256R1())
    with open(args.key, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ES256",
        "use": "sig",
        "kid": args.kid,
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }
    with open(args.jwks, "w") as out:
        json.dump({"keys": [jwk]}, out, indent=2)
        out.write("\n")


def sign(args):
    answer = json.load(sys.stdin)
    challenge = answer.get("error", {}).get("challenge", answer)
    digest = challenge["digest"]
    if not digest.startswith("sha256:"):
        sys.exit("not a Portcullis challenge digest: " + digest)
    print(
        f"approving {challenge.get('action')} on {challenge.get('resource')} ({digest})",
        file=sys.stderr,
    )
    with open(args.key, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    now = int(time.time())
    header = {"alg": "ES256", "typ": "JWT", "kid": args.kid}
    claims = {
        "iss": args.iss,
        "sub": args.sub,
        "aud": args.aud,
        "iat": now,
        "nbf": now,
        "exp": now + args.lifetime,
        "jti": str(uuid.uuid4()),
        "digest": digest,
    }
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    # RFC 7518 §3.4: R and S as 32-byte big-endian integers, concatenated.
    print(signing_input + "." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen")
    k.add_argument("--key", required=True)
    k.add_argument("--jwks", required=True)
    k.add_argument("--kid", default="approver-1")
    s = sub.add_parser("sign")
    s.add_argument("--key", required=True)
    s.add_argument("--kid", default="approver-1")
    s.add_argument("--aud", required=True, help="the sidecar's SPIFFE ID")
    s.add_argument("--iss", required=True)
    s.add_argument("--sub", required=True, help="who approves")
    s.add_argument("--lifetime", type=int, default=300)
    args = parser.parse_args()
    {"keygen": keygen, "sign": sign}[args.command](args)


if __name__ == "__main__":
    main()
