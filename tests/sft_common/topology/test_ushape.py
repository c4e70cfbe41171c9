"""The U-shaped split is wired right: full rank with the residuals kept reproduces the unsplit
model; the parts built on each side equal the one-process parts; gradients passed by hand across
both cuts train exactly what one backward through the assembled model trains."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec, head_parameters
from sft_common.topology.two_part import build_full_model, task_loss
from sft_common.topology.ushape import (
    EdgeFactors,
    UShapeSpec,
    build_ushape_cloud,
    build_ushape_edge,
    build_ushape_model,
    lora_part,
    part_factors,
)

PRESETS = ["random:tiny", "random:tiny-llama", "random:tiny-gpt2"]
CUTS = [(0, 1), (1, 1), (0, 2)]  # (first cut l1, tail layers N) in a 4-layer model


@pytest.fixture(scope="module", params=PRESETS)
def base(request):
    return load_base_model(request.param)


def _u_forward(parts, batch):
    """The three parts chained: logits."""
    head, middle, tail = parts
    cut, residual = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    cut, residual = middle(cut, batch.attention_mask, residual)
    return tail(cut, batch.attention_mask, residual)


def _logits(parts, batch):
    for part in parts:
        part.eval()
    with torch.no_grad():
        return _u_forward(parts, batch)


def _logits_unsplit(base, batch, seed=3):
    model = build_full_model(base, 2, seed).eval()
    kwargs = {} if base.family.decoder else {"token_type_ids": batch.token_type_ids}
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits


@pytest.mark.parametrize("first, tail_layers", CUTS)
def test_full_rank_with_residuals_equals_unsplit(base, first, tail_layers):
    full_rank = min(base.hidden_size, base.intermediate_size)
    spec = UShapeSpec(first, rank=full_rank, tail_layers=tail_layers, keep_residual=True)
    batch = random_batch(batch=4, seq=16)
    out = _logits(build_ushape_model(base, spec, 2, seed=3), batch)
    torch.testing.assert_close(out, _logits_unsplit(base, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("first, tail_layers", CUTS)
def test_ffn_input_at_full_rank_equals_unsplit_without_residuals(base, first, tail_layers):
    """At the FFN input the residual crosses inside the R values: at R = hidden, B A = I at both
    cuts and the U is the unsplit model, with nothing kept aside."""
    spec = UShapeSpec(first, rank=base.hidden_size, tail_layers=tail_layers, factorise="ffn-input")
    batch = random_batch(batch=4, seq=16)
    out = _logits(build_ushape_model(base, spec, 2, seed=3), batch)
    torch.testing.assert_close(out, _logits_unsplit(base, batch), atol=1e-5, rtol=0)


def test_plain_split_learning_equals_unsplit(base):
    batch = random_batch(batch=3, seq=10)
    parts = build_ushape_model(base, UShapeSpec(1, mode="sl"), 2, seed=3)
    torch.testing.assert_close(_logits(parts, batch), _logits_unsplit(base, batch), atol=1e-5, rtol=0)


def test_low_rank_without_residuals_changes_the_output(base):
    """The SFT U proper (rank 8, no residuals) is a different function: the test above can fail."""
    batch = random_batch()
    out = _logits(build_ushape_model(base, UShapeSpec(0, rank=8), 2, seed=3), batch)
    assert not torch.allclose(out, _logits_unsplit(base, batch), atol=1e-3)


@pytest.mark.parametrize(
    "mode, factorise", [("sft", "ffn-output"), ("sl", "ffn-output"), ("sft", "ffn-input")]
)
def test_parts_built_on_each_side_equal_the_in_process_parts(base, mode, factorise):
    spec = UShapeSpec(0, rank=4, tail_layers=2, mode=mode, factorise=factorise)
    reference = build_ushape_model(base, spec, 3, seed=11)
    middle, factors = build_ushape_cloud(base, spec)
    head, tail = build_ushape_edge(base, spec, 3, seed=11, factors=factors)
    assert (factors is None) == (mode == "sl")
    for ref, got in zip(reference, (head, middle, tail)):
        ref_state, got_state = ref.state_dict(), got.state_dict()
        assert list(ref_state) == list(got_state)
        for name in ref_state:
            assert torch.equal(ref_state[name], got_state[name]), name


def _groups(part):
    """The top-level names of a part's tensors, in order, each once."""
    names = [n.split(".")[0] for n in part.state_dict()]
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


def test_each_side_holds_only_its_own_layers(tiny_base):
    """BERT, l1 = 0, N = 1: the edge holds layer 0's bottom and layer 3; the cloud layers 1, 2."""
    spec = UShapeSpec(0, rank=8, tail_layers=1)
    middle, factors = build_ushape_cloud(tiny_base, spec)
    head, tail = build_ushape_edge(tiny_base, spec, 2, seed=0, factors=factors)
    assert _groups(head) == ["embeddings", "attention", "intermediate", "u"]
    assert _groups(middle) == ["tail", "layers", "attention", "intermediate", "u"]
    assert _groups(tail) == ["tail", "layers", "pooler", "classifier"]
    assert sum(1 for n in middle.state_dict() if n.startswith("layers.")) == 16  # layer 1 only
    assert sum(1 for n in tail.state_dict() if n.startswith("layers.")) == 16  # layer 3 only
    assert factors is not None
    assert factors.u.shape == (64, 8) and factors.sigma.shape == (8,) and factors.v.shape == (8, 32)
    for part in (head, middle, tail):
        assert all(t.device.type == "cpu" for t in part.state_dict().values())


def test_each_side_reads_only_its_own_base_tensors(tiny_base, monkeypatch):
    """l1 = 0, l2 = 2: the edge never reads W1 or W2, the cloud no embeddings, layer 3 or head."""
    read = []
    load = tiny_base.load

    def spy(names):
        names = list(names)
        read.extend(names)
        return load(names)

    monkeypatch.setattr(tiny_base, "load", spy)
    spec = UShapeSpec(0, rank=8, tail_layers=1)
    _, factors = build_ushape_cloud(tiny_base, spec)
    cloud, read[:] = set(read), []
    build_ushape_edge(tiny_base, spec, 2, seed=0, factors=factors)
    edge = set(read)
    assert {"encoder.layer.0.output.dense.weight", "encoder.layer.2.output.dense.weight"} <= cloud
    assert not any(n.startswith(("embeddings.", "encoder.layer.3.", "pooler.")) for n in cloud)
    assert not {"encoder.layer.0.output.dense.weight", "encoder.layer.2.output.dense.weight"} & edge
    assert "encoder.layer.2.output.dense.bias" in edge and "encoder.layer.2.output.LayerNorm.weight" in edge
    assert {"embeddings.word_embeddings.weight", "encoder.layer.3.output.dense.weight"} <= edge
    assert not any(n.startswith("encoder.layer.1.") for n in edge)


def test_building_the_parts_draws_nothing_from_the_process_rng(tiny_base):
    spec = UShapeSpec(1, rank=8)
    state = torch.get_rng_state()
    _, factors = build_ushape_cloud(tiny_base, spec)
    build_ushape_edge(tiny_base, spec, 2, seed=3, factors=factors)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "spec, message",
    [
        (UShapeSpec(0, tail_layers=0), "tail layers must be >= 1"),
        (UShapeSpec(2, tail_layers=1), "split layer 2 and 1 tail layers leave the cloud no layer"),
        (
            UShapeSpec(1, tail_layers=2),
            r"the cloud needs at least one between them \(split layer \+ 1 < 4 - tail",
        ),
        (UShapeSpec(0, tail_layers=3), "the edge runs up to layer 0 and the last 3"),
        (UShapeSpec(4), "split layer 4 is out of range"),
        (UShapeSpec(-1), "out of range"),
        (UShapeSpec(0, rank=0), "rank 0 is out of range"),
        (UShapeSpec(0, rank=33), "rank 33 is out of range"),
        (UShapeSpec(0, mode="pipeline"), "mode must be one of"),
    ],
)
def test_bad_specs_are_refused(tiny_base, spec, message):
    with pytest.raises(ValueError, match=message):
        build_ushape_model(tiny_base, spec, 2, seed=0)


def test_edge_refuses_missing_or_misshapen_factors(tiny_base):
    spec = UShapeSpec(0, rank=8)
    _, factors = build_ushape_cloud(tiny_base, spec)
    assert factors is not None
    with pytest.raises(ValueError, match="needs the cloud's factors"):
        build_ushape_edge(tiny_base, spec, 2, seed=0, factors=None)
    bad = EdgeFactors(factors.u, factors.sigma, factors.v.t())
    with pytest.raises(ValueError, match=r"Σ2, v2 must have shapes \(8,\) and \(8, 32\)"):
        build_ushape_edge(tiny_base, spec, 2, seed=0, factors=bad)


def _lora(parts, base, seed):
    lora = LoraSpec(rank=4, alpha=8.0).resolved(base.config.model_type)
    for which, part in zip(("head", "middle", "tail"), parts):
        lora_part(part, which, lora, seed)


def _trainable(part):
    return [p for p in part.parameters() if p.requires_grad]


def _train_end_to_end(parts, batches):
    """One optimizer over the assembled model, one backward per step."""
    optimizer = torch.optim.AdamW([p for part in parts for p in _trainable(part)], lr=1e-3)
    losses = []
    for step, batch in enumerate(batches):
        torch.manual_seed(step)  # the same dropout masks in both runs
        loss = task_loss(_u_forward(parts, batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _train_by_hand(parts, batches):
    """One optimizer a part; the gradient crosses each cut by hand, as the protocol will carry it:
    the tail computes the loss and backprops to â2, the middle from ∂â2 to â1, the head from ∂â1."""
    head, middle, tail = parts
    optimizers = [torch.optim.AdamW(_trainable(part), lr=1e-3) for part in parts]
    losses = []
    for step, batch in enumerate(batches):
        torch.manual_seed(step)
        mask = batch.attention_mask
        first, _ = head(batch.input_ids, mask, batch.token_type_ids)
        first_in = first.detach().requires_grad_()  # what the cloud receives
        second, _ = middle(first_in, mask)
        second_in = second.detach().requires_grad_()  # what the edge's tail receives
        loss = task_loss(tail(second_in, mask), batch.labels)
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        second.backward(second_in.grad)  # ∂loss/∂â2, sent up to the cloud
        first.backward(first_in.grad)  # ∂loss/∂â1, sent down to the edge
        for part in parts:
            assert all(p.grad is not None for p in _trainable(part)), type(part).__name__
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["random:tiny", "random:tiny-llama"])
def test_gradients_passed_by_hand_train_what_one_backward_trains(name, lora):
    """5 steps, dropout on (BERT): the same losses and parameters within 1e-6, and every part moved."""
    base = load_base_model(name)
    spec = UShapeSpec(0, rank=8, tail_layers=1)
    batches = [random_batch(batch=4, seq=12, seed=s) for s in range(5)]
    reference = build_ushape_model(base, spec, 2, seed=5)
    parts = build_ushape_model(base, spec, 2, seed=5)
    before = [{n: p.detach().clone() for n, p in part.named_parameters()} for part in parts]
    if lora:
        _lora(reference, base, seed=5)
        _lora(parts, base, seed=5)
        for part, which in zip(parts, ("head", "middle", "tail")):  # adapters, factors, the tail's head
            kept = {id(p) for p in part_factors(part) + (head_parameters(part) if which == "tail" else [])}
            assert kept and any("lora_A" in n for n, _ in part.named_parameters())
            for n, p in part.named_parameters():
                assert p.requires_grad == ("lora_" in n or id(p) in kept), n
    for part in (*reference, *parts):
        part.train()
    ref_losses = _train_end_to_end(reference, batches)
    losses = _train_by_hand(parts, batches)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), atol=1e-6, rtol=0)
    for ref, got, start in zip(reference, parts, before):
        ref_params = dict(ref.named_parameters())
        for n, p in got.named_parameters():
            torch.testing.assert_close(p, ref_params[n], atol=1e-6, rtol=0, msg=n)
        moved = [n for n, p in got.named_parameters() if n in start and not torch.equal(p, start[n])]
        assert moved and all(n in moved for n, p in got.named_parameters() if p.requires_grad and n in start)


def test_deberta_is_refused_by_name():
    """Its relative-position embeddings serve every layer: three parts would each train a copy."""
    with pytest.raises(ValueError, match="U-shape does not support DeBERTa-v2"):
        build_ushape_model(load_base_model("random:tiny-deberta-v2"), UShapeSpec(0), 2, seed=3)
