"""UShapeSession and MiddleSession without the trainer: each of the four phases lost and re-sent
is applied once, a restarted cloud rolls both sides back to the same end, refusals change nothing.

The cloud is a real ``SessionRegistry`` reached in-process (``InProcessTransport``: every message
serialized and parsed as on the wire); links break where the tests say.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers import params, random_batch

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.models.lora import LoraSpec
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError
from sft_edge.link.transport import CloudError, InProcessTransport
from sft_edge.runs.config import OptimConfig
from sft_edge.sessions.client import Rollback
from sft_edge.sessions.ushape import UShapeSession

OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=10, seed=5)
SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1)


class Link:
    """Connects to a registry in this process; loses the request of, or the answer to, the n-th
    message sent over all its streams, and can swap the registry (a daemon restart) first."""

    def __init__(self, registry: SessionRegistry):
        self.registry = registry
        self.sent = 0
        self.fail_at: dict = {}  # message number -> "answer" | "request"
        self.restart_at: dict = {}  # message number -> the registry that answers from then on
        self.streams = 0

    def __call__(self) -> InProcessTransport:
        self.streams += 1
        return _Flaky(StreamProtocol(self.registry, "tester"), self)


class _Flaky(InProcessTransport):
    def __init__(self, protocol, link: Link):
        super().__init__(protocol)
        self.link = link

    def _submit(self, msg):
        self.link.sent += 1
        if self.link.sent in self.link.restart_at:
            self.link.registry = self.link.restart_at.pop(self.link.sent)
        lost = self.link.fail_at.pop(self.link.sent, None)
        if lost == "request":
            self._answers.append(CloudError(grpc.StatusCode.UNAVAILABLE, "request lost"))
            return
        super()._submit(msg)
        if lost == "answer":
            self._answers[-1] = CloudError(grpc.StatusCode.UNAVAILABLE, "answer lost")

    def close(self):
        self.protocol.detach()


def _registry(tiny_base, folder=None) -> SessionRegistry:
    registry = SessionRegistry(device="cpu", checkpoint_dir=folder)
    registry._bases[tiny_base.name] = tiny_base
    return registry


def _session(base, connect, **kw) -> UShapeSession:
    return UShapeSession(base, SPEC, 2, connect, OPTIM, batch_size=8, max_seq_len=64, **kw)


def _batches(n=4):
    return [random_batch(batch=6, seq=12, seed=k) for k in range(n)]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# Message 1 opens; step k sends forward_up as message 2 + 2k and gradient_up as 3 + 2k.
PHASES = {
    "1 forward up": (4, "request", 0),  # (message of step 1, what is lost, replies from the cache)
    "2 forward down": (4, "answer", 1),
    "3 gradient up": (5, "request", 1),
    "4 gradient down": (5, "answer", 2),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_a_lost_phase_is_re_sent_and_applied_once(tiny_base, phase):
    ref_registry = _registry(tiny_base)
    ref = _session(tiny_base, Link(ref_registry))
    ref_losses = [ref.train_step(k, b) for k, b in enumerate(_batches())]

    registry = _registry(tiny_base)
    link = Link(registry)
    session = _session(tiny_base, link)
    number, lost, replayed = PHASES[phase]
    link.fail_at[number] = lost
    losses = [session.train_step(k, b) for k, b in enumerate(_batches())]

    assert link.streams == 2 and session.resumes == 1
    assert losses == ref_losses
    assert _equal(params(session.net), params(ref.net))
    cloud, cloud_ref = registry.get(session.session_id), ref_registry.get(ref.session_id)
    assert cloud.next_step == cloud_ref.next_step == 4  # no phase applied twice
    assert cloud.replayed == replayed
    assert _equal(params(cloud.net2), params(cloud_ref.net2))
    assert session.bytes_sent > ref.bytes_sent  # the re-sent messages crossed the link
    assert session.close() == 4


def test_a_lost_evaluation_answer_is_asked_again(tiny_base):
    registry = _registry(tiny_base)
    link = Link(registry)
    session = _session(tiny_base, link)
    session.train_step(0, _batches(1)[0])
    batch = random_batch(batch=3, seq=10, seed=9)
    before = session.predict(batch)
    link.fail_at[link.sent + 1] = "answer"
    assert torch.equal(session.predict(batch), before)
    assert session.resumes == 1 and registry.get(session.session_id).next_step == 1


@pytest.mark.parametrize("during", ["forward_up", "gradient_up"])
@pytest.mark.parametrize("lora", [None, LoraSpec(rank=4, alpha=8.0)], ids=["full", "lora"])
def test_the_cloud_restarted_from_a_checkpoint_rolls_the_edge_back(tiny_base, tmp_path, lora, during):
    """Both sides restore their checkpoint of step 2 (the edge: head and tail in one file) and end
    where an uninterrupted run ends; the restart is noticed in phase 1 or, with a forward applied
    by the old daemon, in phase 3."""
    cloud_dir = str(tmp_path / "cloud")
    link = Link(_registry(tiny_base, cloud_dir))
    edge_ckpts = CheckpointDir(str(tmp_path / "edge"))
    session = _session(tiny_base, link, checkpoints=edge_ckpts, lora=lora)
    batches = _batches(3)
    session.train_step(0, batches[0])
    session.train_step(1, batches[1])
    session.checkpoint(2, {"note": "after two steps"})
    saved = CheckpointDir(str(tmp_path / "edge")).load(2)[0]
    assert any(k.startswith("model/head.") for k in saved) and any(k.startswith("model/tail.") for k in saved)
    at_checkpoint = params(session.net)
    session.train_step(2, batches[2])

    number = link.sent + (1 if during == "forward_up" else 2)
    link.restart_at[number] = _registry(tiny_base, cloud_dir)  # only its checkpoint is left
    link.fail_at[number] = "request"
    with pytest.raises(Rollback) as caught:
        session.train_step(3, batches[0])
    assert caught.value.step == 2 and caught.value.run == {"note": "after two steps"}
    assert _equal(params(session.net), at_checkpoint)
    session.train_step(2, batches[2])
    restored = link.registry.get(session.session_id)
    assert restored.next_step == 3

    ref_link = Link(_registry(tiny_base))
    ref = _session(tiny_base, ref_link, lora=lora)
    for k, b in enumerate(batches):
        ref.train_step(k, b)
    assert _equal(params(session.net), params(ref.net))
    assert _equal(params(restored.net2), params(ref_link.registry.get(ref.session_id).net2))


def _forward_up(step, tokens=10, width=8, lengths=(6, 4)):
    acts = codec.encode(torch.randn(tokens, width), pb.FLOAT32)
    return pb.ForwardUp(step=step, activations=acts, lengths=list(lengths))


def test_the_middle_refuses_what_is_out_of_order_and_changes_nothing(tiny_base, tmp_path):
    registry = _registry(tiny_base, str(tmp_path))
    session = _session(tiny_base, Link(registry))
    cloud = registry.get(session.session_id)
    before = params(cloud.net2)
    with pytest.raises(
        ProtocolError, match="gradient_up of step 0 is out of order: the session expects forward_up of step 0"
    ):
        cloud.gradient_up(pb.GradientUp(step=0))
    with pytest.raises(ProtocolError, match="forward_up of step 1 is out of order"):
        cloud.forward_up(_forward_up(1))
    down = cloud.forward_up(_forward_up(0))
    assert cloud.forward_up(_forward_up(0)) is down and cloud.replayed == 1  # a repeat: the cache
    with pytest.raises(ProtocolError, match="expects gradient_up of step 0"):
        cloud.forward_up(_forward_up(1))
    with pytest.raises(ProtocolError, match="step 0 is half applied") as caught:
        cloud.checkpoint(pb.Checkpoint(step=0))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    bad = pb.GradientUp(step=0, grad=codec.encode(torch.randn(9, 8), pb.FLOAT32))  # 9 rows, not 10
    with pytest.raises(ProtocolError) as caught:
        cloud.gradient_up(bad)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert _equal(params(cloud.net2), before) and cloud.next_step == 0
    up = cloud.gradient_up(pb.GradientUp(step=0, grad=codec.encode(torch.randn(10, 8), pb.FLOAT32)))
    assert up.step == 0 and cloud.next_step == 1 and not _equal(params(cloud.net2), before)
    assert cloud.gradient_up(pb.GradientUp(step=0)) is up  # answered from the cache
