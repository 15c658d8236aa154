"""Checks a platform request's signature the way a superapp server written in Python would, with
the `cryptography` package alone (no code shared with the platform): docs/superapp-server.md.

    python3 verify_superapp_signature.py PUBLIC_KEY_PEM_FILE PATH BODY_FILE X_TIMESTAMP X_SIGNATURE

Prints "valid" and exits 0 when X-SIGNATURE is the base64 SHA256withRSA (PKCS#1 v1.5) signature
of "POST:<PATH>:<lowercase hex sha256 of the body>:<X_TIMESTAMP>" by the key; prints "invalid"
and exits 1 otherwise. tests/superapp.rs runs it on requests the platform really sent.
"""

import base64
import hashlib
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding


def main() -> int:
    key_file, path, body_file, timestamp, signature = sys.argv[1:6]
    with open(key_file, "rb") as f:
        public_key = serialization.load_pem_public_key(f.read())
    with open(body_file, "rb") as f:
        body = f.read()
    message = f"POST:{path}:{hashlib.sha256(body).hexdigest()}:{timestamp}".encode()
    try:
        public_key.verify(base64.b64decode(signature), message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        print("invalid")
        return 1
    print("valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
