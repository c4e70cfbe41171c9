"""`python -m sft_cloud.healthcheck` (the Docker HEALTHCHECK): 0 when SERVING, 1 otherwise."""

from __future__ import annotations

import socket

import pytest

from sft_cloud import healthcheck
from sft_cloud.daemon.server import ServeConfig, create_server
from sft_cloud.sessions.registry import SessionRegistry


def test_plaintext_daemon_is_healthy(live_server, capsys):
    address, _ = live_server
    assert healthcheck.main(["--address", address, "--insecure"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"


def test_nothing_listening_is_unhealthy(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    assert healthcheck.main(["--address", f"127.0.0.1:{port}", "--insecure", "--timeout", "2"]) == 1
    assert "unhealthy: UNAVAILABLE" in capsys.readouterr().err


def test_tls_daemon_with_tokens_is_healthy_from_the_environment(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    from sft_common.security.certs import write_dev_certs

    pki = write_dev_certs(str(tmp_path / "certs"))
    cfg = ServeConfig(
        host="127.0.0.1",
        port=0,
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        auth_token_file=pki["tokens"],
    )
    server, port, _ = create_server(cfg, SessionRegistry(device="cpu", max_sessions=2))
    try:
        # The compose file sets these; the certificate names "cloud", so check it for that name.
        monkeypatch.setenv("SFT_HEALTH_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setenv("SFT_HEALTH_TLS_CA", pki["ca"])
        monkeypatch.setenv("SFT_HEALTH_SERVER_NAME", "cloud")
        assert healthcheck.main([]) == 0
        assert healthcheck.main(["--tls-ca", ""]) == 2  # no CA and not --insecure: a usage error
    finally:
        server.stop(0).wait()
