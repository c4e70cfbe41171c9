"""Causal-LM data on the edge (``--problem causal-lm``): JSON Lines rows, token labels, the loss.

A file (``.jsonl``, or ``.json`` written as JSON Lines) holds rows of one shape:
- ``{"text": ...}``: every token is learnt;
- ``{"prompt": ..., "completion": ...}``: the completion's tokens are learnt, the prompt's are not;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation rendered with the
  tokenizer's chat template; the assistant turns are learnt (each as the template renders it
  after the generation prompt, its end-of-turn marker included), nothing else.

Each row becomes ``input_ids`` and ``labels``: the token where the loss applies there, ``IGNORE``
(-100) where it does not (and always at position 0, which nothing predicts). Position t's logits
predict the token at t + 1 (``lm_loss_sum``). Text and completions end with the tokenizer's EOS
(learnt: the model learns to stop), and start with its BOS where its own encoding adds one.
Pieces are tokenised separately (prompt, completion; the chat text between the assistant turns),
so a prompt's tokens are those ``generate`` will feed the model, and no token straddles a
boundary. Every row is checked before anything trains; an error names the file and the line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from sft_edge.data.files import check_text
from sft_edge.data.glue import Batch, DataError

IGNORE = -100  # the label of a token the loss skips (cross_entropy's default ignore_index)
# row shape -> its fields; one file holds one shape
SHAPES: Dict[str, Tuple[str, ...]] = {
    "text": ("text",),
    "prompt/completion": ("prompt", "completion"),
    "chat": ("messages",),
}
LEARNT = {"text": "text", "prompt/completion": "completion", "chat": "assistant"}  # what a row teaches


@dataclass(frozen=True)
class LMRow:
    """One checked row of a causal-LM file."""

    line: int  # 1-based, for error messages
    shape: str  # a key of SHAPES
    fields: Dict[str, Any]  # the row's fields of that shape


@dataclass
class LMEncoded:
    """Tokenised rows, unpadded; ``labels[i]`` is as long as ``input_ids[i]``."""

    input_ids: List[List[int]]
    labels: List[List[int]]  # the token, or IGNORE where no loss applies

    def __len__(self) -> int:
        return len(self.input_ids)


def load_lm_file(path: str, tokenizer, max_seq_len: int) -> LMEncoded:
    """Read, check and tokenise a causal-LM file (``read_lm_rows``, then ``encode_lm``)."""
    return encode_lm(read_lm_rows(path), tokenizer, max_seq_len, path)


def read_lm_rows(path: str) -> List[LMRow]:
    """The rows of a JSON Lines file, each checked against its shape, all of one shape."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if os.path.splitext(path)[1].lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: causal-LM data must be JSON Lines (.jsonl or .json)")
    lines = set(check_text(path))  # UTF-8 throughout, and not empty
    rows: List[LMRow] = []
    with open(path, "rb") as f:  # lines as check_text counts them
        for n, raw in enumerate(f, start=1):
            if n in lines:
                row = _parse(raw.decode("utf-8").lstrip("\ufeff"), f"{path}:{n}")
                if rows and row[0] != rows[0].shape:
                    raise DataError(
                        f"{path}:{n}: a {row[0]} row, but line {rows[0].line} is a {rows[0].shape} row: "
                        "one file holds rows of one shape"
                    )
                rows.append(LMRow(n, *row))
    return rows


def _parse(text: str, where: str) -> Tuple[str, Dict[str, Any]]:
    """(shape, fields) of one line; DataError saying what is wrong."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        hint = " (a JSON array? write one object per line: JSON Lines)" if isinstance(row, list) else ""
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}{hint}")
    shapes = [s for s, keys in SHAPES.items() if any(k in row for k in keys)]
    if not shapes:
        raise DataError(
            f"{where}: none of the row shapes: a row holds 'text', 'prompt' and 'completion', "
            f"or 'messages' (this one: {', '.join(map(repr, row)) or 'nothing'})"
        )
    if len(shapes) > 1:
        raise DataError(f"{where}: fields of two row shapes ({' and '.join(shapes)}); a row is one of them")
    shape = shapes[0]
    missing = [k for k in SHAPES[shape] if k not in row]
    if missing:
        raise DataError(f"{where}: a {shape} row without {missing[0]!r}")
    fields = {k: row[k] for k in SHAPES[shape]}
    if shape == "chat":
        _check_messages(fields["messages"], where)
    elif shape == "text":
        _string(fields["text"], "'text'", where, allow_empty=False)
    else:
        _string(fields["prompt"], "'prompt'", where, allow_empty=True)
        _string(fields["completion"], "'completion'", where, allow_empty=False)
    return shape, fields


def _string(value: Any, what: str, where: str, allow_empty: bool) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: {what} is empty: nothing to learn")


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: message {i} must be an object with a string 'role'")
        what = f"message {i} ({m['role']}): 'content'"
        _string(m.get("content"), what, where, allow_empty=m["role"] != "assistant")
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(sorted({m["role"] for m in messages}))
        raise DataError(f"{where}: no assistant message (roles: {roles}): nothing to learn")


def encode_lm(rows: Sequence[LMRow], tokenizer, max_seq_len: int, path: str) -> LMEncoded:
    """Tokenise rows into ids and labels, truncated to ``max_seq_len`` tokens (the end is cut).
    A row left with no learnt token to predict is refused."""
    if not rows:
        raise DataError(f"{path}: no rows to train or evaluate on")
    if max_seq_len < 2:
        raise ValueError(f"--max-seq-len must be >= 2 for a causal LM, got {max_seq_len}")
    pieces = [_pieces(row, tokenizer, f"{path}:{row.line}") for row in rows]
    flat = [text for row_pieces in pieces for text, _ in row_pieces]
    tokens = iter(tokenizer(flat, add_special_tokens=False)["input_ids"])
    bos = bos_token(tokenizer)
    eos = tokenizer.eos_token_id
    out = LMEncoded([], [])
    for row, row_pieces in zip(rows, pieces):
        ids: List[int] = []
        labels: List[int] = []
        if row.shape != "chat" and bos is not None:
            ids.append(bos)
            labels.append(IGNORE)
        for _, learnt in row_pieces:
            piece = list(next(tokens))
            ids += piece
            labels += piece if learnt else [IGNORE] * len(piece)
        if row.shape != "chat" and eos is not None:
            ids.append(eos)
            labels.append(eos)
        if labels:
            labels[0] = IGNORE  # nothing predicts the first token
        _check_learnt(labels, max_seq_len, LEARNT[row.shape], f"{path}:{row.line}")
        out.input_ids.append(ids[:max_seq_len])
        out.labels.append(labels[:max_seq_len])
    return out


def bos_token(tokenizer) -> Optional[int]:
    """The BOS id where the tokenizer's own encoding starts with it (Llama's), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def _check_learnt(labels: List[int], max_seq_len: int, what: str, where: str) -> None:
    learnt = [t for t, label in enumerate(labels) if label != IGNORE]
    if not learnt:
        raise DataError(
            f"{where}: no {what} token to learn: the row is {len(labels)} token(s), and a row's first "
            "token has nothing before it to be predicted from"
        )
    if learnt[0] >= max_seq_len:
        raise DataError(
            f"{where}: the {what} starts at token {learnt[0] + 1}, after the first --max-seq-len "
            f"{max_seq_len} tokens: nothing to learn; raise --max-seq-len or shorten what precedes it"
        )


def _pieces(row: LMRow, tokenizer, where: str) -> List[Tuple[str, bool]]:
    """The row's text in pieces, each tokenised alone: (text, learnt)."""
    if row.shape == "text":
        return [(row.fields["text"], True)]
    if row.shape == "prompt/completion":
        return [(row.fields["prompt"], False), (row.fields["completion"], True)]
    return _chat_pieces(row.fields["messages"], tokenizer, where)


def _chat_pieces(messages: List[Dict[str, str]], tokenizer, where: str) -> List[Tuple[str, bool]]:
    """The rendered conversation cut at each assistant turn: the text before it (the template's
    rendering of the earlier messages with the generation prompt) and the turn itself."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: a chat row, but the tokenizer has no chat template; use text or prompt/completion "
            "rows, or a model whose tokenizer has one"
        )

    def render(msgs: List[Dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as exc:  # jinja's errors, or one the template raises: the cause is in the message
            raise DataError(
                f"{where}: the chat template failed on this row ({type(exc).__name__}: {exc})"
            ) from None
        return str(text)

    whole = render(messages, False)
    pieces: List[Tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (
            whole.startswith(before) and whole.startswith(through) and done <= len(before) <= len(through)
        ):
            raise DataError(
                f"{where}: the tokenizer's chat template does not render this conversation turn by turn "
                f"(its text up to message {i + 1} is not the start of the whole), so the assistant's "
                "tokens cannot be told apart"
            )
        pieces += [(whole[done : len(before)], False), (whole[len(before) : len(through)], True)]
        done = len(through)
    return pieces + [(whole[done:], False)]


def collate_lm(data: LMEncoded, indices: Sequence[int], pad_id: int = 0) -> Batch:
    """Pad the chosen rows to the longest among them, on the right: ``labels`` (batch, seq) is
    IGNORE on padding, ``token_type_ids`` all zero (decoders take none)."""
    lengths = [len(data.input_ids[i]) for i in indices]
    seq = max(lengths)
    ids = torch.full((len(indices), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), seq), IGNORE, dtype=torch.long)
    for row, i in enumerate(indices):
        ids[row, : lengths[row]] = torch.tensor(data.input_ids[i])
        labels[row, : lengths[row]] = torch.tensor(data.labels[i])
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    return Batch(ids, torch.zeros_like(ids), mask, lengths, labels)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the learnt tokens, and their number.

    logits: (batch, seq, vocab); labels: (batch, seq). Position t's logits predict labels[t + 1]."""
    vocab = logits.shape[-1]
    target = labels[:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return total, int((target != IGNORE).sum())


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training loss: the mean next-token cross-entropy over the batch's learnt tokens."""
    total, count = lm_loss_sum(logits, labels)
    if count == 0:
        raise ValueError("no learnt token in this batch: every label is IGNORE")
    return total / count


def perplexity(mean_loss: float) -> float:
    """exp(mean loss per learnt token), e.g. of the dev set (sum of ``lm_loss_sum`` / count)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
