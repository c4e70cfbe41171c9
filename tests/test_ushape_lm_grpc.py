"""Causal-LM fine-tuning through the U over a real gRPC server equals its three parts in one process.

The reference is ``build_ushape_lm_model``'s parts in one process under one AdamW (the tied LM
head is the head part's embedding matrix: one parameter), the gradients passed by hand across
both cuts, dropout seeded as each side seeds it, and ``lm_loss`` on the tail's logits. Then greedy
decoding through the live session (each token one evaluation through the daemon) equals greedy
decoding with the reference's parts. Also: the LM tail is the real causal LM (at full rank with
the residuals kept, the three parts give Hugging Face's ``*ForCausalLM`` logits).
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from torch import nn

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.topology.ushape import UShapeSpec, lora_part, part_factors
from sft_common.topology.ushape_lm import TiedLMHead, build_ushape_lm_model
from sft_common.training import make_optimizer, make_schedule, step_seed
from sft_edge.data.lm import IGNORE, LMEncoded, collate_lm, lm_loss
from sft_edge.finished.generate import decode
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.ushape import UShapeSession

STEPS = 5
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, total_steps=10, seed=5)
SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1)


def lm_batches(n=STEPS, batch=4, seed=0):
    """Random token rows of 5..14 tokens; the first 3 (a prompt) and padding carry no label."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [[rng.randrange(1000, 3000) for _ in range(rng.randrange(5, 15))] for _ in range(batch)]
        labels = [[IGNORE] * 3 + row[3:] for row in ids]
        out.append(collate_lm(LMEncoded(ids, labels), range(batch)))
    return out


def train_lm_in_one_process(base, spec, optim, batches, lora=None):
    """The reference: (head, middle, tail, losses) after training on ``batches``."""
    parts = build_ushape_lm_model(base, spec, optim.seed)
    if lora is not None:
        resolved = lora.resolved(base.config.model_type)
        for which, part in zip(("head", "middle", "tail"), parts):
            lora_part(part, which, resolved, optim.seed)
    head, middle, tail = parts
    params = list(nn.ModuleList(parts).parameters())  # deduplicated: a tied LM head is the embeddings
    factors = [p for part in parts for p in part_factors(part)]
    optimizer = make_optimizer(params, optim.lr, optim.weight_decay, factors, optim.factor_lr)
    schedule = make_schedule(optimizer, optim.warmup_steps, optim.total_steps)
    losses = []
    for part in parts:
        part.train()
    for k, batch in enumerate(batches):
        mask = batch.attention_mask
        torch.manual_seed(step_seed(optim.seed, "edge", k))
        first, _ = head(batch.input_ids, mask, batch.token_type_ids)
        rows = mask[..., None].to(first.dtype)  # only real rows cross: the cloud re-pads with zeros
        first_in = (first.detach() * rows).requires_grad_()
        torch.manual_seed(step_seed(optim.seed, "cloud", k))
        second, _ = middle(first_in, mask)
        second_in = (second.detach() * rows).requires_grad_()
        torch.manual_seed(step_seed(optim.seed, "edge-tail", k))
        loss = lm_loss(tail(second_in, mask), batch.labels)
        loss.backward()
        second.backward(second_in.grad)
        first.backward(first_in.grad)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return head, middle, tail, losses


def one_process_logits(head, middle, tail):
    def logits(batch):
        for part in (head, middle, tail):
            part.eval()
        with torch.no_grad():
            cut, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            return tail(middle(cut, batch.attention_mask)[0], batch.attention_mask)

    return logits


def assert_parts_equal(ref, got, atol=1e-6, loose=()):
    """Every parameter within ``atol`` of the reference's; those ending in ``loose`` within 1e-5."""
    ref_params = dict(ref.named_parameters())
    assert [n for n, _ in got.named_parameters()] == list(ref_params)
    for n, p in got.named_parameters():
        diff = float((p.detach() - ref_params[n].detach()).abs().max())
        assert diff <= (1e-5 if n.endswith(loose) else atol), f"{n}: {diff}"


def with_tie(base, tie=True):
    """``base`` with its LM head tied (or not) to the embeddings. The fingerprint is unchanged, and
    rightly so: the cloud never holds the LM head."""
    config = base.config.__class__.from_dict({**base.config.to_dict(), "tie_word_embeddings": tie})
    return dataclasses.replace(base, config=config)


@pytest.mark.parametrize(
    "name, tie, lora",
    [
        ("random:tiny-llama", False, None),
        ("random:tiny-llama", True, None),
        ("random:tiny-gpt2", True, None),
        ("random:tiny-llama", True, LoraSpec(rank=4, alpha=8.0)),
    ],
    ids=["llama-untied", "llama-tied", "gpt2-tied", "llama-tied-lora"],
)
def test_grpc_causal_lm_u_equals_one_process_and_generates_the_same(live_server, name, tie, lora):
    """5 steps: the same losses and parameters of all three parts within 1e-6; then 6 greedy
    tokens through the daemon = 6 in one process. GPT-2 (dropout on, LM head tied to wte): its
    c_attn.bias within 1e-5, as the key bias's gradient is zero but for float noise, which AdamW
    scales to lr-sized steps (every other GPT-2 parameter is within 2e-7)."""
    address, registry = live_server
    base = with_tie(load_base_model(name), tie)
    edge = UShapeSession(
        base, SPEC, 0, GrpcTransport(open_channel(address)), OPTIM, batch_size=8, max_seq_len=32,
        link=LinkOptions(wire_dtype="fp32"), lora=lora, causal_lm=True,
    )  # fmt: skip
    losses = [edge.train_step(k, b) for k, b in enumerate(lm_batches())]
    head, middle, tail, ref_losses = train_lm_in_one_process(base, SPEC, OPTIM, lm_batches(), lora)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    cloud = registry.get(edge.session_id)
    loose = ("c_attn.bias",) if name == "random:tiny-gpt2" else ()
    for ref, got in ((head, edge.head), (middle, cloud.net2), (tail, edge.tail)):
        assert_parts_equal(ref, got, loose=loose)
    assert isinstance(edge.tail.lm_head, TiedLMHead) == tie
    if tie:  # one tensor, trained once, saved once
        embedding = edge.head.wte if name == "random:tiny-gpt2" else edge.head.embed_tokens
        assert edge.tail.lm_head.weight is embedding.weight
        assert not any(k.startswith("tail.lm_head") for k in edge.state_dict())
    lm_head = edge.tail.lm_head.weight
    assert lm_head.requires_grad == (lora is None)  # LoRA: the LM head stays the base's
    assert sum(p is lm_head for g in edge.optimizer.param_groups for p in g["params"]) == int(lora is None)
    assert not any(k.startswith("score") for k in edge.tail.state_dict())

    prompt = [1200, 1300, 1400, 1500]
    want = decode(one_process_logits(head, middle, tail), prompt, 6, 32)
    assert decode(edge.predict, prompt, 6, 32) == want and len(want) == 6
    assert edge.close() == STEPS


@pytest.mark.parametrize(
    "name, tie", [("random:tiny-llama", False), ("random:tiny-llama", True), ("random:tiny-gpt2", True)]
)
def test_full_rank_lm_u_with_residuals_is_hugging_faces_causal_lm(name, tie):
    """The three parts at full rank with both residuals kept give ``*ForCausalLM``'s logits."""
    import transformers

    base = with_tie(load_base_model(name), tie)
    config = base.config
    spec = UShapeSpec(split_layer=0, rank=base.hidden_size, tail_layers=1, keep_residual=True)
    head, middle, tail = build_ushape_lm_model(base, spec, seed=3)
    cls = transformers.LlamaForCausalLM if name.endswith("llama") else transformers.GPT2LMHeadModel
    hf = cls(config).eval()
    missing, _ = hf.load_state_dict(
        {
            (f"{'model' if name.endswith('llama') else 'transformer'}.{k}"): v
            for k, v in base.random_state.items()
        },
        strict=False,
    )
    if not tie:
        hf.lm_head.weight.data.copy_(tail.lm_head.weight)
    assert (hf.lm_head.weight is hf.get_input_embeddings().weight) == tie
    batch = lm_batches(1, batch=3, seed=9)[0]
    for part in (head, middle, tail):
        part.eval()
    with torch.no_grad():
        cut, residual = head(batch.input_ids, batch.attention_mask)
        second, residual2 = middle(cut, batch.attention_mask, residual)
        ours = tail(second, batch.attention_mask, residual2)
        theirs = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    assert float((ours[mask] - theirs[mask]).abs().max()) <= 1e-4
