"""Where the daemon listens: a plaintext (--insecure) daemon binds the loopback unless --host says
otherwise; with TLS, or with an explicit --host, the interface is what was asked."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sft_cloud.cli import build_parser
from sft_cloud.daemon.config import ServeConfig
from sft_cloud.daemon.launch import start_daemon, stop_daemon


def _config(argv):
    """The ServeConfig `sft-cloud serve <argv>` builds (the CLI's own parser and fields)."""
    args = build_parser().parse_args(["serve", *argv])
    return ServeConfig(**{k: v for k, v in vars(args).items() if k in ServeConfig.__dataclass_fields__})


@pytest.mark.parametrize(
    "argv, host",
    [
        (["--insecure"], "127.0.0.1"),
        (["--insecure", "--host", "0.0.0.0"], "0.0.0.0"),
        (["--insecure", "--host", "::"], "::"),
        (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "0.0.0.0"),
        (["--tls-cert", "c.pem", "--tls-key", "k.pem", "--host", "10.0.0.5"], "10.0.0.5"),
    ],
)
def test_the_resolved_host(argv, host):
    assert _config(argv).listen_host() == host


def _serving(address: str) -> bool:
    channel = grpc.insecure_channel(address)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def _other_address() -> str | None:
    """An address of this machine that is not the loopback (None: it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, the route picks the interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_an_insecure_daemon_without_host_listens_on_the_loopback_only():
    proc, port = start_daemon(("--insecure", "--device", "cpu"), host=None)
    try:
        assert _serving(f"127.0.0.1:{port}")
        other = _other_address()
        if other is not None:  # the same port on another interface of this machine: nothing there
            assert not _serving(f"{other}:{port}")
    finally:
        output = stop_daemon(proc)
    assert "stopped" in output
