"""`sft-cloud serve --max-delta-cache-mb` / `--delta-cache-total-mb`: the daemon bounds delta mode's
memory. A session asking for more is refused at open, before anything is built, with a message
naming the flag and both numbers; the total frees a session's share when it leaves."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import grpc
import pytest
from daemon import ROOT, start_daemon, stop_daemon
from helpers import session_config
from test_delta_grpc import DELTA, PLAIN, _epochs, _u
from test_ushape_lm_grpc import lm_batches

from sft_cloud.cli import main as cloud_main
from sft_cloud.daemon.config import ServeConfig
from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.admission import MIB, Admission
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.wire.delta import DeltaMode
from sft_common.wire.errors import ProtocolError
from sft_edge.link.transport import CloudError

CODES = grpc.StatusCode


def _delta(mb: float, u: bool = False) -> pb.SessionConfig:
    """A session config in delta mode at ``mb`` MiB a cut: the U's (two cuts) or a two-part's."""
    config = session_config(mode=pb.SL, rank=0, tail_layers=1 if u else 0)
    DeltaMode.named(mb).configure(config)  # type: ignore[union-attr]
    return config


@pytest.mark.parametrize(
    "admission, config, code, words",
    [
        (Admission(delta_per_cut=0), _delta(1), CODES.FAILED_PRECONDITION, "--max-delta-cache-mb 0"),
        (Admission(delta_per_cut=MIB), _delta(2), CODES.FAILED_PRECONDITION, "asks for 2 MiB a cut"),
        (Admission(delta_per_cut=MIB), _delta(1.5), CODES.FAILED_PRECONDITION, "--max-delta-cache-mb 1)"),
        (Admission(delta_total=3 * MIB), _delta(2, u=True), CODES.FAILED_PRECONDITION, "at most 1.5 MiB"),
        (Admission(delta_total=3 * MIB), _delta(1, u=True), CODES.RESOURCE_EXHAUSTED, "have 2 MiB of the 3"),
        (Admission(max_sessions=1), _delta(1), CODES.RESOURCE_EXHAUSTED, "--max-sessions 1"),
    ],
)
def test_what_is_refused_and_why(admission, config, code, words):
    held = [_delta(1, u=True)]  # 2 MiB granted: two cuts
    with pytest.raises(ProtocolError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        admission.check(config, held)
    assert caught.value.code == code


@pytest.mark.parametrize(
    "admission, config",
    [
        (Admission(delta_per_cut=0), session_config()),  # delta mode off: any limit is fine
        (Admission(delta_per_cut=MIB), _delta(1)),  # at the cap
        (Admission(delta_total=3 * MIB), _delta(1)),  # 2 + 1 MiB: exactly the total
        (Admission(), _delta(4096, u=True)),  # the defaults: the protocol's 4 GiB a cut, no total
    ],
)
def test_what_is_admitted(admission, config):
    admission.check(config, [_delta(1, u=True)])


def test_the_flags_reach_the_admission_and_are_checked_first():
    assert Admission.of(64, 0.5, 3.0) == Admission(64, MIB // 2, 3 * MIB)
    assert Admission.of(64, 4096, None) == Admission()
    for bad in (dict(max_delta_cache_mb=4097), dict(max_delta_cache_mb=-1), dict(delta_cache_total_mb=-1)):
        with pytest.raises(ValueError, match="--max-delta-cache-mb must be in 0..4096"):
            ServeConfig(insecure=True, **bad).validate()  # type: ignore[arg-type]
    assert cloud_main(["serve", "--insecure", "--port", "0", "--max-delta-cache-mb", "5000"]) == 2
    assert Admission.of(64, 1, 3).describe() == "max 64 sessions, delta caches of 1 MiB a cut, 3 MiB in all"
    assert Admission.of(8, 0, None).describe() == "max 8 sessions, delta mode off"  # the start line


def test_refused_before_the_model_is_loaded_and_a_restore_meets_todays_cap(tmp_path, tiny_base):
    """A model the daemon cannot load is not even looked at; a checkpointed session whose budget
    is above the cap of the daemon restoring it is refused the same way."""
    capped = SessionRegistry(admission=Admission(delta_per_cut=MIB), checkpoint_dir=str(tmp_path))
    nope = pb.OpenSession(config=_delta(2))
    nope.config.model = "random:nope"
    with pytest.raises(ProtocolError, match="asks for 2 MiB a cut"):
        StreamProtocol(capped, "edge").handle(pb.EdgeMessage(open=nope))

    fp = session_fingerprint(tiny_base.fingerprint, SplitSpec(split_layer=3, rank=0, mode="sl"), 2)
    msg = pb.OpenSession(config=_delta(2), fingerprint=fp)
    proto = StreamProtocol(SessionRegistry(checkpoint_dir=str(tmp_path)), "edge")
    sid = proto.handle(pb.EdgeMessage(open=msg)).opened.session_id
    proto.handle(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=0)))
    msg.session_id = sid
    with pytest.raises(ProtocolError, match="more than this daemon allows") as caught:
        StreamProtocol(capped, "edge").handle(pb.EdgeMessage(open=msg))
    assert caught.value.code == CODES.FAILED_PRECONDITION and len(capped) == 0


@pytest.fixture(scope="module")
def capped_daemon():
    """A real `sft-cloud serve`: 1 MiB a cut, 3 MiB in all (one U of 1 MiB a cut takes 2)."""
    proc, port = start_daemon(
        ["--insecure", "--device", "cpu", "--max-delta-cache-mb", "1", "--delta-cache-total-mb", "3"]
    )
    yield f"127.0.0.1:{port}"
    log = stop_daemon(proc)  # each refusal is logged with what the edge was told
    assert "refused open: FAILED_PRECONDITION: delta mode: this session asks for 2 MiB a cut" in log, log
    assert "refused open: RESOURCE_EXHAUSTED: delta mode: this session's caches may take 2 MiB" in log, log


def test_the_edge_shows_the_refusal_and_trains_nothing(capped_daemon, glue_dir, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sft_edge.cli", "train", "--task", "sst2", "--data-dir", glue_dir,
         "--model", "random:tiny-llama", "--mode", "sl", "--delta-cache-mb", "2", "--cloud", capped_daemon,
         "--insecure", "--no-progress", "--max-steps", "2", "--batch-size", "4", "--max-train-examples", "8",
         "--max-eval-examples", "4", "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("sft-edge: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "FAILED_PRECONDITION" in errors[0] and "asks for 2 MiB a cut" in errors[0]
    assert "--max-delta-cache-mb 1" in errors[0]
    assert not (tmp_path / "run" / "sft_edge.json").exists()  # no run report: nothing trained


def test_at_the_cap_trains_and_the_total_frees_a_closed_sessions_share(capped_daemon):
    batches = lm_batches(2)
    with pytest.raises(CloudError, match="asks for 1.5 MiB a cut") as caught:
        _u(capped_daemon, dataclasses.replace(DELTA, delta_cache_mb=1.5))
    assert caught.value.code == CODES.FAILED_PRECONDITION
    first = _u(capped_daemon, DELTA)  # 1 MiB a cut: at the cap; 2 MiB of the 3 granted
    _, traffic = _epochs(first, batches)
    assert first.delta is not None and first.delta.used > 0
    assert all(t[0] < traffic[0][0] for t in traffic[1:])  # deltas from the second epoch
    with pytest.raises(CloudError, match="have 2 MiB of the 3") as caught:
        _u(capped_daemon, DELTA)
    assert caught.value.code == CODES.RESOURCE_EXHAUSTED
    _u(capped_daemon, PLAIN).close()  # without delta mode: not counted
    first.close()
    second = _u(capped_daemon, DELTA)  # the first's share is free again
    second.train_step(0, batches[0])
    second.close()


def test_cap_zero_refuses_delta_mode_only():
    proc, port = start_daemon(["--insecure", "--device", "cpu", "--max-delta-cache-mb", "0"])
    try:
        with pytest.raises(CloudError, match="does not serve delta mode") as caught:
            _u(f"127.0.0.1:{port}", DELTA)
        assert caught.value.code == CODES.FAILED_PRECONDITION
        _u(f"127.0.0.1:{port}", PLAIN).close()
    finally:
        assert "refused open: FAILED_PRECONDITION: this daemon does not serve delta mode" in stop_daemon(proc)
