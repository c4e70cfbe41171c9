"""Each cut (``sft_common.cuts.CUTS``) leaves the model's output unchanged at full rank, in the
two-part split and in the U, built in one process and on each side; its receiving side takes the
factors it sends. A new cut class gets these tests by its row in ``FULL_RANK``."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from sft_common.cuts import CUTS, Cut, FFNInputCut, FFNOutputCut, FullWidth, cut_of
from sft_common.models.base_model import load_base_model
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import (
    build_cloud_half,
    build_edge_half,
    build_full_model,
    build_split_model,
)
from sft_common.topology.ushape import UShapeSpec, build_ushape_cloud, build_ushape_edge, build_ushape_model

PRESETS = ["random:tiny", "random:tiny-llama", "random:tiny-gpt2"]


def _full_rank(kind, base):
    """The spec settings at which ``kind`` is exact: (rank, keep_residual). The FFN-output cut
    drops the residual unless it is kept aside; the FFN-input cut carries it at R = hidden."""
    table = {
        FullWidth: (1, False),
        FFNOutputCut: (min(base.hidden_size, base.intermediate_size), True),
        FFNInputCut: (base.hidden_size, False),
    }
    return table[kind]


KINDS = {kind: key for key, kind in CUTS.items()}


@pytest.fixture(scope="module", params=PRESETS)
def base(request):
    return load_base_model(request.param)


def _unsplit(base, batch, seed=3):
    model = build_full_model(base, 2, seed).eval()
    kwargs = {} if base.family.decoder else {"token_type_ids": batch.token_type_ids}
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits


def _chain(parts, batch):
    """The parts run in order, activations and residuals handed on: the last part's logits."""
    for part in parts:
        part.eval()
    with torch.no_grad():
        cut, residual = parts[0](batch.input_ids, batch.attention_mask, batch.token_type_ids)
        for part in parts[1:-1]:
            cut, residual = part(cut, batch.attention_mask, residual)
        return parts[-1](cut, batch.attention_mask, residual)


def test_every_spec_resolves_to_its_cut():
    for (mode, factorise), kind in CUTS.items():
        cut = cut_of(SplitSpec(1, rank=5, mode=mode, factorise=factorise))
        assert type(cut) is kind and isinstance(cut, Cut) and cut.rank == 5
    with pytest.raises(ValueError, match="no cut"):
        cut_of(SplitSpec(1, mode="sl", factorise="ffn-input"))


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.__name__)
def test_two_part_at_full_rank_equals_unsplit(base, kind):
    mode, factorise = KINDS[kind]
    rank, keep = _full_rank(kind, base)
    spec = SplitSpec(1, rank=rank, mode=mode, keep_residual=keep, factorise=factorise)
    assert type(spec.cut) is kind
    batch = random_batch(batch=3, seq=10)
    ref = _unsplit(base, batch)
    torch.testing.assert_close(
        _chain(build_split_model(base, spec, 2, seed=3), batch), ref, atol=1e-5, rtol=0
    )
    if not keep:  # built on each side (the residual kept aside is in-process only)
        cloud, factor = build_cloud_half(base, spec, 2, seed=3)
        edge = build_edge_half(base, spec, factor)
        torch.testing.assert_close(_chain((edge, cloud), batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.__name__)
def test_ushape_at_full_rank_equals_unsplit(base, kind):
    mode, factorise = KINDS[kind]
    rank, keep = _full_rank(kind, base)
    spec = UShapeSpec(0, rank=rank, tail_layers=1, mode=mode, keep_residual=keep, factorise=factorise)
    batch = random_batch(batch=3, seq=10)
    ref = _unsplit(base, batch)
    torch.testing.assert_close(
        _chain(build_ushape_model(base, spec, 2, seed=3), batch), ref, atol=1e-5, rtol=0
    )
    if not keep:
        middle, factors = build_ushape_cloud(base, spec)
        head, tail = build_ushape_edge(base, spec, 2, seed=3, factors=factors)
        torch.testing.assert_close(_chain((head, middle, tail), batch), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS), ids=lambda k: k.__name__)
def test_width_and_factor_shape(base, kind):
    mode, factorise = KINDS[kind]
    spec = SplitSpec(1, rank=3, mode=mode, factorise=factorise)
    cloud, factor = build_cloud_half(base, spec, 2, seed=0)
    edge = build_edge_half(base, spec, factor)
    shape = spec.cut.edge_factor_shape(base.hidden_size, base.intermediate_size)
    assert (factor is None) == (shape is None) == (spec.cut.factor is None)
    if factor is not None:
        assert tuple(factor.shape) == shape
    batch = random_batch(batch=2, seq=6)
    cut, _ = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    assert cut.shape == (2, 6, spec.cut_width(base.hidden_size))
