"""Forward-only with ``--dp-noise``: each example's first cut is clipped and noised once, before it crosses.

The noise of an example is drawn from (seed, the hash of its tokens) alone, so it is the same in
whatever batch the example travels, and the middle's answer to the noised rows is what the cache
keeps: later epochs send nothing and add no noise (one Gaussian release an example, whatever the
number of epochs). The reference: the U's three parts in one process, the middle fed the same
noised rows, the tail trained on its output.
"""

from __future__ import annotations

import pytest
import torch

from sft_common.models.base_model import load_base_model
from sft_common.wire import codec
from sft_edge.data.activation_cache import ActivationCache, example_key
from sft_edge.data.lm import collate_lm
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.privacy.defence import Gaussian
from sft_edge.runs.config import DPOptions, LinkOptions
from sft_edge.sessions.forward_only import DP_FORWARD, ForwardOnlySession
from sft_edge.sessions.tail_end import tail_end_of
from tests.test_forward_only_grpc import OPTIM, SPEC
from tests.test_ushape_lm_grpc import assert_parts_equal, lm_batches

NOISE = Gaussian(noise=0.5, clip=2.0)


def open_edge(address, base):
    link = LinkOptions(wire_dtype="fp32", dp=DPOptions(noise=NOISE.noise, clip=NOISE.clip))
    cache = ActivationCache(None, {"base": base.fingerprint}, 64.0)
    transport = GrpcTransport(open_channel(address))
    return ForwardOnlySession(base, SPEC, 0, transport, OPTIM, 8, 32, link, cache, causal_lm=True)


def defended(head, batch):
    """Each example's real first-cut rows, clipped to NOISE.clip and noised by its own draw."""
    mask = batch.attention_mask.bool()
    with torch.no_grad():
        first, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    rows = []
    for i in range(len(mask)):
        key = example_key(batch.input_ids[i][mask[i]], batch.token_type_ids[i][mask[i]])
        own = first[i][mask[i]].float()
        clipped = own * min(1.0, NOISE.clip / float(own.norm()))
        draw = torch.randn(own.shape, generator=NOISE.generator(OPTIM.seed, DP_FORWARD, int(key[:15], 16)))
        rows.append(clipped + draw * NOISE.noise * NOISE.clip)
    return torch.cat(rows)


def test_each_example_crosses_once_clipped_and_noised_and_trains_as_in_one_process(recorded):
    """Two epochs: every EvalStep holds exactly the defended rows; nothing crosses in epoch 2; the
    losses and the tail equal the parts in one process fed the same noised rows."""
    address, registry, messages = recorded
    base = load_base_model("random:tiny-llama")
    batches = lm_batches(3)
    edge = open_edge(address, base)
    losses = [edge.train_step(k, b) for k, b in enumerate(batches * 2)]
    edge.close()
    evals = [m.eval for m, _ in messages if m.WhichOneof("kind") == "eval"]
    assert len(evals) == len(batches)  # the second epoch read the cache
    head, middle, tail = tail_end_of(True).model(base, SPEC, 0, OPTIM.seed, "cpu")
    for msg, batch in zip(evals, batches):
        sent = codec.decode(msg.activations, name="rows", dtype=msg.activations.dtype, shape=None)
        assert torch.equal(sent, defended(head, batch))
        clean, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        assert not torch.allclose(sent, clean[batch.attention_mask.bool()], atol=1e-3)
    # the reference: the middle on the noised rows, the tail trained on its answers
    middle.requires_grad_(False), head.eval(), middle.eval()
    optimizer = torch.optim.AdamW(tail.parameters(), lr=OPTIM.lr, weight_decay=OPTIM.weight_decay)
    from sft_common.training import make_schedule, step_seed

    schedule = make_schedule(optimizer, OPTIM.warmup_steps, OPTIM.total_steps)
    ref = []
    for k, batch in enumerate(batches * 2):
        mask = batch.attention_mask.bool()
        first = torch.zeros(*mask.shape, base.hidden_size).index_put((mask,), defended(head, batch))
        with torch.no_grad():
            second, _ = middle(first, batch.attention_mask)
        torch.manual_seed(step_seed(OPTIM.seed, "edge-tail", k))
        loss = tail_end_of(True).loss(
            tail(second * mask[..., None], batch.attention_mask).float(), batch.labels
        )
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
        ref.append(loss.item())
    assert losses == pytest.approx(ref, abs=1e-6)
    assert_parts_equal(tail, edge.tail)


def test_an_examples_noise_is_the_same_in_any_batch(recorded):
    """The same four examples sent in one batch and in two: each example's rows are the same bytes."""
    address, _, messages = recorded
    base = load_base_model("random:tiny-llama")
    (batch,) = lm_batches(1)
    edge = open_edge(address, base)
    edge.predict(batch)
    encoded = batch_encoded(batch)
    other = open_edge(address, base)
    other.predict(collate_lm(encoded, [2, 3]))
    other.predict(collate_lm(encoded, [0, 1]))
    edge.close(), other.close()
    rows = [
        codec.decode(m.eval.activations, name="rows", dtype=m.eval.activations.dtype, shape=None)
        for m, _ in messages
        if m.WhichOneof("kind") == "eval"
    ]
    whole, late, early = rows
    assert torch.equal(whole, torch.cat([early, late]))


def batch_encoded(batch):
    """The LMEncoded rows of a collated batch (its real tokens and labels)."""
    from sft_edge.data.lm import LMEncoded

    mask = batch.attention_mask.bool()
    ids = [batch.input_ids[i][mask[i]].tolist() for i in range(len(mask))]
    labels = [batch.labels[i][mask[i]].tolist() for i in range(len(mask))]
    return LMEncoded(ids, labels)
