"""The FFN-input cut (--factorise ffn-input): at full rank the split model is the unsplit one; its
factors are the SVD of the FFN input as the layer applies it; each half holds only its own part."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from sft_common.cuts import input_cut
from sft_common.models.base_model import ModelError, load_base_model
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.topology.two_part import (
    build_cloud_half,
    build_edge_half,
    build_full_model,
    build_split_model,
    factor_parameters,
    trained_skeleton,
)

PRESETS = [
    "tiny", "tiny-roberta", "tiny-xlm-roberta", "tiny-distilbert", "tiny-deberta-v2", "tiny-modernbert",
    "tiny-modernbert-mean", "tiny-gpt2", "tiny-llama", "tiny-qwen2",
]  # fmt: skip
HIDDEN = 32  # every tiny preset: hidden 32, 4 layers, intermediate 64


def _spec(layer=2, rank=8, **kw):
    return SplitSpec(split_layer=layer, rank=rank, factorise="ffn-input", **kw)


@pytest.fixture(scope="module", params=PRESETS)
def base(request):
    try:
        return load_base_model(f"random:{request.param}")
    except ModelError as exc:  # a family this transformers is too old for
        pytest.skip(str(exc))


def _unsplit(base, batch, seed=3):
    model = build_full_model(base, 2, seed).eval()
    types = not (base.family.decoder or base.config.model_type == "distilbert")
    kw = {"token_type_ids": batch.token_type_ids} if types else {}
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw).logits


def _split(edge, cloud, batch):
    edge.eval(), cloud.eval()
    with torch.no_grad():
        cut, residual = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        assert residual is None and cut.shape[-1] == edge.spec.rank  # R values a token, nothing else
        return cloud(cut, batch.attention_mask)


@pytest.mark.parametrize("layer", [0, 2])
def test_full_rank_equals_the_unsplit_model(base, layer):
    """R = hidden: B A = I, so the residual and the FFN input pass unchanged (measured: at most
    6e-8 on every family)."""
    batch = random_batch(batch=4, seq=16)
    edge, cloud = build_split_model(base, _spec(layer, HIDDEN), 2, seed=3)
    torch.testing.assert_close(_split(edge, cloud, batch), _unsplit(base, batch), atol=1e-5, rtol=0)


def test_low_rank_is_another_function(base):
    batch = random_batch()
    edge, cloud = build_split_model(base, _spec(2, 4), 2, seed=3)
    assert not torch.allclose(_split(edge, cloud, batch), _unsplit(base, batch), atol=1e-3)


def _ffn_input(family_type, layer):
    """The FFN input weight as the layer applies it to r, written out per family (not through
    ``Family.ffn_in_weight``): gate and up stacked, Conv1D transposed, the pre-LN norm's scale in."""
    if family_type in ("llama", "qwen2"):
        mlp = layer.mlp
        return torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]) @ torch.diag(
            layer.post_attention_layernorm.weight
        )
    if family_type == "gpt2":
        return layer.mlp.c_fc.weight.t() @ torch.diag(layer.ln_2.weight)
    if family_type == "modernbert":
        return layer.mlp.Wi.weight @ torch.diag(layer.mlp_norm.weight)
    if family_type == "distilbert":
        return layer.ffn.lin1.weight
    return layer.intermediate.dense.weight


@pytest.mark.parametrize("rank", [1, 8])
def test_factors_are_the_truncated_svd_of_the_ffn_input(base, rank):
    """A B = I_R, and W_in B A is the rank-R truncated SVD of W_in · diag(γ): the FFN input at
    initialisation is the paper's code's factorisation. The norms' scales are drawn first, so that
    leaving γ out would fail."""
    model = build_full_model(base, 2, seed=0)
    layer = base.family.layers(model)[1]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name.lower() or name.startswith("ln_"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    cut, v = input_cut.factorise_input(base.family, layer, rank)
    a, b = cut.a.weight.detach(), cut.b.weight.detach()
    assert a.shape == (rank, HIDDEN) and b.shape == (HIDDEN, rank) and torch.equal(v, b)
    torch.testing.assert_close(a @ b, torch.eye(rank), atol=1e-5, rtol=0)
    W = _ffn_input(base.config.model_type, layer).detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    torch.testing.assert_close(W @ b.double() @ a.double(), best, atol=1e-5, rtol=0)


def test_separately_built_halves_equal_the_in_process_split(base):
    spec = _spec(2, 8)
    edge_ref, cloud_ref = build_split_model(base, spec, 3, seed=11)
    state = torch.get_rng_state()
    cloud, v = build_cloud_half(base, spec, 3, seed=11)
    edge = build_edge_half(base, spec, v)
    assert torch.equal(torch.get_rng_state(), state)  # no draws from the process-wide RNG
    assert v is not None and v.shape == (HIDDEN, 8)  # what SessionOpened.edge_factor carries: Aᵀ
    for ref, got in ((edge_ref, edge), (cloud_ref, cloud)):
        ref_state, got_state = ref.state_dict(), got.state_dict()
        assert list(ref_state) == list(got_state)
        for name in ref_state:
            assert torch.equal(ref_state[name], got_state[name]), name
    batch = random_batch(num_labels=3)
    torch.testing.assert_close(_split(edge, cloud, batch), _split(edge_ref, cloud_ref, batch))


def test_each_half_holds_its_own_part_of_the_cut_layer(base):
    """The edge: layer l's attention part and A, nothing of its FFN; the cloud: B and layer l's
    FFN, nothing of its attention; no parameter in both."""
    spec = _spec(1, 8)
    edge, cloud = build_split_model(base, spec, 2, seed=0)
    family, full = base.family, build_full_model(base, 2, 0)
    layer = family.layers(full)[1]
    attend, ffn_in = set(family.attend_parts(layer)), set(family.ffn_in_parts(layer))
    edge_top = {n.split(".")[0] for n in edge.state_dict()}
    tail = {n.split(".")[1] for n in cloud.state_dict() if n.startswith("tail.")}
    assert attend <= edge_top and not ffn_in & edge_top and "a" in edge_top
    weighted = {n for n, m in family.ffn_in_parts(layer).items() if next(m.parameters(), None) is not None}
    assert {"b", "ffn_out"} | weighted <= tail and weighted
    assert not attend & tail and not edge_top & {"tail", "u"}
    assert not {id(p) for p in edge.parameters()} & {id(p) for p in cloud.parameters()}
    edge_factors, cloud_factors = factor_parameters(edge), factor_parameters(cloud)
    assert [p.shape for p in edge_factors] == [(8, HIDDEN)]
    assert [p.shape for p in cloud_factors] == [(HIDDEN, 8)]
    assert edge_factors[0] is edge.a.weight and cloud_factors[0] is cloud.tail.b.weight


def test_trained_skeleton_loads_an_export(base):
    """An export (both halves' state dicts) of an ffn-input run loads into trained_skeleton."""
    spec = _spec(2, 8)
    edge, cloud = build_split_model(base, spec, 3, seed=5)
    edge2, cloud2 = trained_skeleton(base.config, spec, 3)
    edge2.load_state_dict(edge.state_dict()), cloud2.load_state_dict(cloud.state_dict())
    batch = random_batch(num_labels=3)
    torch.testing.assert_close(_split(edge2, cloud2, batch), _split(edge, cloud, batch))


@pytest.mark.parametrize(
    "spec, message",
    [
        (_spec(1, 33), "rank 33 is out of range: the FFN-input cut's bottleneck reads the 32-wide"),
        (_spec(1, 0), "rank 0 is out of range"),
        (SplitSpec(1, 8, "sl", factorise="ffn-input"), "--factorise ffn-input needs --mode sft"),
        (_spec(1, 8, keep_residual=True), "keep_residual is for the FFN-output cut"),
        (SplitSpec(1, 8, factorise="ffn-middle"), "factorise must be one of ffn-output, ffn-input"),
    ],
)
def test_bad_input_cut_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        spec.validate(4, HIDDEN, 64)


def test_the_default_fingerprint_is_unchanged_and_ffn_input_has_its_own():
    """Computed with the code before SplitSpec.factorise existed (BERT's tiny fingerprint, layer
    2, R=8, 2 labels): sessions, checkpoints and runs made before it still match."""
    base = "e61a42b0231c407a399a12d212e7397a8a1720e82513f231886f7aad63522cf6"
    plain = session_fingerprint(base, SplitSpec(split_layer=2, rank=8), 2)
    assert plain == "a914bc60e94d435ac6b00f8a2a970a00ee6a6f9432aab9b2b5284c78652774f1"
    assert session_fingerprint(base, SplitSpec(2, 8, factorise="ffn-output"), 2) == plain
    assert session_fingerprint(base, _spec(2, 8), 2) not in (plain, session_fingerprint(base, _spec(2, 4), 2))
