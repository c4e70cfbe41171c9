"""TLS, mutual TLS, bearer tokens and session ownership, with real certificates made here.

Every refusal is checked for its gRPC status code and for a message that says why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import session_config

from sft_cloud.daemon import auth
from sft_cloud.daemon.server import ServeConfig, create_server
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.security import certs
from sft_common.security.tokens import TokenError, bearer_token, read_token_file
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_edge.link import credentials
from sft_edge.link.transport import CloudError, GrpcTransport, open_channel

ROOT = Path(__file__).resolve().parents[1]
TOKEN_A = "device-a-" + "a" * 32
TOKEN_B = "device-b-" + "b" * 32


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Paths of a CA, another CA, server/client certificates (good, expired, foreign) and tokens."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = certs.make_ca("test CA"), certs.make_ca("another CA")
    now = dt.datetime.now(dt.timezone.utc)
    issued = {
        "ca": ca,
        "other_ca": other,
        "server": certs.issue(ca, "sft-cloud", sans=["localhost", "127.0.0.1"]),
        "expired": certs.issue(
            ca,
            "sft-cloud",
            sans=["127.0.0.1"],
            not_before=now - dt.timedelta(days=3),
            not_after=now - dt.timedelta(days=1),
        ),  # fmt: skip
        "wrong_host": certs.issue(ca, "sft-cloud", sans=["example.com"]),
        "client": certs.issue(ca, "edge-1", client=True),
        "client2": certs.issue(ca, "edge-2", client=True),
        "foreign_client": certs.issue(other, "intruder", client=True),
    }
    paths = {}
    for name, pair in issued.items():
        (d / f"{name}.pem").write_bytes(pair.cert_pem)
        (d / f"{name}.key").write_bytes(pair.key_pem)
        paths[name] = str(d / f"{name}.pem")
        paths[name + "_key"] = str(d / f"{name}.key")
    (d / "tokens.txt").write_text(f"# one per device\n{TOKEN_A}\n\n{TOKEN_B}\n")
    (d / "a.txt").write_text(TOKEN_A + "\n")
    (d / "b.txt").write_text(TOKEN_B + "\n")
    (d / "wrong.txt").write_text("not-a-known-token-" + "x" * 20 + "\n")
    for name in ("tokens", "a", "b", "wrong"):
        paths[name] = str(d / f"{name}.txt")
    return paths


@contextlib.contextmanager
def daemon(**kw):
    """A real gRPC daemon on a free localhost port; yields (address, registry)."""
    registry = SessionRegistry(device="cpu", max_sessions=8)
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, **kw), registry)
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        server.stop(0).wait()


def tls(pki, cert="server", mutual=False, tokens=True):
    """ServeConfig keyword arguments for a TLS daemon."""
    kw = dict(tls_cert=pki[cert], tls_key=pki[cert + "_key"])
    if mutual:
        kw["tls_client_ca"] = pki["ca"]
    if tokens:
        kw["auth_token_file"] = pki["tokens"]
    return kw


EDGE_FLAGS = ("insecure", "tls_ca", "tls_cert", "tls_key", "auth_token_file")


def make_transport(address, **kw) -> GrpcTransport:
    """What `sft-edge train` connects with for these flags (insecure, tls_*, auth_token_file)."""
    flags = {name: kw.get(name) for name in EDGE_FLAGS}
    creds, metadata = credentials.secure_link(
        address, bool(flags["insecure"]), flags["tls_ca"], flags["tls_cert"], flags["tls_key"],
        flags["auth_token_file"],
    )  # fmt: skip
    return GrpcTransport(open_channel(address, creds), metadata)


def open_msg(base, session_id=""):
    fp = session_fingerprint(base.fingerprint, SplitSpec(split_layer=3, rank=8), 2)
    return pb.EdgeMessage(open=pb.OpenSession(config=session_config(), fingerprint=fp, session_id=session_id))


def _connect_and_open(base, address, **kw):
    transport = make_transport(address, **kw)
    try:
        return transport, transport.call(open_msg(base)).opened
    except Exception:
        transport.close()
        raise


# --- the right edge is served ------------------------------------------------------------------


def test_tls_with_token_serves_the_right_edge_and_binds_the_session_to_the_token(pki, tiny_base):
    with daemon(**tls(pki)) as (address, registry):
        t, opened = _connect_and_open(tiny_base, address, tls_ca=pki["ca"], auth_token_file=pki["a"])
        assert opened.session_id and len(opened.session_id) >= 32  # 192 random bits, URL-safe
        owner = registry.get(opened.session_id).owner
        assert owner.startswith("token:") and TOKEN_A not in owner  # a hash, never the token
        t.close()


def test_mutual_tls_serves_the_right_edge_and_binds_the_session_to_its_certificate(pki, tiny_base):
    with daemon(**tls(pki, mutual=True, tokens=False)) as (address, registry):
        t, opened = _connect_and_open(
            tiny_base, address, tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"]
        )
        assert registry.get(opened.session_id).owner.startswith("cert:")
        t.close()


def test_health_answers_without_a_token_so_container_healthchecks_work(pki):
    with daemon(**tls(pki)) as (address, _):
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes()))
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()


# --- refusals: status code and the reason ------------------------------------------------------

REFUSALS = {
    "no token": (
        lambda p: tls(p),
        lambda p: dict(tls_ca=p["ca"]),
        grpc.StatusCode.UNAUTHENTICATED,
        "no bearer token",
    ),
    "wrong token": (
        lambda p: tls(p),
        lambda p: dict(tls_ca=p["ca"], auth_token_file=p["wrong"]),
        grpc.StatusCode.UNAUTHENTICATED,
        "not one this daemon accepts",
    ),
    "plaintext edge, TLS daemon": (
        lambda p: tls(p),
        lambda p: dict(insecure=True, auth_token_file=p["a"]),
        grpc.StatusCode.UNAVAILABLE,
        "closed a plaintext connection: it serves TLS",
    ),
    "TLS edge, plaintext daemon": (
        lambda p: dict(insecure=True),
        lambda p: dict(tls_ca=p["ca"]),
        grpc.StatusCode.UNAVAILABLE,
        "does not speak TLS",
    ),
    "edge trusts another CA": (
        lambda p: tls(p),
        lambda p: dict(tls_ca=p["other_ca"], auth_token_file=p["a"]),
        grpc.StatusCode.UNAVAILABLE,
        "does not verify against --tls-ca",
    ),
    "expired server certificate": (
        lambda p: tls(p, cert="expired"),
        lambda p: dict(tls_ca=p["ca"], auth_token_file=p["a"]),
        grpc.StatusCode.UNAVAILABLE,
        "certificate has expired",
    ),
    "server certificate for another host": (
        lambda p: tls(p, cert="wrong_host"),
        lambda p: dict(tls_ca=p["ca"], auth_token_file=p["a"]),
        grpc.StatusCode.UNAVAILABLE,
        "not issued for 127.0.0.1",
    ),
    "client certificate from another CA": (
        lambda p: tls(p, mutual=True),
        lambda p: dict(
            tls_ca=p["ca"],
            tls_cert=p["foreign_client"],
            tls_key=p["foreign_client_key"],
            auth_token_file=p["a"],
        ),
        grpc.StatusCode.UNAVAILABLE,
        "refused this edge's client certificate",
    ),
    "no client certificate under mutual TLS": (
        lambda p: tls(p, mutual=True),
        lambda p: dict(tls_ca=p["ca"], auth_token_file=p["a"]),
        grpc.StatusCode.UNAVAILABLE,
        "pass a client certificate",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_with_the_right_status_and_reason(pki, tiny_base, case):
    server_kw, edge_kw, code, reason = REFUSALS[case]
    with daemon(**server_kw(pki)) as (address, registry):
        with pytest.raises(CloudError) as info:
            _connect_and_open(tiny_base, address, **edge_kw(pki))
        assert info.value.code == code, info.value
        assert reason in info.value.details
        assert len(registry) == 0  # nothing was opened


def test_token_is_checked_before_any_payload_is_read(pki):
    """The edge sends no message at all and is still refused: the check needs no payload."""
    from sft_common.proto import sft_pb2_grpc as pb_grpc

    release = threading.Event()

    def nothing():  # a request stream that stays silent until the test ends
        release.wait(30)
        return
        yield

    with daemon(**tls(pki)) as (address, _):
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes()))
        metadata = (("authorization", "Bearer " + "z" * 40),)
        responses = pb_grpc.SplitTrainerStub(channel).Train(nothing(), metadata=metadata, timeout=20)
        try:
            with pytest.raises(grpc.RpcError) as info:
                next(responses)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "not one this daemon accepts" in info.value.details()
        finally:
            release.set()
            channel.close()


# --- sessions belong to whoever opened them ----------------------------------------------------


@pytest.mark.parametrize("mutual", [False, True], ids=["tokens", "client certificates"])
def test_a_second_identity_cannot_attach_and_learns_nothing(pki, tiny_base, mutual):
    if mutual:
        server_kw = tls(pki, mutual=True, tokens=False)
        first = dict(tls_ca=pki["ca"], tls_cert=pki["client"], tls_key=pki["client_key"])
        second = dict(tls_ca=pki["ca"], tls_cert=pki["client2"], tls_key=pki["client2_key"])
    else:
        server_kw = tls(pki)
        first = dict(tls_ca=pki["ca"], auth_token_file=pki["a"])
        second = dict(tls_ca=pki["ca"], auth_token_file=pki["b"])
    with daemon(**server_kw) as (address, registry):
        t1, opened = _connect_and_open(tiny_base, address, **first)
        session = registry.get(opened.session_id)
        before = (session.owner, session.next_step)
        replies = {}
        for sid in (opened.session_id, "no-such-session-" + "x" * 16):
            t2 = make_transport(address, **second)
            with pytest.raises(CloudError) as info:
                t2.call(open_msg(tiny_base, session_id=sid))
            t2.close()
            replies[sid] = info.value
        theirs = replies[opened.session_id]
        assert theirs.code == grpc.StatusCode.PERMISSION_DENIED
        # The same words as for a session that does not exist, and nothing about this one.
        assert theirs.details == replies["no-such-session-" + "x" * 16].details
        assert opened.session_id not in theirs.details and session.owner not in theirs.details
        assert (session.owner, session.next_step) == before
        # Its owner still reaches it from a new stream.
        t3 = make_transport(address, **first)
        assert (
            t3.call(open_msg(tiny_base, session_id=opened.session_id)).opened.session_id == opened.session_id
        )
        t3.close()
        t1.close()


# --- configuration: TLS unless --insecure, and clear refusals ----------------------------------


def test_daemon_refuses_to_start_without_tls_material_unless_insecure(pki, tmp_path):
    registry = SessionRegistry(device="cpu")
    with pytest.raises(ValueError, match="no TLS material: pass --tls-cert and --tls-key"):
        create_server(ServeConfig(host="127.0.0.1", port=0), registry)
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        create_server(ServeConfig(host="127.0.0.1", port=0, tls_cert=pki["server"]), registry)
    with pytest.raises(ValueError, match="exclude each other"):
        create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True, **tls(pki)), registry)
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ValueError, match="--tls-cert: .* is not a PEM file"):
        create_server(
            ServeConfig(
                host="127.0.0.1", port=0, tls_cert=str(tmp_path / "junk.pem"), tls_key=pki["server_key"]
            ),
            registry,
        )


def test_edge_refuses_to_connect_without_tls_material_unless_insecure(pki):
    with pytest.raises(ValueError, match="no TLS material: pass --tls-ca"):
        credentials.channel_credentials(False, None)
    with pytest.raises(ValueError, match="exclude each other"):
        credentials.channel_credentials(True, pki["ca"])
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        credentials.channel_credentials(False, pki["ca"], tls_cert=pki["client"])
    assert credentials.channel_credentials(True, None) is None


@pytest.mark.parametrize(
    "text, match",
    [
        ("# nothing\n\n", "holds no token"),
        ("short\n", "16 to 512 visible ASCII"),
        ("has a space in it, long enough\n", "16 to 512 visible ASCII"),
        (f"{TOKEN_A}\n{TOKEN_A}\n", "appears twice"),
    ],
)
def test_bad_token_files_are_refused_without_echoing_them(tmp_path, text, match):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    with pytest.raises(TokenError, match=match) as info:
        read_token_file(str(path))
    assert TOKEN_A not in str(info.value)


def test_edge_token_file_holds_exactly_one_token(pki):
    assert credentials.auth_metadata(pki["a"]) == [("authorization", f"Bearer {TOKEN_A}")]
    with pytest.raises(TokenError, match="holds 2 tokens"):
        credentials.auth_metadata(pki["tokens"])


def test_tokens_are_compared_as_digests():
    tokens = auth.TokenSet([TOKEN_A, TOKEN_B])
    assert tokens.accepts(TOKEN_A) and tokens.accepts(TOKEN_B)
    assert not tokens.accepts(TOKEN_A[:-1]) and not tokens.accepts("")
    assert bearer_token([("authorization", "bearer  xyz ")]) == "xyz"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("other", "Bearer abc")]) is None


def test_nothing_is_unpickled_anywhere():
    """No pickle on the wire or from disk: no pickle import, torch.load only with weights_only."""
    offenders = []
    for folder in ("sft_common", "sft_edge", "sft_cloud", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
                offenders.append(f"{path}: imports pickle")
            for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in call.group(1):
                    offenders.append(f"{path}: {call.group(0)}")
            if re.search(r"np\.load\([^)]*allow_pickle=True", text):
                offenders.append(f"{path}: np.load(allow_pickle=True)")
    assert not offenders


# --- the command lines and `make certs` --------------------------------------------------------


def test_dev_certs_are_written_with_private_files_closed(tmp_path):
    paths = certs.write_dev_certs(str(tmp_path / "dev"))
    names = sorted(os.path.basename(p) for p in paths.values())
    for expected in (
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
        "tokens.txt",
        "edge-token.txt",
    ):
        assert expected in names
    for role in ("server_key", "client_key", "ca_key", "tokens", "edge_token"):
        assert os.stat(paths[role]).st_mode & 0o077 == 0
    assert read_token_file(paths["edge_token"]) == read_token_file(paths["tokens"])
    from cryptography import x509

    server = x509.load_pem_x509_certificate(Path(paths["server_cert"]).read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "cloud"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_cli_daemon_without_tls_material_exits_with_the_reason(capsys):
    from sft_cloud.cli import main

    assert main(["serve", "--host", "127.0.0.1", "--port", "0", "--device", "cpu"]) == 2
    assert "no TLS material: pass --tls-cert and --tls-key" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_over_mutual_tls_with_the_dev_certificates(tmp_path, glue_dir):
    """`make certs` output, `sft-cloud serve` and `sft-edge train` as real processes."""
    from daemon import start_daemon, stop_daemon

    c = certs.write_dev_certs(str(tmp_path / "dev"))
    proc, port = start_daemon(
        ["--device", "cpu", "--tls-cert", c["server_cert"], "--tls-key", c["server_key"],
         "--tls-client-ca", c["ca"], "--auth-token-file", c["tokens"]]
    )  # fmt: skip
    try:
        out = subprocess.run(
            [sys.executable, "-m", "sft_edge.cli", "train", "--cloud", f"localhost:{port}", "--task", "sst2",
             "--data-dir", glue_dir, "--model", "random:tiny", "--max-steps", "3", "--max-train-examples", "48",
             "--max-eval-examples", "32", "--batch-size", "16", "--no-progress",
             "--tls-ca", c["ca"], "--tls-cert", c["client_cert"], "--tls-key", c["client_key"],
             "--auth-token-file", c["edge_token"]],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
    finally:
        log = stop_daemon(proc)
    assert out.returncode == 0, out.stderr + log
    assert '"steps": 3' in out.stdout
    assert "mutual TLS" in log or "WITHOUT TLS" not in log
