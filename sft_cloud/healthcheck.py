"""`python -m sft_cloud.healthcheck`: ask a daemon's gRPC health service; exit 0 when SERVING.

What the Docker HEALTHCHECK runs. Flags fall back to environment variables (``SFT_HEALTH_*``),
so one image line serves plaintext, TLS and mutual-TLS deployments. Health calls need no bearer
token (the daemon exempts them).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _env(name: str) -> Optional[str]:
    return os.environ.get(f"SFT_HEALTH_{name}") or None


def _read(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sft_cloud.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--address", default=_env("ADDRESS") or "localhost:50051", help="HOST:PORT of the daemon")
    p.add_argument("--service", default="sft.v1.SplitTrainer", help="service to ask about ('' = the server)")
    p.add_argument("--insecure", action="store_true", default=_env("INSECURE") == "1", help="plaintext")
    p.add_argument("--tls-ca", default=_env("TLS_CA"), help="PEM CA the daemon's certificate chains to")
    p.add_argument("--tls-cert", default=_env("TLS_CERT"), help="client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=_env("TLS_KEY"), help="client key (mutual TLS)")
    p.add_argument("--server-name", default=_env("SERVER_NAME"), help="name to check the certificate for")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    return p


def check(args: argparse.Namespace) -> str:
    """The status name the daemon reports (``SERVING`` when healthy)."""
    options = []
    if args.insecure:
        channel = grpc.insecure_channel(args.address)
    else:
        if not args.tls_ca:
            raise ValueError("give --tls-ca (or SFT_HEALTH_TLS_CA), or --insecure for a plaintext daemon")
        creds = grpc.ssl_channel_credentials(_read(args.tls_ca), _read(args.tls_key), _read(args.tls_cert))
        if args.server_name:
            options.append(("grpc.ssl_target_name_override", args.server_name))
        channel = grpc.secure_channel(args.address, creds, options=options)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = check(args)
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"healthcheck: error: {exc}", file=sys.stderr)
        return 2
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
