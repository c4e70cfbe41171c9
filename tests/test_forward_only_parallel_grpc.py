"""Forward-only with a side network (``--adapters parallel``) over a real gRPC server equals the same model in one process.

The reference: the U's three parts in one process, all frozen (the head and middle without
dropout, the tail with the edge's dropout seeds), the middle's layers tapped and projected by the
same P (``sft_common.topology.side``), a ``SideNetwork`` and (classification) the task head under
AdamW. Through the daemon, the edge sends each example's first cut once and trains on the cached
answer and taps. Recorded messages: no gradient, label or loss, and nothing in epoch 2.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import head_parameters
from sft_common.topology.side import SideNetwork, middle_taps, side_projection, side_width
from sft_common.training import make_optimizer, make_schedule, step_seed
from sft_edge.data.activation_cache import ActivationCache
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions
from sft_edge.sessions.forward_only import ForwardOnlySession
from sft_edge.sessions.tail_end import tail_end_of
from tests.test_forward_only_grpc import OPTIM, SPEC, STEPS, cls_batches
from tests.test_ushape_lm_grpc import assert_parts_equal, lm_batches


def frozen_parts(base, causal_lm):
    """The U's three parts from the base, frozen but for a classification head (new: it trains)."""
    head, middle, tail = tail_end_of(causal_lm).model(base, SPEC, 0 if causal_lm else 2, OPTIM.seed, "cpu")
    for part in (head, middle, tail):
        part.requires_grad_(False)
    for p in head_parameters(tail):
        p.requires_grad_(True)
    return head, middle, tail


def train_in_one_process(base, batches, causal_lm, epochs=2):
    """(tail, side, losses): the frozen U with a side network trained beside it, in one process."""
    head, middle, tail = frozen_parts(base, causal_lm)
    projection = side_projection(base.fingerprint, base.hidden_size, side_width(base.hidden_size))
    side = SideNetwork(
        base.hidden_size, len(middle.layers), projection, step_seed(OPTIM.seed, "edge-side", 0)
    )
    optimizer = make_optimizer(nn.ModuleList([tail, side]).parameters(), OPTIM.lr, OPTIM.weight_decay)
    schedule = make_schedule(optimizer, OPTIM.warmup_steps, OPTIM.total_steps)
    head.eval(), middle.eval(), tail.train()
    losses = []
    for k, batch in enumerate(batches * epochs):
        mask = batch.attention_mask
        rows = mask[..., None].float()  # only real rows cross: both sides re-pad with zeros
        with torch.no_grad():
            first, _ = head(batch.input_ids, mask, batch.token_type_ids)
            second, taps = middle_taps(middle, first * rows, mask, projection)
            inputs = torch.cat([first @ projection, taps], dim=-1) * rows
        torch.manual_seed(step_seed(OPTIM.seed, "edge-tail", k))
        logits = tail(second * rows + side(inputs) * rows, mask)
        loss = tail_end_of(causal_lm).loss(logits.float(), batch.labels)
        loss.backward()
        optimizer.step(), schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return tail, side, losses


def open_parallel_edge(address, base, causal_lm):
    cache = ActivationCache(
        None, {"base": base.fingerprint, "side_width": side_width(base.hidden_size)}, 64.0
    )
    return ForwardOnlySession(
        base, SPEC, 0 if causal_lm else 2, GrpcTransport(open_channel(address)), OPTIM, batch_size=8,
        max_seq_len=32, link=LinkOptions(wire_dtype="fp32"), cache=cache, causal_lm=causal_lm,
        adapters="parallel",
    )  # fmt: skip


CASES = pytest.mark.parametrize(
    "name, causal_lm", [("random:tiny-llama", True), ("random:tiny", False)], ids=["llama", "bert"]
)


@CASES
def test_parallel_equals_one_process_and_sends_each_example_once(recorded, name, causal_lm):
    """Two epochs: the losses, the side network and the tail within 1e-6 of the reference; the
    backbone untouched; an open, one evaluation a batch of epoch 1 (each reply with the middle's
    taps), nothing in epoch 2, a close; no gradient, label or loss crosses."""
    address, registry, messages = recorded
    base = load_base_model(name)
    batches = lm_batches(STEPS) if causal_lm else cls_batches()
    edge = open_parallel_edge(address, base, causal_lm)
    losses = [edge.train_step(k, b) for k, b in enumerate(batches * 2)]
    tail, side, ref_losses = train_in_one_process(base, batches, causal_lm)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert_parts_equal(side, edge.net["side"])
    assert_parts_equal(tail, edge.tail)  # frozen but for a classification head, as in the reference
    untouched, _, _ = frozen_parts(base, causal_lm)
    assert_parts_equal(untouched, edge.head, atol=0.0)
    assert set(edge.state_dict()) == {k for k, p in edge.net.named_parameters() if p.requires_grad}
    assert any(k.startswith("side.") for k in edge.state_dict())
    cloud = registry.get(edge.session_id)
    assert not any(p.requires_grad for p in cloud.net2.parameters())
    assert edge.close() == 0
    kinds = [m.WhichOneof("kind") for m, _ in messages]
    assert kinds == ["open"] + ["eval"] * STEPS + ["close"]  # the second epoch sent nothing
    assert messages[0][0].open.config.side_width == side_width(base.hidden_size) == 32
    layers = len(cloud.net2.layers)
    for msg, reply in messages[1:-1]:
        assert {f.name for f, _ in msg.eval.ListFields()} <= {"batch", "activations", "lengths"}
        assert list(reply.eval.side.shape) == [sum(msg.eval.lengths), layers * 32]


@CASES
def test_at_step_0_the_model_is_the_frozen_one(live_server, name, causal_lm):
    """``up`` starts at zero: before any step the logits are the frozen U's within 1e-6."""
    address, _ = live_server
    base = load_base_model(name)
    batch = (lm_batches(1) if causal_lm else cls_batches(1))[0]
    edge = open_parallel_edge(address, base, causal_lm)
    logits = edge.predict(batch)
    head, middle, tail = frozen_parts(base, causal_lm)
    for part in (head, middle, tail):
        part.eval()
    mask = batch.attention_mask
    with torch.no_grad():
        first, _ = head(batch.input_ids, mask, batch.token_type_ids)
        frozen = tail(middle(first, mask)[0], mask)
    rows = mask.bool() if causal_lm else slice(None)  # an LM's padded positions are not compared
    assert torch.allclose(logits[rows], frozen[rows], atol=1e-6)
    edge.close()


def test_the_cloud_refuses_a_side_width_wider_than_the_model(live_server):
    from sft_edge.link.transport import CloudError

    address, _ = live_server
    base = load_base_model("random:tiny-llama")
    edge = open_parallel_edge(address, base, True)
    edge._open.config.side_width = 33
    with pytest.raises(CloudError, match="side_width must be in 0..32"):
        edge.predict(lm_batches(1)[0])
