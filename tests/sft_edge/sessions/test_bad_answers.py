"""A cloud message that fails the edge's checks ends the run as a refused answer does: a
``CloudError`` the edge concluded itself (the CLI says it in one line), naming what was refused and
why, never the codec's bare ``ProtocolError`` (a traceback). Each decoding of what the cloud sends
is covered: the two-part gradient and logits, the U's second cut, gradient and evaluation, and
forward-only's answer. The cloud is a real ``SessionRegistry`` in this process; one field of one
answer is changed on its way back.
"""

from __future__ import annotations

import grpc
import pytest
from helpers import random_batch

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_edge.data.activation_cache import ActivationCache
from sft_edge.link.transport import CloudError, InProcessTransport
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.forward_only import ForwardOnlySession
from sft_edge.sessions.two_part import EdgeSession
from sft_edge.sessions.ushape import UShapeSession

OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=10, seed=5)


class Tampered(InProcessTransport):
    """Answers as the cloud does, but the tensor at ``path`` of the first answer of ``kind`` claims
    one row more than it holds."""

    def __init__(self, registry: SessionRegistry, kind: str, path: str):
        super().__init__(StreamProtocol(registry, "tester"))
        self.kind, self.path, self.done = kind, path, False

    def _result(self):
        reply = super()._result()
        if not self.done and reply.WhichOneof("kind") == self.kind:
            tensor = getattr(reply, self.kind)
            for name in self.path.split("."):
                tensor = getattr(tensor, name)
            tensor.shape[0] += 1
            self.done = True
        return reply

    def close(self):
        self.protocol.detach()


def _registry(base) -> SessionRegistry:
    registry = SessionRegistry(device="cpu")
    registry._bases[base.name] = base
    return registry


def _assert_refused(call, what: str) -> None:
    with pytest.raises(CloudError, match=f"refused {what}: .*shape") as caught:
        call()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not str(caught.value).startswith("cloud said")  # the edge concluded it


@pytest.mark.parametrize(
    "kind, path, what",
    [("train", "grad", "the cloud's gradient"), ("eval", "logits", "the cloud's logits")],
)
def test_two_part(tiny_base, kind, path, what):
    transport = Tampered(_registry(tiny_base), kind, path)
    edge = EdgeSession(
        tiny_base, SplitSpec(split_layer=2, rank=8), 2, transport, OPTIM, 8, 64, link=LinkOptions()
    )
    batch = random_batch(batch=3, seq=10)
    _assert_refused(lambda: edge.train_step(0, batch) if kind == "train" else edge.predict(batch), what)


@pytest.mark.parametrize(
    "kind, path, what",
    [
        ("forward_down", "activations", "the middle's output"),
        ("gradient_down", "grad", "the cloud's gradient"),
        ("eval", "activations", "the middle's output"),
    ],
)
def test_ushape(tiny_base, kind, path, what):
    transport = Tampered(_registry(tiny_base), kind, path)
    spec = UShapeSpec(split_layer=0, rank=8, tail_layers=1)
    edge = UShapeSession(tiny_base, spec, 2, transport, OPTIM, batch_size=8, max_seq_len=64)
    batch = random_batch(batch=3, seq=10)
    _assert_refused(lambda: edge.train_step(0, batch) if kind != "eval" else edge.predict(batch), what)


def test_forward_only(tiny_base):
    transport = Tampered(_registry(tiny_base), "eval", "activations")
    spec = UShapeSpec(split_layer=0, rank=8, tail_layers=1, mode="sl")
    cache = ActivationCache(None, {"base": tiny_base.fingerprint}, 64.0)
    link = LinkOptions(wire_dtype="fp32")
    edge = ForwardOnlySession(tiny_base, spec, 2, transport, OPTIM, 8, 64, link, cache)
    _assert_refused(lambda: edge.train_step(0, random_batch(batch=3, seq=10)), "the middle's output")
    assert cache.used == 0  # nothing refused was kept
