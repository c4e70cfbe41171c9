"""EdgeSession without the trainer: steps, reconnect and re-send, rollback, refusals.

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
from sft_common.topology.spec import SplitSpec
from sft_edge.link.transport import CloudError, InProcessTransport
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.two_part import EdgeSession, Rollback

OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=10, seed=5)
SPEC = SplitSpec(split_layer=2, rank=8)


class Link:
    """Connects to a registry in this process; can lose the answer to (or the request of) the
    n-th message sent over all its streams."""

    def __init__(self, registry: SessionRegistry):
        self.registry = registry
        self.sent = 0
        self.fail_at: dict = {}  # message number -> "answer" (lost after the cloud applied it) | "request"
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
    registry._bases[tiny_base.name] = tiny_base  # no second copy of the model
    return registry


def _session(base, connect, micro_batches=1, **kw) -> EdgeSession:
    link = LinkOptions(micro_batches=micro_batches, pipeline_depth=2)
    return EdgeSession(base, SPEC, 2, connect, OPTIM, batch_size=8, max_seq_len=64, link=link, **kw)


def _batches(n=4):
    return [random_batch(batch=6, seq=12, seed=k) for k in range(n)]


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("micro_batches", [1, 3])
@pytest.mark.parametrize("lost", ["answer", "request"])
def test_a_lost_message_is_re_sent_and_applied_once(tiny_base, micro_batches, lost):
    ref_registry = _registry(tiny_base)
    ref = _session(tiny_base, Link(ref_registry), micro_batches)
    ref_losses = [ref.train_step(k, b) for k, b in enumerate(_batches())]

    registry = _registry(tiny_base)
    link = Link(registry)
    session = _session(tiny_base, link, micro_batches)
    # message 1 opened the session; lose one in the middle of step 1 (its last micro-batch)
    link.fail_at[1 + micro_batches * 2] = lost
    losses = [session.train_step(k, b) for k, b in enumerate(_batches())]

    assert link.streams == 2 and session.resumes == 1
    assert losses == ref_losses
    assert _equal(params(session.net1), params(ref.net1))
    cloud, cloud_ref = registry.get(session.session_id), ref_registry.get(ref.session_id)
    assert cloud.next_step == cloud_ref.next_step == 4  # no step applied twice
    assert _equal(params(cloud.net2), params(cloud_ref.net2))
    # the re-attachment and the re-sent messages crossed the link: they are counted
    assert session.bytes_sent > ref.bytes_sent
    assert session.close() == 4


def test_a_lost_evaluation_answer_is_asked_again(tiny_base):
    registry = _registry(tiny_base)
    link = Link(registry)
    session = _session(tiny_base, link)
    session.train_step(0, _batches(1)[0])
    before = session.predict(random_batch(batch=3, seq=10, seed=9))
    link.fail_at[link.sent + 1] = "answer"
    assert torch.equal(session.predict(random_batch(batch=3, seq=10, seed=9)), before)
    assert session.resumes == 1 and registry.get(session.session_id).next_step == 1


@pytest.mark.parametrize("lora", [None, LoraSpec(rank=4, alpha=8.0)], ids=["full", "lora"])
def test_the_cloud_restarted_from_a_checkpoint_rolls_the_edge_back(tiny_base, tmp_path, lora):
    """Both sides restore their checkpoint of step 2 (with LoRA: the adapters, factors and head
    over a base rebuilt from the model) and end where an uninterrupted run ends."""
    cloud_dir = str(tmp_path / "cloud")
    link = Link(_registry(tiny_base, cloud_dir))
    edge_ckpts = CheckpointDir(str(tmp_path / "edge"))
    session = _session(tiny_base, link, checkpoints=edge_ckpts, lora=lora)
    batches = _batches(3)
    session.train_step(0, batches[0])
    session.train_step(1, batches[1])
    session.checkpoint(2, {"note": "after two steps"})
    at_checkpoint = params(session.net1)
    session.train_step(2, batches[2])
    assert not _equal(params(session.net1), at_checkpoint)

    link.registry = _registry(tiny_base, cloud_dir)  # the daemon restarts: only its checkpoint is left
    link.fail_at[link.sent + 1] = "request"
    with pytest.raises(Rollback) as caught:
        session.train_step(3, batches[0])
    assert caught.value.step == 2 and caught.value.run == {"note": "after two steps"}
    assert _equal(params(session.net1), at_checkpoint)  # the edge loaded its own checkpoint of step 2
    session.train_step(2, batches[2])  # and continues from there
    restored = link.registry.get(session.session_id)
    assert restored.next_step == 3

    ref_link = Link(_registry(tiny_base))
    ref = _session(tiny_base, ref_link, lora=lora)
    for k, b in enumerate(batches):
        ref.train_step(k, b)
    assert _equal(params(session.net1), params(ref.net1))
    assert _equal(params(restored.net2), params(ref_link.registry.get(ref.session_id).net2))


def test_without_edge_checkpoints_a_restarted_cloud_cannot_be_rejoined_and_says_why(tiny_base, tmp_path):
    cloud_dir = str(tmp_path / "cloud")
    link = Link(_registry(tiny_base, cloud_dir))
    session = _session(tiny_base, link)
    session.train_step(0, _batches(1)[0])
    session.request(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=1)))  # the cloud alone checkpoints
    session.train_step(1, _batches(2)[1])
    link.registry = _registry(tiny_base, cloud_dir)
    link.fail_at[link.sent + 1] = "request"
    with pytest.raises(CloudError, match="cannot resume at any of the steps \\[2\\]") as caught:
        session.train_step(2, _batches(1)[0])  # the edge can offer only its live step
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_one_transport_cannot_reconnect_so_the_link_error_is_raised(tiny_base):
    link = Link(_registry(tiny_base))
    session = _session(tiny_base, link())  # a transport, not a factory
    link.fail_at[link.sent + 1] = "answer"
    with pytest.raises(CloudError, match="answer lost") as caught:
        session.train_step(0, _batches(1)[0])
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and link.streams == 1


def test_a_refusal_is_not_retried(tiny_base):
    link = Link(_registry(tiny_base))
    session = _session(tiny_base, link)
    with pytest.raises(CloudError) as caught:
        session.train_step(5, _batches(1)[0])  # the cloud expects step 0
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and link.streams == 1


def test_another_fingerprint_in_the_answer_is_refused(tiny_base):
    class Liar(InProcessTransport):
        def _result(self):
            reply = super()._result()
            reply.opened.fingerprint = "0" * 64
            return reply

    with pytest.raises(CloudError, match="another fingerprint"):
        _session(tiny_base, Liar(StreamProtocol(_registry(tiny_base), "tester")))


def test_cls_only_needs_the_last_layer(tiny_base):
    link = LinkOptions(cls_only=True)
    with pytest.raises(ValueError, match="--cls-only needs the cut at the last layer"):
        EdgeSession(tiny_base, SPEC, 2, Link(_registry(tiny_base)), OPTIM, 8, 64, link=link)


def test_cls_only_is_refused_for_a_mean_pooling_head():
    from sft_common.models.base_model import load_base_model

    base = load_base_model("random:tiny-modernbert-mean")
    spec = SplitSpec(split_layer=base.num_hidden_layers - 1, rank=8)
    with pytest.raises(ValueError, match="pools the mean of every token"):
        EdgeSession(base, spec, 2, Link(_registry(base)), OPTIM, 8, 64, link=LinkOptions(cls_only=True))
