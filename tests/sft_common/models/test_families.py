"""Every family splits right: our halves against Hugging Face's own classes, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import random_batch

from sft_common.models.base_model import RANDOM_PRESETS, ModelError, load_base_model, packaged_minilm_dir
from sft_common.models.families import FAMILIES
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import (
    build_cloud_half,
    build_edge_half,
    build_full_model,
    build_split_model,
    trained_skeleton,
)

# One tiny random preset per family (hidden 32, 4 layers, 4 heads, intermediate 64).
PRESETS = [
    "tiny",
    "tiny-roberta",
    "tiny-xlm-roberta",
    "tiny-distilbert",
    "tiny-deberta-v2",
    "tiny-modernbert",
    "tiny-modernbert-mean",  # ModernBERT pooling the mean of the real tokens instead of [CLS]
    "tiny-gpt2",
    "tiny-llama",
    "tiny-qwen2",
]
NEW = PRESETS[1:]


def _load(preset):
    try:
        return load_base_model(f"random:{preset}")
    except ModelError as exc:  # a family this transformers is too old for
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=PRESETS)
def base(request):
    return _load(request.param)


def _hf_reference(base, model):
    """Hugging Face's own classifier, its backbone loaded from the base weights directly and its
    head from ``model`` (the seeded head is ours): minGPT's test of its GPT against HF's."""
    family = base.family
    ref = family.model_class(1)(model.config).eval()
    missing, unexpected = getattr(ref, family.prefix).load_state_dict(base.random_state, strict=False)
    assert not missing and all(k.startswith("pooler.") for k in unexpected)  # RoBERTa's has none
    head = {k: v for k, v in model.state_dict().items() if not k.startswith(family.prefix + ".")}
    missing, unexpected = ref.load_state_dict(head, strict=False)
    assert not unexpected and all(k.startswith(family.prefix + ".") for k in missing)
    return ref


def _hf_logits(base, ref, batch):
    kw = (
        {}
        if base.family.decoder or base.config.model_type == "distilbert"
        else {"token_type_ids": batch.token_type_ids}
    )
    with torch.no_grad():
        return ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kw).logits


def _split_logits(edge, cloud, batch):
    edge.eval(), cloud.eval()
    with torch.no_grad():
        cut, residual = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return cloud(cut, batch.attention_mask, residual)


def test_every_preset_family_is_covered():
    assert {RANDOM_PRESETS[p][0] for p in PRESETS} == {f.model_types[0] for f in FAMILIES}


def test_geometry_holds_for_every_family(base):
    assert (base.num_hidden_layers, base.hidden_size, base.intermediate_size) == (4, 32, 64)
    assert base.max_position_embeddings >= 512
    # Random presets use the packaged MiniLM tokenizer, decoders too: its ids fit every vocabulary.
    assert base.tokenizer_dir == str(packaged_minilm_dir()) and base.config.vocab_size == 30522


@pytest.mark.parametrize("layer", [0, 3])
def test_full_rank_with_residual_equals_hugging_face(base, layer):
    batch = random_batch(batch=4, seq=16)  # varied lengths, right-padded with 0
    spec = SplitSpec(split_layer=layer, rank=32, keep_residual=True)
    edge, cloud = build_split_model(base, spec, 2, seed=3)
    want = _hf_logits(base, _hf_reference(base, build_full_model(base, 2, seed=3)), batch)
    torch.testing.assert_close(_split_logits(edge, cloud, batch), want, atol=1e-5, rtol=0)


def test_plain_split_learning_equals_hugging_face(base):
    batch = random_batch(batch=3, seq=10)
    edge, cloud = build_split_model(base, SplitSpec(split_layer=1, mode="sl"), 2, seed=3)
    want = _hf_logits(base, _hf_reference(base, build_full_model(base, 2, seed=3)), batch)
    torch.testing.assert_close(_split_logits(edge, cloud, batch), want, atol=1e-5, rtol=0)


def test_full_rank_without_residual_runs_and_is_another_function(base):
    """The paper's SFT model (no residual at the cut), applied literally to every family."""
    batch = random_batch(batch=4, seq=12, num_labels=3)
    edge, cloud = build_split_model(base, SplitSpec(split_layer=2, rank=32), 3, seed=3)
    edge.eval(), cloud.eval()
    with torch.no_grad():
        cut, residual = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        logits = cloud(cut, batch.attention_mask)
    assert cut.shape == (4, 12, 32) and residual is None and logits.shape == (4, 3)
    assert torch.isfinite(logits).all()
    want = _hf_logits(base, _hf_reference(base, build_full_model(base, 3, seed=3)), batch)
    assert not torch.allclose(logits, want, atol=1e-3)


def test_the_cloud_zero_padding_changes_nothing(base):
    """The cloud re-pads activations with zeros; pooling reads each example's last real token
    (decoders) or its first (encoders), so what sits at padded positions does not matter."""
    batch = random_batch(batch=5, seq=14)
    edge, cloud = build_split_model(base, SplitSpec(split_layer=1, rank=8), 2, seed=3)
    edge.eval(), cloud.eval()
    with torch.no_grad():
        cut, _ = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        zeroed = cut * batch.attention_mask[..., None]
        torch.testing.assert_close(
            cloud(zeroed, batch.attention_mask), cloud(cut, batch.attention_mask), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("mode", ["sft", "sl"])
def test_separately_built_halves_equal_the_in_process_split(base, mode):
    spec = SplitSpec(split_layer=2, rank=4, mode=mode)
    edge_ref, cloud_ref = build_split_model(base, spec, 3, seed=11)
    cloud, u = build_cloud_half(base, spec, 3, seed=11)
    edge = build_edge_half(base, spec, u)
    for ref, got in ((edge_ref, edge), (cloud_ref, cloud)):
        ref_state, got_state = ref.state_dict(), got.state_dict()
        assert list(ref_state) == list(got_state)
        for name in ref_state:
            assert torch.equal(ref_state[name], got_state[name]), name
    batch = random_batch()
    torch.testing.assert_close(_split_logits(edge, cloud, batch), _split_logits(edge_ref, cloud_ref, batch))


def test_each_half_holds_only_its_own_weights(base):
    spec = SplitSpec(split_layer=1, rank=8)
    cloud, u = build_cloud_half(base, spec, 2, seed=0)
    edge = build_edge_half(base, spec, u)
    head = {n.split(".")[0] for n in base.family.head(build_full_model(base, 2, 0))}
    edge_names, cloud_names = set(edge.state_dict()), set(cloud.state_dict())
    assert not any(n.split(".")[0] in head | {"tail", "norm"} for n in edge_names)
    assert not any(
        n.split(".")[0] in set(base.family.embeddings(build_full_model(base, 2, 0))) for n in cloud_names
    )
    assert sum(p.numel() for p in edge.parameters()) + sum(p.numel() for p in cloud.parameters()) < sum(
        p.numel() for p in build_full_model(base, 2, 0).parameters()
    )


def test_no_parameter_is_held_by_both_halves(base):
    """Built in one process (the reference) or as an export loads them, the cloud's half owns its
    copy of what both run (DeBERTa's relative embeddings), as a separately built half does."""
    spec = SplitSpec(split_layer=2, rank=8)
    for edge, cloud in (build_split_model(base, spec, 2, seed=0), trained_skeleton(base.config, spec, 2)):
        assert not {id(p) for p in edge.parameters()} & {id(p) for p in cloud.parameters()}


def test_building_halves_draws_nothing_from_the_process_rng(base):
    state = torch.get_rng_state()
    _, u = build_cloud_half(base, SplitSpec(split_layer=2, rank=8), 2, seed=3)
    build_edge_half(base, SplitSpec(split_layer=2, rank=8), u)
    assert torch.equal(torch.get_rng_state(), state)


def test_trained_skeleton_loads_an_export(base):
    """What `sft-edge export` writes (both halves' state dicts) loads into trained_skeleton; the
    buffers no state dict carries (positions, rotary frequencies) are recomputed."""
    spec = SplitSpec(split_layer=2, rank=8)
    edge, cloud = build_split_model(base, spec, 3, seed=5)
    edge2, cloud2 = trained_skeleton(base.config, spec, 3)
    edge2.load_state_dict(edge.state_dict()), cloud2.load_state_dict(cloud.state_dict())
    batch = random_batch(num_labels=3)
    torch.testing.assert_close(_split_logits(edge2, cloud2, batch), _split_logits(edge, cloud, batch))
    full = build_full_model(base, 3, seed=5).eval()
    full2 = trained_skeleton(base.config, None, 3)
    full2.load_state_dict(full.state_dict())
    full2.eval()
    torch.testing.assert_close(_hf_logits(base, full2, batch), _hf_logits(base, full, batch))


@pytest.mark.parametrize("preset", NEW)
def test_a_saved_classifier_folder_loads_with_its_prefix_stripped(tmp_path, preset):
    """A folder written by HF's save_pretrained (keys ``roberta.``, ``transformer.``, ``model.``,
    ...) resolves through AutoConfig, and the backbone weights land where the random ones were."""
    base = _load(preset)
    full = build_full_model(base, 2, seed=1)
    full.save_pretrained(tmp_path)
    folder = load_base_model(str(tmp_path))
    assert type(folder.config) is type(base.config) and folder.family is base.family
    again = build_full_model(folder, 2, seed=1)
    for (name, want), (_, got) in zip(full.state_dict().items(), again.state_dict().items()):
        assert torch.equal(want, got), name


def test_families_are_refused_on_a_transformers_too_old_for_them():
    import transformers

    from sft_common.models.families import Family

    class Future(Family):
        name, since = "Future", (99, 0)

    assert (
        Future().refusal(None) == f"Future needs transformers >= 99.0 (installed: {transformers.__version__})"
    )
    assert Family().refusal(None) is None

    class Gone(Family):  # a transformers without the family's classes, whatever its version
        name, classes = "Gone", ("GoneModel", "GoneForSequenceClassification", "GoneConfig")

    assert Gone().refusal(None) == f"Gone needs transformers >= 4.40 (installed: {transformers.__version__})"


@pytest.mark.parametrize(
    ("preset", "model_type", "version", "message"),
    [
        ("tiny-deberta-v2", "deberta-v2", "4.46.3", "DeBERTa-v2 needs transformers >= 4.47"),
        ("tiny-modernbert", "modernbert", "5.0.0", "ModernBERT needs transformers >= 5.1"),
    ],
)
def test_new_families_are_refused_by_name_on_an_older_transformers(
    monkeypatch, tmp_path, preset, model_type, version, message
):
    """Before its config class or AutoConfig is asked (ModernBERT's classes arrived in 4.48, its
    padded 5.1 layers in 5.1; transformers 4.40.2 itself refuses both, checked by hand)."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    want = rf"\({message.split()[0]}\) cannot be split: {message} \(installed: {version}\)"
    with pytest.raises(ModelError, match=want):
        load_base_model(f"random:{preset}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ModelError, match=want):
        load_base_model(str(tmp_path))


def test_deberta_v2_with_the_convolution_after_layer_0_is_refused():
    from transformers import DebertaV2Config

    from sft_common.models.base_model import BaseModel

    config = DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, conv_kernel_size=3)
    with pytest.raises(ModelError, match="DeBERTa-v2.*convolution after layer 0"):
        build_full_model(BaseModel("d", config, "", ""), 2, 0)


def test_modernbert_head_norm_starts_at_one_as_hugging_face_initialises_it():
    """A base checkpoint lacks the classifier's head (dense, act, norm): its norm scale starts at
    1, not 0 (which would silence the head), its dense from the seed."""
    model = build_full_model(_load("tiny-modernbert"), 2, seed=1)
    assert torch.equal(model.head.norm.weight, torch.ones(32)) and model.head.dense.weight.std() > 0.01


def test_gpt2_without_n_inner_is_four_times_wider():
    _load("tiny-gpt2")
    from transformers import GPT2Config

    from sft_common.models.base_model import BaseModel

    base = BaseModel("x", GPT2Config(n_embd=32, n_layer=2, n_head=4), "", "")
    assert (base.intermediate_size, base.hidden_size, base.num_hidden_layers) == (128, 32, 2)


def test_an_unsupported_family_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 32}))
    with pytest.raises(
        ModelError, match=r"model_type 't5', which cannot be split; supported: BERT \(bert\), "
    ):
        load_base_model(str(tmp_path))
    from transformers import T5Config

    with pytest.raises(ModelError, match="GPT-2 \\(gpt2\\), Llama \\(llama\\), Qwen2 \\(qwen2\\)"):
        trained_skeleton(T5Config(), None, 2)


def test_qwen2_with_sliding_window_layers_is_refused():
    _load("tiny-qwen2")
    from transformers import Qwen2Config

    from sft_common.models.base_model import BaseModel

    config = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, use_sliding_window=True)
    with pytest.raises(ModelError, match="Qwen2.*sliding-window"):
        build_full_model(BaseModel("q", config, "", ""), 2, 0)


def test_fingerprints_hash_what_shapes_the_model_not_the_whole_config():
    """A transformers release that adds a default to the config must not move a fingerprint
    between edge and cloud; what changes the function must."""
    import copy

    from sft_common.models.base_model import _canonical_config

    config = _load("tiny-llama").config
    other = copy.deepcopy(config)
    other.some_new_default, other.id2label = True, {0: "no", 1: "yes"}
    assert _canonical_config(other) == _canonical_config(config)
    other.num_key_value_heads = 4
    assert _canonical_config(other) != _canonical_config(config)
    # DeBERTa-v2 and ModernBERT add what shapes theirs (Family.shaping)
    for preset, key, value in (
        ("tiny-deberta-v2", "position_buckets", 16),
        ("tiny-modernbert", "local_attention", 8),
    ):
        config = _load(preset).config
        other = copy.deepcopy(config)
        setattr(other, key, value)
        assert _canonical_config(other) != _canonical_config(config)


def test_the_local_baseline_predicts_as_the_split_model(base):
    """`--local` (the whole Hugging Face classifier, as LocalSession runs it) pools and embeds as
    the split does: a decoder's last real token of a right-padded batch, no token types."""
    from sft_edge.runs.config import OptimConfig
    from sft_edge.sessions.local import LocalSession

    batch = random_batch(batch=4, seq=16)
    local = LocalSession(base, 2, OptimConfig(seed=3))
    edge, cloud = build_split_model(base, SplitSpec(split_layer=2, rank=32, keep_residual=True), 2, seed=3)
    torch.testing.assert_close(local.predict(batch), _split_logits(edge, cloud, batch), atol=1e-5, rtol=0)
