"""Causal-LM data: each row shape's labels token by token, truncation, batches, the loss, and
refusals that name the file, the line and what is wrong."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from sft_common.models.base_model import packaged_minilm_dir
from sft_edge.data.glue import DataError
from sft_edge.data.lm import (
    IGNORE,
    collate_lm,
    encode_lm,
    lm_loss,
    lm_loss_sum,
    load_lm_file,
    perplexity,
    read_lm_rows,
)

# A chat template in the ChatML pattern over the MiniLM vocabulary: [SEP] ends a turn.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
SMOLLM2 = os.path.expanduser("~/.cache/sft/smollm2-135m-instruct")


@pytest.fixture(scope="module")
def plain():
    """The packaged MiniLM tokenizer: no BOS, no EOS, no chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(packaged_minilm_dir()))


@pytest.fixture(scope="module")
def chat(plain):
    tokenizer = copy.deepcopy(plain)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _jsonl(tmp_path, rows, name="data.jsonl"):
    path = tmp_path / name
    path.write_text(
        "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    return str(path)


def _tokens(tokenizer, data, i=0):
    """Row i as (token, learnt) pairs."""
    names = tokenizer.convert_ids_to_tokens(data.input_ids[i])
    return [(name, label != IGNORE) for name, label in zip(names, data.labels[i])]


def test_text_rows_learn_every_token_the_model_can_predict(tmp_path, plain):
    data = load_lm_file(_jsonl(tmp_path, [{"text": "the cat sat"}]), plain, 64)
    assert _tokens(plain, data) == [("the", False), ("cat", True), ("sat", True)]  # nothing predicts "the"
    assert data.labels[0][1:] == data.input_ids[0][1:]


def test_prompt_completion_rows_learn_the_completion_only(tmp_path, plain):
    rows = [{"prompt": "the cat", "completion": "sat on the mat"}, {"prompt": "", "completion": "yes no"}]
    data = load_lm_file(_jsonl(tmp_path, rows), plain, 64)
    learnt = [("the", False), ("cat", False), ("sat", True), ("on", True), ("the", True), ("mat", True)]
    assert _tokens(plain, data, 0) == learnt
    assert [label for label in data.labels[0] if label != IGNORE] == data.input_ids[0][2:]
    assert _tokens(plain, data, 1) == [("yes", False), ("no", True)]  # an empty prompt: the first is context


def test_bos_where_the_tokenizer_adds_one_and_a_learnt_eos(tmp_path, plain):
    tokenizer = copy.deepcopy(plain)
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"  # its encoding starts with [CLS]
    data = load_lm_file(_jsonl(tmp_path, [{"prompt": "the cat", "completion": "sat"}]), tokenizer, 64)
    assert _tokens(tokenizer, data) == [
        ("[CLS]", False), ("the", False), ("cat", False), ("sat", True), ("[SEP]", True),
    ]  # fmt: skip


def test_chat_rows_learn_the_assistant_turns_only(tmp_path, chat):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "good night"},
    ]
    data = load_lm_file(_jsonl(tmp_path, [{"messages": messages}]), chat, 64)
    assert _tokens(chat, data) == [
        ("system", False), (":", False), ("be", False), ("brief", False), ("[SEP]", False),
        ("user", False), (":", False), ("hello", False), ("[SEP]", False),
        ("assistant", False), (":", False), ("hi", True), ("there", True), ("[SEP]", True),
        ("user", False), (":", False), ("bye", False), ("[SEP]", False),
        ("assistant", False), (":", False), ("good", True), ("night", True), ("[SEP]", True),
    ]  # fmt: skip
    assert data.input_ids[0] == chat(chat.apply_chat_template(messages, tokenize=False))["input_ids"][1:-1]


@pytest.mark.skipif(not os.path.isdir(SMOLLM2), reason="the converted SmolLM2 cache is absent")
def test_smollm2_chat_rows_are_the_ids_its_template_gives(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    rows = [{"messages": messages}]
    data = load_lm_file(_jsonl(tmp_path, rows), tokenizer, 128)
    assert data.input_ids[0] == list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    learnt = [t for t, label in zip(data.input_ids[0], data.labels[0]) if label != IGNORE]
    assert tokenizer.decode(learnt) == "Hello there<|im_end|>\n"
    pairs = load_lm_file(_jsonl(tmp_path, [{"prompt": "Hi", "completion": " there"}]), tokenizer, 128)
    assert pairs.input_ids[0][-1] == tokenizer.eos_token_id == pairs.labels[0][-1]  # learns to stop


def test_truncation_keeps_the_start(tmp_path, plain):
    text = load_lm_file(_jsonl(tmp_path, [{"text": "one two three four five six"}]), plain, 4)
    assert len(text.input_ids[0]) == len(text.labels[0]) == 4
    assert plain.convert_ids_to_tokens(text.input_ids[0]) == ["one", "two", "three", "four"]
    pair = load_lm_file(_jsonl(tmp_path, [{"prompt": "a b c", "completion": "d e f"}]), plain, 4)
    assert _tokens(plain, pair) == [("a", False), ("b", False), ("c", False), ("d", True)]


def test_collate_pads_on_the_right_and_ignores_the_padding(tmp_path, plain):
    rows = [{"text": "the cat sat on the mat"}, {"text": "x y z"}]
    data = load_lm_file(_jsonl(tmp_path, rows), plain, 64)
    batch = collate_lm(data, [1, 0], pad_id=7)
    assert batch.lengths == [3, 6] and batch.labels.shape == (2, 6) == batch.input_ids.shape
    assert batch.input_ids[0, 3:].tolist() == [7, 7, 7] and batch.labels[0, 3:].tolist() == [IGNORE] * 3
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch.labels[1].tolist() == [IGNORE] + data.input_ids[0][1:]
    first, second = batch.split(2)  # micro-batches trim the token labels with the ids
    assert first.labels.shape == first.input_ids.shape == (1, 3) and second.labels.shape == (1, 6)


def test_the_loss_is_the_shifted_mean_over_learnt_tokens():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, IGNORE, IGNORE]])
    loss = lm_loss(logits, labels)
    torch.testing.assert_close(loss, ForCausalLMLoss(logits, labels, vocab_size=11), rtol=0, atol=1e-6)
    by_hand = torch.stack(
        [-logits[b, t - 1].log_softmax(-1)[labels[b, t]] for b, t in ((0, 2), (0, 3), (1, 1), (1, 2))]
    )
    torch.testing.assert_close(loss, by_hand.mean(), rtol=0, atol=1e-6)
    total, count = lm_loss_sum(logits, labels)
    assert count == 4 and math.isclose(total.item(), by_hand.sum().item(), rel_tol=1e-6)
    assert perplexity(total.item() / count) == pytest.approx(math.exp(by_hand.mean().item()))
    assert perplexity(1e4) == math.inf
    with pytest.raises(ValueError, match="no learnt token"):
        lm_loss(logits, torch.full_like(labels, IGNORE))


GOOD = {"text": "fine"}
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
# case -> (the rows of data.jsonl, the words the error must hold)
BAD_ROWS = {
    "no shape": ([GOOD, {"body": "x"}], ["data.jsonl:2", "none of the row shapes", "'body'"]),
    "two shapes in a row": (
        [{"text": "a", "prompt": "b", "completion": "c"}],
        ["data.jsonl:1", "text and prompt/completion"],
    ),
    "mixed shapes": (
        [GOOD, {"messages": CHAT}],
        ["data.jsonl:2", "a chat row, but line 1 is a text row", "one shape"],
    ),
    "prompt alone": ([{"prompt": "a"}], ["data.jsonl:1", "without 'completion'"]),
    "empty completion": (
        [{"prompt": "a", "completion": "b"}, "\n", {"prompt": "a", "completion": "  "}],
        ["data.jsonl:3", "'completion' is empty"],
    ),
    "completion not a string": (
        [{"prompt": "a", "completion": 3}],
        ["data.jsonl:1", "'completion' must be a string, got int"],
    ),
    "empty text": ([{"text": ""}], ["data.jsonl:1", "'text' is empty"]),
    "no assistant": ([{"messages": CHAT[:1]}], ["data.jsonl:1", "no assistant message", "roles: user"]),
    "empty assistant": (
        [{"messages": [CHAT[0], {"role": "assistant", "content": ""}]}],
        ["data.jsonl:1", "message 2 (assistant): 'content' is empty"],
    ),
    "content not a string": (
        [{"messages": [{"role": "user", "content": [{"type": "text"}]}]}],
        ["data.jsonl:1", "message 1 (user): 'content' must be a string, got list"],
    ),
    "messages not a list": ([{"messages": "hi"}], ["data.jsonl:1", "'messages' must be a non-empty list"]),
    "bad JSON": ([GOOD, '{"text": "a",}\n'], ["data.jsonl:2", "not valid JSON"]),
    "JSON array": (['[{"text": "a"}]\n'], ["data.jsonl:1", "a JSON array? write one object per line"]),
}
# case -> (file name, its bytes, the words the error must hold)
BAD_FILES = {
    "not UTF-8": (
        "latin1.jsonl",
        b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
        ["latin1.jsonl:2", "not UTF-8", "column 14"],
    ),
    "empty file": ("empty.jsonl", b"\n\n", ["empty.jsonl", "empty"]),
    "not JSON Lines": ("data.csv", b"text\nfine\n", ["data.csv", "must be JSON Lines"]),
}


@pytest.mark.parametrize("case", [*BAD_ROWS, *BAD_FILES, "no such file"])
def test_bad_rows_are_refused_naming_file_and_line(tmp_path, case):
    if case in BAD_ROWS:
        rows, words = BAD_ROWS[case]
        path = _jsonl(tmp_path, rows)
    elif case in BAD_FILES:
        name, content, words = BAD_FILES[case]
        (tmp_path / name).write_bytes(content)
        path = str(tmp_path / name)
    else:
        path, words = str(tmp_path / "nope.jsonl"), ["nope.jsonl", "no such file"]
    with pytest.raises(DataError) as caught:
        read_lm_rows(path)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_rows_that_cannot_be_encoded_are_refused(tmp_path, plain, chat):
    chat_rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = _jsonl(tmp_path, chat_rows, "chat.jsonl")
    with pytest.raises(DataError, match=r"chat.jsonl:1: a chat row, but the tokenizer has no chat template"):
        load_lm_file(path, plain, 64)
    counting = copy.deepcopy(chat)  # renders the number of messages first: no turn-by-turn prefixes
    counting.chat_template = "{{ messages | length }} " + TEMPLATE
    with pytest.raises(DataError, match=r"chat.jsonl:1: .* does not render this conversation turn by turn"):
        load_lm_file(path, counting, 64)
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a b c d", "completion": "e"}]
    long_prompt = _jsonl(tmp_path, rows, "long.jsonl")
    with pytest.raises(DataError, match=r"long.jsonl:2: the completion starts at token 5, after the first"):
        load_lm_file(long_prompt, plain, 4)
    one = _jsonl(tmp_path, [{"text": "word"}], "one.jsonl")
    with pytest.raises(DataError, match=r"one.jsonl:1: no text token to learn: the row is 1 token"):
        load_lm_file(one, plain, 4)
    with pytest.raises(ValueError, match="--max-seq-len must be >= 2"):
        encode_lm(read_lm_rows(one), plain, 1, one)
