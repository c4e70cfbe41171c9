"""Forward-only split fine-tuning over a real gRPC server equals its parts trained in one process.

The reference: the U's three parts in one process, the head and the middle frozen and run without
dropout, only the tail (whole, or its LoRA adapters and task head) under AdamW, dropout seeded as
the edge seeds the tail. Through the daemon, the edge sends each example's first-cut activations
once and trains its tail on the middle's cached answers. Recorded messages show what crosses: no
gradient, label or loss, and nothing at all for a cached example.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.topology.ushape import UShapeSpec, lora_part
from sft_common.training import make_optimizer, make_schedule, step_seed
from sft_edge.data.activation_cache import ActivationCache
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.forward_only import ForwardOnlySession
from sft_edge.sessions.tail_end import tail_end_of
from tests.helpers import random_batch
from tests.test_ushape_lm_grpc import assert_parts_equal, lm_batches

STEPS = 4
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, total_steps=10, seed=5)
SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1, mode="sl")


def cls_batches(n=STEPS):
    return [random_batch(batch=4, seq=10, seed=k) for k in range(n)]


def train_in_one_process(base, batches, causal_lm, lora=None, epochs=1):
    """(head, middle, tail, losses): the frozen head and middle, the tail trained on their output."""
    head, middle, tail = tail_end_of(causal_lm).model(base, SPEC, 0 if causal_lm else 2, OPTIM.seed, "cpu")
    if lora is not None:
        lora_part(tail, "tail", lora.resolved(base.config.model_type), OPTIM.seed)
    head.requires_grad_(False), middle.requires_grad_(False)
    optimizer = make_optimizer(nn.ModuleList([head, middle, tail]).parameters(), OPTIM.lr, OPTIM.weight_decay)
    schedule = make_schedule(optimizer, OPTIM.warmup_steps, OPTIM.total_steps)
    head.eval(), middle.eval(), tail.train()
    losses = []
    for k, batch in enumerate(batches * epochs):
        mask = batch.attention_mask
        rows = mask[..., None].float()  # only real rows cross: both sides re-pad with zeros
        with torch.no_grad():
            first, _ = head(batch.input_ids, mask, batch.token_type_ids)
            second, _ = middle(first * rows, mask)
        torch.manual_seed(step_seed(OPTIM.seed, "edge-tail", k))
        logits = tail(second * rows, mask)
        loss = tail_end_of(causal_lm).loss(logits.float(), batch.labels)
        loss.backward()
        optimizer.step(), schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return head, middle, tail, losses


def open_edge(address, base, causal_lm, lora=None, cache=None):
    cache = cache or ActivationCache(None, {"base": base.fingerprint}, 64.0)
    return ForwardOnlySession(
        base, SPEC, 0 if causal_lm else 2, GrpcTransport(open_channel(address)), OPTIM, batch_size=8,
        max_seq_len=32, link=LinkOptions(wire_dtype="fp32"), cache=cache, lora=lora, causal_lm=causal_lm,
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, causal_lm, lora",
    [
        ("random:tiny-llama", True, None),
        ("random:tiny-llama", True, LoraSpec(rank=4, alpha=8.0)),
        ("random:tiny-gpt2", True, None),
        ("random:tiny", False, None),
        ("random:tiny", False, LoraSpec(rank=4, alpha=8.0)),
    ],
    ids=["llama", "llama-lora", "gpt2", "bert", "bert-lora"],
)
def test_forward_only_equals_one_process_and_sends_each_example_once(recorded, name, causal_lm, lora):
    """Two epochs: the losses and every part's parameters within 1e-6 of the reference; the
    messages are an open, one evaluation a batch of the first epoch, nothing in the second, a
    close; none carries a gradient, label or loss; the cloud's middle is the base's, untouched."""
    address, registry, messages = recorded
    base = load_base_model(name)
    batches = lm_batches(STEPS) if causal_lm else cls_batches()
    edge = open_edge(address, base, causal_lm, lora)
    losses = [edge.train_step(k, b) for k, b in enumerate(batches * 2)]
    head, middle, tail, ref_losses = train_in_one_process(base, batches, causal_lm, lora, epochs=2)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert_parts_equal(head, edge.head, atol=0.0)  # frozen: exactly the base's
    assert_parts_equal(tail, edge.tail)
    cloud = registry.get(edge.session_id)
    assert_parts_equal(middle, cloud.net2, atol=0.0)
    assert not any(p.requires_grad for p in cloud.net2.parameters())
    assert edge.close() == 0
    kinds = [m.WhichOneof("kind") for m, _ in messages]
    assert kinds == ["open"] + ["eval"] * STEPS + ["close"]  # the second epoch sent nothing
    for msg, _ in messages:
        assert msg.WhichOneof("kind") != "eval" or set(f.name for f, _ in msg.eval.ListFields()) <= {
            "batch",
            "activations",
            "lengths",
        }
    assert edge.cache.hits == STEPS * len(batches[0].lengths)


def test_a_new_session_over_a_full_cache_opens_no_cloud_session(recorded, tmp_path):
    """An edge whose examples are all cached (a resumed run, a later epoch) never opens the cloud."""
    address, _, messages = recorded
    base = load_base_model("random:tiny-llama")
    identity = {"base": base.fingerprint}
    first = open_edge(address, base, True, cache=ActivationCache(str(tmp_path / "cache"), identity, 64.0))
    for k, batch in enumerate(lm_batches(2)):
        first.train_step(k, batch)
    first.close()
    sent = len(messages)
    again = open_edge(address, base, True, cache=ActivationCache(str(tmp_path / "cache"), identity, 64.0))
    for k, batch in enumerate(lm_batches(2)):
        again.train_step(k, batch)
        again.predict(batch)
    assert again.close() == 0 and not again.opened and len(messages) == sent
    assert again.bytes_sent == again.bytes_received == 0


def test_the_cloud_refuses_a_training_step_and_a_checkpoint(recorded):
    """A forward-only session takes evaluations only."""
    from sft_common.proto import sft_pb2 as pb
    from sft_edge.link.transport import CloudError

    address, _, _ = recorded
    base = load_base_model("random:tiny-llama")
    edge = open_edge(address, base, True)
    edge.predict(lm_batches(1)[0])
    with pytest.raises(CloudError, match="forward-only"):
        edge.request(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=1)))
