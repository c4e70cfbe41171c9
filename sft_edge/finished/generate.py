"""`sft-edge generate`: text from a causal-LM run, through the daemon that keeps its middle, or here.

A U-shaped run's ``--output-dir`` holds the edge's head and LM tail; its daemon keeps the middle. The
finished session is reopened for inference only (as ``sft-edge predict`` does for label-private
runs). Decoding keeps a KV cache (``sft_edge.finished.cached``): the prompt runs through the U
once, then each new token runs alone through the head, the middle and the tail, their layers
reading the keys and values of the earlier tokens from caches kept where they run (the head's
and the tail's here, the middle's on the daemon for this stream). So each token sends the cloud
one row of rank R at each cut, and its time and bytes do not grow with the length. The cloud
sees what it sees in training: activations at the two cuts and a position, never a token id. An
export of such a run (``sft-edge export``: the middle fetched once) or a ``--local`` run's folder
generates in this process, no daemon, with the same caches. ``kv_cache=False`` (``--no-kv-cache``)
recomputes the whole sequence for each token instead (``recompute``: a forward over n tokens a
token, n rows to the cloud each time): the reference the cached path's greedy tokens equal.

The prompt is fed as training fed a row's start: chat runs' through the tokenizer's chat template
(one user message and the generation prompt), other runs' as plain text after the BOS the
tokenizer adds, if any (``--raw``: plain text for a chat run too). Temperature 0 is greedy
decoding (deterministic); above 0 the next token is sampled from softmax(logits / T), seeded.
Tokens are handed to ``on_text`` as text the moment each is decided (the CLI prints them).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from sft_edge.data.glue import Batch, DataError
from sft_edge.data.lm import bos_token
from sft_edge.finished.cached import open_cached
from sft_edge.finished.parts import open_model
from sft_edge.finished.record import read_run
from sft_edge.runs.config import GenerateConfig


def prompt_ids(tokenizer, prompt: str, chat: bool) -> List[int]:
    """The prompt's tokens as training fed a row's start (see the module's docstring)."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    bos = bos_token(tokenizer)
    return ([bos] if bos is not None else []) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def one_sequence(ids: Sequence[int], device: str = "cpu") -> Batch:
    """A batch of one unpadded sequence (no labels: -100 throughout)."""
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    ones = torch.ones_like(input_ids)
    return Batch(input_ids, torch.zeros_like(input_ids), ones, [len(ids)], torch.full_like(input_ids, -100))


NextLogits = Callable[[Sequence[int]], torch.Tensor]  # the tokens so far -> logits (vocab,) of the next


def recompute(logits_of: Callable[[Batch], torch.Tensor], device: str = "cpu") -> NextLogits:
    """Next-token logits from the whole sequence each time (no cache); ``logits_of`` maps a batch
    of one to (1, seq, vocab) logits."""

    def next_logits(ids: Sequence[int]) -> torch.Tensor:
        return logits_of(one_sequence(ids, device))[0, -1].float().cpu()

    return next_logits


def decode_with(
    next_logits: NextLogits,
    ids: Sequence[int],
    max_new_tokens: int,
    max_len: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos: Optional[int] = None,
    on_token: Callable[[int], object] = lambda token: None,
) -> List[int]:
    """New tokens after ``ids``, each from ``next_logits`` of the sequence so far and handed to
    ``on_token`` as soon as it is decided, until ``max_new_tokens``, ``eos`` (included) or
    ``max_len`` tokens in all."""
    ids = list(ids)
    new: List[int] = []
    generator = torch.Generator().manual_seed(seed)
    while len(new) < max_new_tokens and len(ids) < max_len:
        with torch.no_grad():
            last = next_logits(ids)
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator))
        else:
            token = int(torch.argmax(last))
        ids.append(token)
        new.append(token)
        on_token(token)
        if token == eos:
            break
    return new


def decode(
    logits_of: Callable[[Batch], torch.Tensor],
    ids: Sequence[int],
    max_new_tokens: int,
    max_len: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos: Optional[int] = None,
    device: str = "cpu",
) -> List[int]:
    """``decode_with`` recomputing the whole sequence for each token (``recompute``)."""
    return decode_with(recompute(logits_of, device), ids, max_new_tokens, max_len, temperature, seed, eos)


class TextStream:
    """Hands ``write`` the text of each new token as it comes: the decoded completion so far,
    less what was written; held back while it ends in an unfinished character (a token that
    is part of one). ``end()`` writes what is left, so the pieces add up to the completion."""

    def __init__(self, tokenizer, write: Callable[[str], object]):
        self.tokenizer, self.write = tokenizer, write
        self.tokens: List[int] = []
        self.written = ""

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._show(text)

    def end(self) -> None:
        self._show(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _show(self, text: str) -> None:
        if text.startswith(self.written) and len(text) > len(self.written):
            self.write(text[len(self.written) :])
            self.written = text


def generate(
    cfg: GenerateConfig, cached: bool = True, on_text: Optional[Callable[[str], object]] = None
) -> Dict:
    """The completion of ``cfg.prompt`` by the run's model: its text, tokens and why it stopped.
    ``cached``: decode with KV caches (else recompute each token's whole sequence); ``on_text``:
    called with each piece of the completion's text as its tokens are decided."""
    from transformers import AutoTokenizer

    from sft_common.training import resolve_device

    cfg.validate()
    record = read_run(cfg.run)
    if not record.causal_lm:
        raise DataError(f"{cfg.run} is not a causal-LM run (--problem causal-lm): it classifies; use predict")
    tokenizer = AutoTokenizer.from_pretrained(cfg.run)
    chat = record.lm_shape == "chat" and not cfg.raw
    ids = prompt_ids(tokenizer, cfg.prompt, chat)
    max_len = record.max_seq_len  # the session takes no longer sequence
    if len(ids) >= max_len:
        raise DataError(
            f"the prompt is {len(ids)} tokens; this run's model takes at most {max_len} (its --max-seq-len), "
            "and needs room for one new token"
        )
    device = resolve_device(cfg.device)
    # an export or a --local run: the whole model here; a split run's folder: through its daemon
    next_logits, close = open_next_logits(cfg, record, device)
    stream = TextStream(tokenizer, on_text or (lambda text: None))
    try:
        eos = tokenizer.eos_token_id
        new = decode_with(
            next_logits, ids, cfg.max_new_tokens, max_len, cfg.temperature, cfg.seed, eos, stream
        )
    finally:
        close()
    stream.end()
    if new and new[-1] == tokenizer.eos_token_id:
        stopped = "eos"
    else:
        stopped = "max_new_tokens" if len(new) == cfg.max_new_tokens else "max_seq_len"
    return {
        "completion": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": len(ids),
        "tokens": new,
        "stopped": stopped,
    }


def open_next_logits(cfg: GenerateConfig, record, device: str):
    """(next-token logits of a sequence, close) for the run's model where its parts are: with KV
    caches (``cfg.kv_cache``), or recomputing the whole sequence each time."""
    if cfg.kv_cache:
        lm = open_cached(cfg.run, record, device, cfg.connection)
        return lm.next_logits, lm.close
    opened = open_model(cfg.run, record, device, cfg.connection)
    return recompute(opened.logits, device), opened.close
