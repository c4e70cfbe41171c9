"""The cloud session as a plain class: exactly-once steps, and refusals that change nothing."""

from __future__ import annotations

import os

import grpc
import pytest
import torch
from helpers import max_diff, params, session_config
from helpers import open_stream as _open
from helpers import train_message as _step

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError


@pytest.fixture
def registry():
    return SessionRegistry(max_sessions=2)


def test_steps_apply_once_and_retries_get_the_cached_reply(registry, tiny_base):
    proto = _open(registry, tiny_base)
    session = proto.session
    first = proto.handle(_step(0)).train
    assert first.step == 0 and session.next_step == 1
    before = params(session.net2)
    again = proto.handle(_step(0))  # a retry after a reconnect: same reply, no second update
    assert again.train == first
    assert max_diff(before, params(session.net2)) == 0 and session.next_step == 1
    proto.handle(_step(1))
    assert session.next_step == 2 and max_diff(before, params(session.net2)) > 0


def _assert_refused_unchanged(proto, msg, code, match):
    session = proto.session
    before, step, reply = params(session.net2), session.next_step, session.last_reply
    opt_state = {
        k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
        for k, s in session.optimizer.state.items()
    }
    with pytest.raises(ProtocolError, match=match) as info:
        proto.handle(msg)
    assert info.value.code == code
    assert max_diff(before, params(session.net2)) == 0
    assert session.next_step == step and session.last_reply is reply
    for k, s in session.optimizer.state.items():
        for n, v in opt_state[k].items():
            assert torch.equal(s[n], v)


@pytest.mark.parametrize(
    "msg, code, match",
    [
        (_step(5), grpc.StatusCode.FAILED_PRECONDITION, "step 5 is out of order: the session expects step 2"),
        (_step(0), grpc.StatusCode.FAILED_PRECONDITION, "step 0 is out of order"),
        (
            _step(2, width=16),
            grpc.StatusCode.INVALID_ARGUMENT,
            "activations: shape \\[8, 16\\]: dimension 1 is 16",
        ),
        (
            _step(2, dtype=pb.FLOAT16),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dtype FLOAT16, the session uses FLOAT32",
        ),
        (_step(2, lengths=(5, 0)), grpc.StatusCode.INVALID_ARGUMENT, "sequence length 0 is outside 1..64"),
        (_step(2, lengths=(65,), labels=(1,)), grpc.StatusCode.INVALID_ARGUMENT, "sequence length 65"),
        (
            _step(2, lengths=(1,) * 9, labels=(0,) * 9),
            grpc.StatusCode.INVALID_ARGUMENT,
            "batch of 9 examples",
        ),
        (_step(2, labels=(0, 2)), grpc.StatusCode.INVALID_ARGUMENT, "label 2 is outside 0..1"),
        (_step(2, labels=(0,)), grpc.StatusCode.INVALID_ARGUMENT, "classification needs 2 labels"),
        (
            _step(2, targets=(0.5, 0.1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "classification needs 2 labels and no targets",
        ),
        (
            pb.EdgeMessage(
                train=pb.TrainStep(
                    step=2,
                    lengths=[2],
                    labels=[0],
                    activations=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 8], data=b"\x00\x00\xc0\x7f" * 16),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or Inf",
        ),
        (
            pb.EdgeMessage(
                train=pb.TrainStep(
                    step=2,
                    lengths=[2],
                    labels=[0],
                    activations=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 8], data=b"\0" * 60),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "60 bytes of data",
        ),
        (
            pb.EdgeMessage(
                train=pb.TrainStep(
                    step=2,
                    lengths=[2],
                    labels=[0],
                    activations=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 8, 1], data=b"\0" * 64),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "rank 3",
        ),
        (pb.EdgeMessage(), grpc.StatusCode.INVALID_ARGUMENT, "empty message"),
        (pb.EdgeMessage(open=pb.OpenSession()), grpc.StatusCode.FAILED_PRECONDITION, "already has a session"),
    ],
)
def test_malformed_messages_are_refused_and_change_nothing(registry, tiny_base, msg, code, match):
    proto = _open(registry, tiny_base)
    proto.handle(_step(0))
    proto.handle(_step(1))
    _assert_refused_unchanged(proto, msg, code, match)
    proto.handle(_step(2))  # and the session goes on
    assert proto.session.next_step == 3


def test_eval_changes_nothing(registry, tiny_base):
    proto = _open(registry, tiny_base)
    before = params(proto.session.net2)
    acts = codec.encode(torch.randn(7, 8))
    reply = proto.handle(pb.EdgeMessage(eval=pb.EvalStep(batch=3, activations=acts, lengths=[4, 3]))).eval
    logits = codec.decode(reply.logits, name="logits", shape=(2, 2))
    assert reply.batch == 3 and torch.isfinite(logits).all()
    assert max_diff(before, params(proto.session.net2)) == 0 and proto.session.next_step == 0


def test_unknown_session_and_other_identity(registry, tiny_base):
    proto = _open(registry, tiny_base, owner="edge-a")
    sid = proto.session.session_id
    config = session_config()
    other = StreamProtocol(registry, "edge-a")
    with pytest.raises(ProtocolError, match="no session with this id") as info:
        other.handle(
            pb.EdgeMessage(
                open=pb.OpenSession(config=config, session_id="nope", fingerprint=proto.session.fingerprint)
            )
        )
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED  # the same as someone else's session
    thief = StreamProtocol(registry, "edge-b")
    with pytest.raises(ProtocolError, match="no session with this id") as info:
        thief.handle(
            pb.EdgeMessage(
                open=pb.OpenSession(config=config, session_id=sid, fingerprint=proto.session.fingerprint)
            )
        )
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
    # The owner can re-attach on a new stream and continue where it was.
    again = StreamProtocol(registry, "edge-a")
    opened = again.handle(
        pb.EdgeMessage(
            open=pb.OpenSession(config=config, session_id=sid, fingerprint=proto.session.fingerprint)
        )
    ).opened
    assert opened.session_id == sid and opened.next_step == 0


def test_steps_before_open_and_after_close(registry, tiny_base):
    with pytest.raises(ProtocolError, match="train before open") as info:
        StreamProtocol(registry, "x").handle(_step(0))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    proto = _open(registry, tiny_base)
    proto.handle(_step(0))
    closed = proto.handle(pb.EdgeMessage(close=pb.CloseSession())).closed
    assert closed.steps == 1 and len(registry) == 0
    with pytest.raises(ProtocolError, match="closed"):
        proto.handle(_step(1))


def test_fingerprint_mismatch_is_refused(registry, tiny_base):
    proto = StreamProtocol(registry, "x")
    with pytest.raises(ProtocolError, match="fingerprint mismatch") as info:
        proto.handle(pb.EdgeMessage(open=pb.OpenSession(config=session_config(), fingerprint="0" * 64)))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(registry) == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(split_layer=9), "split layer 9 is out of range"),
        (dict(rank=0), "rank 0 is out of range"),
        (dict(mode=0), "mode 0 is not one of"),
        (dict(wire_dtype=0), "wire dtype 0"),
        (dict(max_batch_size=0), "max_batch_size must be in 1..256"),
        (dict(max_seq_len=100000), "max_seq_len must be in 1..512"),
        (dict(lr=float("nan")), "lr must be in"),
        (dict(factor_lr=-1e-4), "factor_lr must be in"),
        (dict(factor_lr=1e-4, mode=pb.SL), "factor_lr is for SFT"),
        (dict(total_steps=0), "total_steps >= 1"),
        (dict(num_labels=0), "num_labels must be in"),
        (dict(side_width=8), "side_width is for forward-only sessions"),
    ],
)
def test_bad_session_configs_are_refused(registry, tiny_base, kw, match):
    with pytest.raises(ProtocolError, match=match) as info:
        _open(registry, tiny_base, **kw)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(registry) == 0


@pytest.mark.parametrize(
    "svd_init, factors",
    [
        (pb.SVD_INIT_ACTIVATION_AWARE, ("cloud_sigma", "cloud_v")),
        (pb.SVD_INIT_RESIDUAL_AWARE, ("cloud_sigma", "cloud_v")),
        (pb.SVD_INIT_ACTIVATION_AWARE, ()),
        (7, ()),
        (pb.SVD_INIT_PLAIN, ("cloud_sigma",)),
        (pb.SVD_INIT_PLAIN, ("cloud_v",)),
    ],
)
@pytest.mark.parametrize("session_id", ["", "some-session"], ids=["new", "re-attach"])
def test_a_calibrated_init_is_refused_as_removed_and_nothing_is_created(
    tiny_base, tmp_path, svd_init, factors, session_id
):
    """Old edges may still ask for the removed calibrated starts (the fields stay in the .proto):
    the daemon says so, before anything exists, whether the open is new or a re-attach."""
    registry = SessionRegistry(checkpoint_dir=str(tmp_path / "cloud"))
    registry._bases[tiny_base.name] = tiny_base
    config = session_config()
    fingerprint = session_fingerprint(tiny_base.fingerprint, SplitSpec(config.split_layer, config.rank), 2)
    tensors = {"cloud_sigma": codec.encode(torch.ones(8)), "cloud_v": codec.encode(torch.ones(8, 32))}
    msg = pb.OpenSession(config=config, fingerprint=fingerprint, session_id=session_id)
    msg.config.svd_init = svd_init
    for name in factors:
        getattr(msg, name).CopyFrom(tensors[name])
    with pytest.raises(ProtocolError, match="calibrated initialisation .* was removed") as info:
        StreamProtocol(registry, "edge-a").handle(pb.EdgeMessage(open=msg))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(registry) == 0 and not (tmp_path / "cloud").exists()
    # the same open with the plain start and no factors is accepted (a new one: the test is not vacuous)
    plain = pb.OpenSession(config=config, fingerprint=fingerprint)
    StreamProtocol(registry, "edge-a").handle(pb.EdgeMessage(open=plain))
    assert len(registry) == 1


def test_unknown_model_is_refused_clearly(registry):
    proto = StreamProtocol(registry, "x")
    with pytest.raises(ProtocolError, match="cloud cannot load the model") as info:
        proto.handle(pb.EdgeMessage(open=pb.OpenSession(config=session_config(model="random:nope"))))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_max_sessions(registry, tiny_base):
    _open(registry, tiny_base)
    _open(registry, tiny_base)
    with pytest.raises(ProtocolError, match="--max-sessions 2") as info:
        _open(registry, tiny_base)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_checkpoints_keep_the_newest_three_a_restart_restores_the_newest_close_leaves_final(
    tmp_path, tiny_base
):
    proto = _open(SessionRegistry(checkpoint_dir=str(tmp_path)), tiny_base)
    session = proto.session
    for k in range(5):
        proto.handle(_step(k))
        proto.handle(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=k + 1)))
    folder = tmp_path / session.session_id
    assert sorted(os.listdir(folder)) == [f"step-{k:09d}.safetensors" for k in (3, 4, 5)]

    # A restarted daemon rebuilds the session from its newest checkpoint, not its oldest.
    again = StreamProtocol(SessionRegistry(checkpoint_dir=str(tmp_path)), "edge-a")
    opened = again.handle(
        pb.EdgeMessage(
            open=pb.OpenSession(
                config=session.config, fingerprint=session.fingerprint, session_id=session.session_id
            )
        )
    ).opened
    assert opened.next_step == 5 and max_diff(params(again.session.net2), params(session.net2)) == 0

    assert again.handle(pb.EdgeMessage(close=pb.CloseSession())).closed.steps == 5
    assert os.listdir(folder) == ["final.safetensors"]  # written atomically; step checkpoints gone
