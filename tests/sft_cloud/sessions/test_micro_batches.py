"""A step in micro-batches: accumulated in the session, each (step, micro) applied exactly once."""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers import max_diff, params
from helpers import open_stream as _open
from helpers import train_message as _step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2 as pb
from sft_common.wire.errors import ProtocolError


def _micro(step, micro, lengths, labels, count=2, examples=3, **kw):
    return _step(
        step, lengths=lengths, labels=labels, micro=micro, micro_count=count, step_examples=examples, **kw
    )


def _grads(session):
    return [None if p.grad is None else p.grad.clone() for p in session.net2.parameters()]


@pytest.fixture
def registry(tmp_path):
    return SessionRegistry(max_sessions=2, checkpoint_dir=str(tmp_path))


def test_the_optimizer_steps_after_the_last_micro_batch(registry, tiny_base):
    proto = _open(registry, tiny_base)
    session = proto.session
    before = params(session.net2)
    first = proto.handle(_micro(0, 0, (5, 3), (0, 1))).train
    assert (first.step, first.micro) == (0, 0) and (session.next_step, session.next_micro) == (0, 1)
    assert max_diff(before, params(session.net2)) == 0  # accumulated, not applied
    assert any(g is not None and bool(g.abs().sum() > 0) for g in _grads(session))
    assert tuple(first.grad.shape) == (8, 8)
    last = proto.handle(_micro(0, 1, (4,), (1,))).train
    assert (last.step, last.micro) == (0, 1) and (session.next_step, session.next_micro) == (1, 0)
    assert max_diff(before, params(session.net2)) > 0
    assert all(g is None for g in _grads(session))  # cleared for the next step


def test_repeated_micro_batches_get_their_cached_replies(registry, tiny_base):
    proto = _open(registry, tiny_base)
    session = proto.session
    first = proto.handle(_micro(0, 0, (5, 3), (0, 1))).train
    grads = _grads(session)
    assert proto.handle(_micro(0, 0, (5, 3), (0, 1))).train == first  # a re-send mid-step
    assert session.replayed == 1 and session.next_micro == 1
    assert all(torch.equal(a, b) for a, b in zip(grads, _grads(session)) if a is not None)
    last = proto.handle(_micro(0, 1, (4,), (1,))).train
    after = params(session.net2)
    # After the step: every micro-batch of it is still answered from the cache, once.
    assert proto.handle(_micro(0, 0, (5, 3), (0, 1))).train == first
    assert proto.handle(_micro(0, 1, (4,), (1,))).train == last
    assert session.replayed == 3 and max_diff(after, params(session.net2)) == 0
    # The next step's first micro-batch evicts nothing it still needs; the one after drops step 0.
    proto.handle(_micro(1, 0, (2,), (0,), examples=2))
    proto.handle(_micro(1, 1, (2,), (1,), examples=2))
    assert sorted(session.replies) == [(1, 0), (1, 1)]


def _assert_refused_unchanged(proto, msg, code, match):
    session = proto.session
    state = (session.next_step, session.next_micro, session.last_reply, sorted(session.replies))
    before, grads = params(session.net2), _grads(session)
    with pytest.raises(ProtocolError, match=match) as info:
        proto.handle(msg)
    assert info.value.code == code
    assert (session.next_step, session.next_micro, session.last_reply, sorted(session.replies)) == state
    assert max_diff(before, params(session.net2)) == 0
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, _grads(session)))


INVALID = grpc.StatusCode.INVALID_ARGUMENT
ORDER = grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    "msg, code, match",
    [
        (
            _micro(0, 2, (4,), (1,), count=3),
            ORDER,
            "step 0 micro-batch 2 is out of order: the session expects step 0 micro-batch 1",
        ),
        (_micro(1, 0, (4,), (1,)), ORDER, "step 1 is out of order"),
        (
            _micro(0, 1, (4,), (1,), count=3),
            INVALID,
            "says step 0 has 3 micro-batches of 3 examples; micro-batch 0 said 2 of 3",
        ),
        (_micro(0, 1, (4,), (1,), examples=4), INVALID, "micro-batch 0 said 2 of 3"),
        (_micro(0, 1, (4, 4), (1, 0)), INVALID, "hold 4 examples, which cannot add up to step_examples 3"),
        (pb.EdgeMessage(checkpoint=pb.Checkpoint(step=0)), ORDER, "with 1 of its micro-batches applied"),
    ],
)
def test_bad_micro_batches_mid_step_are_refused_and_change_nothing(registry, tiny_base, msg, code, match):
    proto = _open(registry, tiny_base)
    proto.handle(_micro(0, 0, (5, 3), (0, 1)))
    _assert_refused_unchanged(proto, msg, code, match)


@pytest.mark.parametrize(
    "msg, match",
    [
        (
            _micro(0, 0, (5, 3), (0, 1), count=2, examples=2),
            "hold 2 examples, which cannot add up to step_examples 2 in 2",
        ),
        (_micro(0, 0, (5, 3), (0, 1), count=9, examples=9), "the session allows 1..8 of each"),
        (_micro(0, 0, (5, 3), (0, 1), count=2, examples=99), "the session allows 1..8 of each"),
        (_micro(0, 0, (5, 3), (0, 1), count=0, examples=3), "cannot add up to step_examples 3 in 1"),
    ],
)
def test_bad_first_micro_batches_are_refused(registry, tiny_base, msg, match):
    proto = _open(registry, tiny_base)
    _assert_refused_unchanged(proto, msg, INVALID, match)


def test_resume_mid_step_and_after_it(registry, tiny_base):
    proto = _open(registry, tiny_base)
    session = proto.session
    proto.handle(_micro(0, 0, (5, 3), (0, 1)))
    assert session.core.resume([0]) == (0, False)  # the live state still holds micro-batch 0
    assert session.opened().next_micro == 1
    proto.handle(_micro(0, 1, (4,), (1,)))
    assert session.core.resume([0]) == (0, False)  # step 0 is complete, and all of it is cached


def test_a_restored_session_drops_a_partly_applied_step(registry, tiny_base):
    """After a restore the edge sends the whole step again: it ends as if never interrupted."""
    torch.manual_seed(1)
    messages = [_micro(0, 0, (5, 3), (0, 1)), _micro(0, 1, (4,), (1,))]
    plain = _open(registry, tiny_base).session
    for m in messages:
        plain.train(m.train)
    registry.close(plain.session_id)

    proto = _open(registry, tiny_base)
    session = proto.session
    session.checkpoint(pb.Checkpoint(step=0))
    session.train(messages[0].train)
    session.core.restore(0)
    assert (session.next_step, session.next_micro, session.replies) == (0, 0, {})
    assert all(g is None for g in _grads(session))
    for m in messages:
        session.train(m.train)
    assert session.replayed == 0 and session.next_step == 1
    assert max_diff(params(plain.net2), params(session.net2)) == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    step=st.integers(0, 3),
    micro=st.integers(0, 4),
    count=st.integers(0, 10),
    examples=st.integers(0, 10),
    n=st.integers(1, 4),
)
def test_any_micro_batch_but_the_next_one_is_refused_mid_step(
    registry, tiny_base, step, micro, count, examples, n
):
    """Mid-step (micro-batch 0 of 2, 3 examples, applied after a whole step 0), every other
    combination of the micro-batch fields is refused and changes nothing, or is a replay."""
    proto = _open(registry, tiny_base)
    proto.handle(_step(0))
    proto.handle(_micro(1, 0, (5, 3), (0, 1)))
    msg = _step(
        step, lengths=(2,) * n, labels=(0,) * n, micro=micro, micro_count=count, step_examples=examples
    )
    session = proto.session
    if (step, micro) in session.replies:
        assert proto.handle(msg).train == session.replies[(step, micro)]
    elif (step, micro, count, examples, n) == (1, 1, 2, 3, 1):
        proto.handle(msg)
        assert session.next_step == 2
    else:
        code = ORDER if (step, micro) != (1, 1) else INVALID
        _assert_refused_unchanged(proto, msg, code, "out of order|micro-batch|examples")
    registry.close(session.session_id)
