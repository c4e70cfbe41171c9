"""LoRA through PEFT on the halves: output unchanged at init, what trains, the same adapters on
both sides as in one process."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec, head_parameters, lora_on_halves
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import (
    build_cloud_half,
    build_edge_half,
    build_split_model,
    factor_parameters,
)

PRESETS = [
    "random:tiny",
    "random:tiny-roberta",
    "random:tiny-distilbert",
    "random:tiny-gpt2",
    "random:tiny-llama",
    "random:tiny-deberta-v2",
    "random:tiny-modernbert",
]


LORA = LoraSpec(rank=4, alpha=8.0)


def _lora(edge, cloud, base, spec=LORA, seed=3):
    lora_on_halves(edge, cloud, spec.resolved(base.config.model_type), seed)


def _logits(edge, cloud, batch):
    edge.eval(), cloud.eval()
    with torch.no_grad():
        cut, _ = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return cloud(cut, batch.attention_mask)


@pytest.mark.parametrize("name", PRESETS)
def test_wrapping_leaves_the_output_unchanged_and_trains_only_adapters_factors_and_head(name):
    base = load_base_model(name)
    batch = random_batch(batch=3, seq=10)
    edge, cloud = build_split_model(base, SplitSpec(split_layer=2, rank=8), 2, seed=3)
    before = _logits(edge, cloud, batch)
    _lora(edge, cloud, base)
    torch.testing.assert_close(_logits(edge, cloud, batch), before, atol=1e-6, rtol=0)  # B starts at zero
    trainable = {n for half in (edge, cloud) for n, p in half.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert not any("rel_" in n for n in trainable)  # DeBERTa's relative positions are the frozen base's
    factors = {id(p) for p in factor_parameters(edge) + factor_parameters(cloud)}
    head = {id(p) for p in head_parameters(cloud)}
    for half in (edge, cloud):
        for n, p in half.named_parameters():
            assert p.requires_grad == ("lora_" in n or id(p) in factors or id(p) in head), n
    frozen = sum(p.numel() for h in (edge, cloud) for p in h.parameters() if not p.requires_grad)
    assert frozen > 0.5 * sum(p.numel() for h in (edge, cloud) for p in h.parameters())


def test_separately_built_halves_get_the_adapters_of_one_process(tiny_base):
    spec = SplitSpec(split_layer=1, rank=8)
    edge, cloud = build_split_model(tiny_base, spec, 2, seed=5)
    _lora(edge, cloud, tiny_base, seed=5)
    cloud2, u = build_cloud_half(tiny_base, spec, 2, seed=5)
    edge2 = build_edge_half(tiny_base, spec, u)
    _lora(edge2, cloud2, tiny_base, seed=5)
    for a, b in ((edge, edge2), (cloud, cloud2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="--lora-rank must be >= 1"):
        LoraSpec(rank=0).validate()
    with pytest.raises(ValueError, match="no default --lora-targets"):
        LoraSpec().resolved("electra")
