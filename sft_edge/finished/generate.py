"""`sft-edge generate`: text from a causal-LM run, through the daemon that keeps its middle, or here.

A U-shaped run's ``--output-dir`` holds the edge's head and LM tail; its daemon keeps the middle. The
finished session is reopened for inference only (as ``sft-edge predict`` does for label-private
runs) and each new token is one evaluation through the U: the head here, the middle on the cloud,
the tail and the LM head here. There is no KV cache: each token recomputes the whole sequence
(simple and exactly the trained model's function; it costs a forward over n tokens per token, and
sends the cloud n rows of rank R each time). The cloud sees what it sees in training: activations
at the two cuts and a length, never a token id. An export of such a run (``sft-edge export``:
the middle fetched once) or a ``--local`` run's folder generates in this process, no daemon:
the same function, so the same greedy tokens.

The prompt is fed as training fed a row's start: chat runs' through the tokenizer's chat template
(one user message and the generation prompt), other runs' as plain text after the BOS the
tokenizer adds, if any (``--raw``: plain text for a chat run too). Temperature 0 is greedy
decoding (deterministic); above 0 the next token is sampled from softmax(logits / T), seeded.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

from sft_edge.data.glue import Batch, DataError
from sft_edge.data.lm import bos_token
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
    """New tokens after ``ids``: each from the logits of the whole sequence so far (no cache),
    until ``max_new_tokens``, ``eos`` or ``max_len`` tokens in all. ``logits_of`` maps a batch of
    one to (1, seq, vocab) logits."""
    ids = list(ids)
    new: List[int] = []
    generator = torch.Generator().manual_seed(seed)
    while len(new) < max_new_tokens and len(ids) < max_len:
        with torch.no_grad():
            last = logits_of(one_sequence(ids, device))[0, -1].float().cpu()
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=generator))
        else:
            token = int(torch.argmax(last))
        ids.append(token)
        new.append(token)
        if token == eos:
            break
    return new


def generate(cfg: GenerateConfig) -> Dict:
    """The completion of ``cfg.prompt`` by the run's model: its text, tokens and why it stopped."""
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
    opened = open_model(cfg.run, record, device, cfg.connection)
    try:
        eos = tokenizer.eos_token_id
        new = decode(opened.logits, ids, cfg.max_new_tokens, max_len, cfg.temperature, cfg.seed, eos, device)
    finally:
        opened.close()
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
