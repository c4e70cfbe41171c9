"""sft_edge.finished.generate without a daemon: the prompt's tokens are those training fed, and decoding.

Through the daemon: tests/sft_edge/runs/test_causal_lm.py and tests/test_ushape_lm_grpc.py.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from sft_common.models.base_model import packaged_minilm_dir
from sft_edge.data.lm import IGNORE, load_lm_file
from sft_edge.finished.generate import decode, prompt_ids

# A chat template in the ChatML pattern over the MiniLM vocabulary: [SEP] ends a turn.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
SMOLLM2 = os.path.expanduser("~/.cache/sft/smollm2-135m-instruct")


@pytest.fixture(scope="module")
def plain():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))


def _learnt_from(tokenizer, tmp_path, row):
    """(ids, index of the first learnt label) of one row as training encodes it."""
    path = tmp_path / "row.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = load_lm_file(str(path), tokenizer, 128)
    labels = data.labels[0]
    return data.input_ids[0], next(t for t, label in enumerate(labels) if label != IGNORE)


def _check_prompt_is_what_training_fed(tokenizer, tmp_path):
    prompt = "what colour is the river at night"
    for row, chat in (
        ({"prompt": prompt, "completion": "dark blue"}, False),
        (
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": "dark blue"},
                ]
            },
            True,
        ),
    ):
        ids, first = _learnt_from(tokenizer, tmp_path, row)
        assert prompt_ids(tokenizer, prompt, chat) == ids[:first]


def test_the_prompt_is_fed_as_training_fed_it(plain, tmp_path):
    """A prompt/completion run's prompt is plain text, a chat run's through the template: in both,
    the tokens before the first learnt one in training."""
    chat = copy.deepcopy(plain)
    chat.chat_template = TEMPLATE
    _check_prompt_is_what_training_fed(chat, tmp_path)


@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason="the converted SmolLM2 cache is absent")
def test_the_prompt_is_fed_as_training_fed_it_with_smollm2(tmp_path):
    from transformers import AutoTokenizer

    _check_prompt_is_what_training_fed(AutoTokenizer.from_pretrained(SMOLLM2), tmp_path)


def _logits_of(batch):
    """A fake model: the next token is (last token + 1) mod 10, with some mass elsewhere."""
    last = int(batch.input_ids[0, -1])
    logits = torch.zeros(1, batch.input_ids.shape[1], 10)
    logits[0, -1] = torch.arange(10).float() / 10
    logits[0, -1, (last + 1) % 10] = 3.0
    assert batch.lengths == [batch.input_ids.shape[1]]  # the whole sequence, every time (no cache)
    return logits


def test_greedy_sampled_and_where_decoding_stops():
    assert decode(_logits_of, [3], 4, 64) == [4, 5, 6, 7]
    assert decode(_logits_of, [3], 9, 64, eos=6) == [4, 5, 6]  # EOS ends it, EOS included
    assert decode(_logits_of, [1, 2, 3], 9, 5) == [4, 5]  # the session's --max-seq-len
    sampled = decode(_logits_of, [3], 20, 64, temperature=2.0, seed=7)
    assert sampled == decode(_logits_of, [3], 20, 64, temperature=2.0, seed=7)  # seeded
    assert sampled != decode(_logits_of, [3], 20, 64)  # and not greedy at this temperature
