"""Development TLS material: a CA, server and client certificates, bearer tokens.

``python -m sft_common.security.certs --out certs/dev`` (``make certs``) writes what a local or compose
run needs; the tests use the same functions to build good and bad certificates on the fly.
Needs the ``cryptography`` package (a dev dependency: the daemon and the edge only read PEM
files, they never create them). Keys are EC P-256: fast to generate, accepted by gRPC.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

# Where `make certs` writes, and the file names the compose setup mounts.
DEV_DIR = os.path.join("certs", "dev")
DEV_SANS = ("localhost", "127.0.0.1", "cloud")


@dataclass
class Issued:
    """One certificate with its private key, as objects and as PEM bytes."""

    cert: Any  # cryptography.x509.Certificate
    key: Any  # the private key object
    cert_pem: bytes
    key_pem: bytes


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SFT dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_ca(common_name: str = "SFT dev CA", days: int = 365) -> Issued:
    """A self-signed certificate authority."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued,
    common_name: str,
    sans: Sequence[str] = (),
    client: bool = False,
    days: int = 365,
    not_before: Optional[dt.datetime] = None,
    not_after: Optional[dt.datetime] = None,
) -> Issued:
    """A leaf certificate signed by ``ca``: a server one (``sans``: DNS names or IP addresses) or,
    with ``client=True``, a client one. ``not_before``/``not_after`` override the validity
    (the tests make expired certificates with them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or (_now() - dt.timedelta(minutes=5))
    end = not_after or (start + dt.timedelta(days=days))
    names: List[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    return Issued(cert, key, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def new_token() -> str:
    """A bearer token: 256 random bits, URL-safe (valid as gRPC metadata)."""
    return secrets.token_urlsafe(32)


def _write(path: str, data: bytes, private: bool) -> None:
    # Private keys and tokens are created 0600 from the start, never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_dev_certs(
    out_dir: str = DEV_DIR, sans: Sequence[str] = DEV_SANS, days: int = 365
) -> Dict[str, str]:
    """Write a CA, a server certificate for ``sans``, a client certificate, a cloud token file
    and the matching edge token file into ``out_dir``; return the paths by role."""
    os.makedirs(out_dir, exist_ok=True)
    ca = make_ca(days=days)
    server = issue(ca, "sft-cloud", sans=sans, days=days)
    client = issue(ca, "sft-edge-dev", client=True, days=days)
    token = new_token()
    files = {
        "ca": ("ca.pem", ca.cert_pem, False),
        "ca_key": ("ca.key", ca.key_pem, True),
        "server_cert": ("server.pem", server.cert_pem, False),
        "server_key": ("server.key", server.key_pem, True),
        "client_cert": ("client.pem", client.cert_pem, False),
        "client_key": ("client.key", client.key_pem, True),
        "tokens": (
            "tokens.txt",
            f"# sft-cloud --auth-token-file: one token per device\n{token}\n".encode(),
            True,
        ),
        "edge_token": ("edge-token.txt", f"{token}\n".encode(), True),
    }
    paths = {}
    for role, (name, data, private) in files.items():
        path = os.path.join(out_dir, name)
        _write(path, data, private)
        paths[role] = path
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sft_common.security.certs",
        description="Write development TLS certificates and tokens.",
    )
    parser.add_argument("--out", default=DEV_DIR, help=f"output folder (default {DEV_DIR})")
    parser.add_argument(
        "--san", action="append", help=f"server name or IP (repeatable; default {', '.join(DEV_SANS)})"
    )
    parser.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    parser.add_argument("--force", action="store_true", help="replace the certificates already there")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "ca.pem")) and not args.force:
        # A new CA would invalidate every certificate and token already handed out.
        print(f"{args.out} already holds development certificates; --force replaces them")
        return 0
    paths = write_dev_certs(args.out, tuple(args.san or DEV_SANS), args.days)
    for role, path in paths.items():
        print(f"{role:12s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
