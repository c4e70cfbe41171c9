"""The split is wired right: full rank reproduces the unsplit model; factors are the SVD."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from sft_common.cuts.ffn_output import svd_factors
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import (
    build_cloud_half,
    build_edge_half,
    build_full_model,
    build_split_model,
)


def _logits_unsplit(base, batch, seed=3):
    model = build_full_model(base, 2, seed).eval()
    with torch.no_grad():
        return model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            token_type_ids=batch.token_type_ids,
        ).logits


def _logits_split(base, spec, batch, seed=3):
    edge, cloud = build_split_model(base, spec, 2, seed)
    edge.eval(), cloud.eval()
    with torch.no_grad():
        cut, residual = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return cloud(cut, batch.attention_mask, residual)


@pytest.mark.parametrize("base_name", ["tiny_base", "minilm_base"])
@pytest.mark.parametrize("layer", [0, -1])
def test_full_rank_with_residual_equals_unsplit(base_name, layer, request):
    base = request.getfixturevalue(base_name)
    cfg = base.config
    spec = SplitSpec(
        split_layer=layer % cfg.num_hidden_layers,
        rank=min(cfg.hidden_size, cfg.intermediate_size),
        keep_residual=True,
    )
    batch = random_batch(batch=4, seq=16)
    ref = _logits_unsplit(base, batch)
    out = _logits_split(base, spec, batch)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("base_name", ["tiny_base", "minilm_base"])
def test_plain_split_learning_equals_unsplit(base_name, request):
    base = request.getfixturevalue(base_name)
    batch = random_batch(batch=3, seq=10)
    spec = SplitSpec(split_layer=1, mode="sl")
    torch.testing.assert_close(
        _logits_split(base, spec, batch), _logits_unsplit(base, batch), atol=1e-5, rtol=0
    )


def test_low_rank_without_residual_changes_the_output(tiny_base):
    """The SFT model proper (rank 8, no residual) is a different function: the test can fail."""
    batch = random_batch()
    out = _logits_split(tiny_base, SplitSpec(split_layer=3, rank=8), batch)
    assert not torch.allclose(out, _logits_unsplit(tiny_base, batch), atol=1e-3)


@pytest.mark.parametrize("rank", [1, 8, 32])
def test_factors_are_the_truncated_svd(minilm_base, rank):
    l = 5
    W = minilm_base.load([f"encoder.layer.{l}.output.dense.weight"])[f"encoder.layer.{l}.output.dense.weight"]
    u, s, v = svd_factors(W, rank)
    assert u.shape == (1536, rank) and s.shape == (rank,) and v.shape == (rank, 384)
    U, S, Vh = torch.linalg.svd(W.double().t(), full_matrices=False)
    torch.testing.assert_close(s.double(), S[:rank], atol=1e-5, rtol=1e-6)
    # Signs of singular vectors are not unique; the rank-R product is.
    best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
    torch.testing.assert_close((u.double() * s.double()) @ v.double(), best, atol=1e-5, rtol=0)
    # Orthonormal columns / rows.
    torch.testing.assert_close(u.t() @ u, torch.eye(rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(v @ v.t(), torch.eye(rank), atol=1e-5, rtol=0)


def test_factorised_layer_holds_the_factors(minilm_base):
    spec = SplitSpec(split_layer=5, rank=8)
    edge, cloud = build_split_model(minilm_base, spec, 2, seed=0)
    W = minilm_base.load(["encoder.layer.5.output.dense.weight", "encoder.layer.5.output.dense.bias"])
    u, s, v = svd_factors(W["encoder.layer.5.output.dense.weight"], 8)
    torch.testing.assert_close(edge.u.weight, u.t())
    torch.testing.assert_close(cloud.tail.sigma.data, s)
    torch.testing.assert_close(cloud.tail.v.weight, v.t())
    torch.testing.assert_close(cloud.tail.v.bias, W["encoder.layer.5.output.dense.bias"])


@pytest.mark.parametrize("mode", ["sft", "sl"])
def test_separately_built_halves_equal_the_in_process_split(tiny_base, mode):
    spec = SplitSpec(split_layer=2, rank=4, mode=mode)
    edge_ref, cloud_ref = build_split_model(tiny_base, spec, 3, seed=11)
    cloud, u = build_cloud_half(tiny_base, spec, 3, seed=11)
    edge = build_edge_half(tiny_base, spec, u)
    for ref, got in ((edge_ref, edge), (cloud_ref, cloud)):
        ref_state, got_state = ref.state_dict(), got.state_dict()
        assert list(ref_state) == list(got_state)
        for name in ref_state:
            assert torch.equal(ref_state[name], got_state[name]), name


def test_edge_holds_only_net1(minilm_base):
    """The edge never materialises the layers above the cut, the pooler or the head."""
    spec = SplitSpec(split_layer=2, rank=8)
    cloud, u = build_cloud_half(minilm_base, spec, 2, seed=0)
    edge = build_edge_half(minilm_base, spec, u)
    full = build_full_model(minilm_base, 2, seed=0)
    n_edge = sum(p.numel() for p in edge.parameters())
    n_cloud = sum(p.numel() for p in cloud.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert all(p.device.type == "cpu" for p in edge.parameters())
    assert n_edge < n_full and n_edge + n_cloud < n_full  # the FFN output shrank to rank 8
    names = set(edge.state_dict())
    assert not any(n.startswith(("pooler", "classifier", "tail")) for n in names)
    assert sum(1 for n in names if n.startswith("layers.")) == 2 * 16  # layers 0 and 1, 16 tensors each


@pytest.mark.parametrize(
    "spec, message",
    [
        (SplitSpec(split_layer=4), "split layer 4 is out of range"),
        (SplitSpec(split_layer=-1), "out of range"),
        (SplitSpec(split_layer=1, rank=0), "rank 0 is out of range"),
        (SplitSpec(split_layer=1, rank=33), "rank 33 is out of range"),
        (SplitSpec(split_layer=1, mode="pipeline"), "mode must be one of"),
    ],
)
def test_bad_split_specs_are_refused(tiny_base, spec, message):
    with pytest.raises(ValueError, match=message):
        build_split_model(tiny_base, spec, 2, seed=0)


@pytest.mark.parametrize("mode", ["sft", "sl"])
def test_building_halves_draws_nothing_from_the_process_rng(tiny_base, mode):
    """A daemon opens sessions while others compute: a draw from the process-wide RNG here would
    shift the dropout masks of a step running meanwhile (32 concurrent sessions showed it)."""
    spec = SplitSpec(split_layer=2, rank=8, mode=mode)
    state = torch.get_rng_state()
    _, u = build_cloud_half(tiny_base, spec, 2, seed=3)
    build_edge_half(tiny_base, spec, u)
    assert torch.equal(torch.get_rng_state(), state)


def _groups(half):
    """The top-level names of a half's tensors, in order, each once."""
    names = [n.split(".")[0] for n in half.state_dict()]
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


def test_bert_fingerprints_and_tensor_names_do_not_move(tiny_base, minilm_base):
    """The family adapters left BERT as it was: sessions, checkpoints and exports made before
    them still match (fingerprints) and load (the halves' tensor names)."""
    assert tiny_base.fingerprint == "e61a42b0231c407a399a12d212e7397a8a1720e82513f231886f7aad63522cf6"
    assert minilm_base.fingerprint == "933cd5a30939f0da15b2f8e4a6a064dd32af1c3b66a15b963dda24636bae39ab"
    edge, cloud = build_split_model(tiny_base, SplitSpec(split_layer=2, rank=8), 2, seed=0)
    assert _groups(edge) == ["embeddings", "layers", "attention", "intermediate", "u"]
    assert _groups(cloud) == ["tail", "layers", "pooler", "classifier"]
    assert list(edge.state_dict())[-1] == "u.weight"
    assert [n for n in cloud.state_dict() if n.startswith("tail.")] == [
        "tail.sigma", "tail.v.weight", "tail.v.bias", "tail.LayerNorm.weight", "tail.LayerNorm.bias",
    ]  # fmt: skip
