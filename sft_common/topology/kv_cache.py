"""The U's parts run on new tokens only, with the key/value cache of their own layers (generation).

A causal LM's token t attends to the keys and values of tokens 0..t, which do not change once
computed. ``KVCache`` keeps them for the attention layers of one part (the edge's head or tail,
the cloud's middle; one sequence, batch 1), so each new token runs through that part alone, at
its position, instead of the whole sequence again. Each part's step is its ``forward`` for rows
``start .. start + q - 1`` of the sequence: ``head_step`` (token ids -> the first cut),
``middle_step`` (the first cut -> the second), ``tail_step`` (the second cut -> logits). Across
each cut crosses only the new rows: one token's activations per generated token.

How the cache reaches Hugging Face's attention: the parts call their layers through the family
(``Family.run_layer``, ``Family.attend``), which pass no cache; while a step runs, a forward
pre-hook on every attention module of the part (PEFT passes ``adapter_names`` the same way) adds
the cache under the name that attention's ``forward`` takes (``cache`` in transformers >= 5.2x,
``past_key_values`` before). Attention calls ``cache.update(keys, values, layer_idx)`` and
attends over what it returns: the cached keys and values with the new ones appended.

What a family does at an offset (``Placement``): the positions of the new rows in the layers'
context (Llama and Qwen2 take rotary frequencies from them; GPT-2 adds learned position
embeddings in ``embed``), and the causal mask of q new queries over ``start + q`` keys. This
mirrors ``Decoder.context`` and ``Gpt2.embed`` at offset 0; the tests compare cached greedy
tokens with the recomputed ones, which any drift between the two would change.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from sft_common.models.families import Family, Gpt2, Llama

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")  # newest transformers first


class CacheFull(ValueError):
    """A step would cache more tokens than the cache's cap."""


class KVCache:
    """Keys and values of one part's attention layers for one sequence (batch 1), up to ``cap``
    tokens. Per layer (by the attention's ``layer_idx``): keys, values (1, kv_heads, tokens, head_dim)."""

    def __init__(self, cap: int):
        if cap < 1:
            raise ValueError(f"a KV cache holds at least 1 token, got a cap of {cap}")
        self.cap = cap  # the most tokens it holds (a session's --max-seq-len)
        self.layers: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0  # tokens cached (every layer holds as many after a whole step)
        # the part's attention modules and their cache keyword, found at its first step
        self.attention: Optional[List[Tuple[nn.Module, str]]] = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Hugging Face's ``Cache.update``: append this step's keys and values to layer
        ``layer_idx``'s; returns all of them, (1, kv_heads, tokens, head_dim) each."""
        held = self.layers.get(layer_idx)
        if held is not None:
            keys, values = torch.cat([held[0], keys], dim=-2), torch.cat([held[1], values], dim=-2)
        if keys.shape[-2] > self.cap:
            raise CacheFull(f"the KV cache holds at most {self.cap} tokens; this step needs {keys.shape[-2]}")
        self.layers[layer_idx] = (keys, values)
        return keys, values

    def check_room(self, start: int, tokens: int) -> None:
        """ValueError unless rows ``start .. start + tokens - 1`` follow the cached ones and fit."""
        if start != self.length:
            raise ValueError(f"rows from position {start}, but the KV cache holds {self.length} tokens")
        if tokens < 1 or start + tokens > self.cap:
            raise CacheFull(
                f"{tokens} rows from position {start}: the KV cache holds at most {self.cap} tokens"
            )

    def clear(self) -> None:
        """Drop every key and value (the memory goes with them)."""
        self.layers.clear()
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(
            k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers.values()
        )


def cache_keyword(module: nn.Module) -> Optional[str]:
    """The keyword ``module.forward`` takes a Hugging Face cache by (None: it takes none)."""
    params = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_KWARGS if name in params), None)


def attention_modules(part: nn.Module) -> List[Tuple[nn.Module, str]]:
    """Every attention module of ``part`` that takes a cache, with the keyword it takes it by."""
    found = []
    for module in part.modules():
        name = cache_keyword(module) if hasattr(module, "layer_idx") else None
        if name is not None:
            found.append((module, name))
    return found


@contextmanager
def attached(part: nn.Module, cache: KVCache) -> Iterator[None]:
    """While inside, every attention module of ``part`` reads and extends ``cache``."""
    handles = []

    def hook(name: str):
        def add_cache(module, args, kwargs):
            kwargs[name] = cache
            return args, kwargs

        return add_cache

    if cache.attention is None:  # a cache serves one part: its modules are found once
        cache.attention = attention_modules(part)
    try:
        for module, name in cache.attention:
            handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def offset_causal_mask(queries: int, start: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """(1, 1, queries, start + queries) additive mask: query i (at position start + i) sees keys
    0 .. start + i (one unpadded sequence)."""
    keys = torch.arange(start + queries, device=device)
    allowed = keys[None, :] <= (start + torch.arange(queries, device=device))[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
    return mask[None, None]


class Placement:
    """New rows at positions ``start ..`` for a decoder family: their embeddings and the layers'
    context (``Decoder.context``'s keys: the mask and the positions)."""

    def embed(self, part: Any, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        return part.family.embed(part, input_ids, None, None)

    def context(self, part: Any, h: torch.Tensor, start: int) -> Dict[str, Any]:
        positions = torch.arange(start, start + h.shape[1], device=h.device)[None, :]
        return {"mask": offset_causal_mask(h.shape[1], start, h.dtype, h.device), "positions": positions}


class LearnedPositions(Placement):
    """GPT-2: the token embeddings plus the learned position embeddings of the rows' positions."""

    def embed(self, part: Any, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None, :]
        return part.drop(part.wte(input_ids) + part.wpe(positions))


class RotaryPositions(Placement):
    """Llama, Qwen2: rotary frequencies at the rows' positions (``model.rotary_emb``)."""

    def context(self, part: Any, h: torch.Tensor, start: int) -> Dict[str, Any]:
        ctx = super().context(part, h, start)
        ctx["rotary"] = part.rotary(h, ctx["positions"])
        return ctx


PLACEMENTS: Tuple[Tuple[type, Placement], ...] = ((Gpt2, LearnedPositions()), (Llama, RotaryPositions()))


def placement_of(family: Family) -> Placement:
    """The family's placement; ValueError for a family that cannot be decoded with a cache."""
    for kind, placement in PLACEMENTS:
        if isinstance(family, kind):
            return placement
    raise ValueError(
        f"KV-cached decoding is for decoders (GPT-2, Llama, Qwen2); {family.name} has no causal cache"
    )


def _run(part: Any, cache: KVCache, h: torch.Tensor, start: int, send: bool) -> torch.Tensor:
    """The part's whole layers on the rows ``h`` (1, q, hidden) at ``start``, reading and
    extending ``cache``, then the cut's sending modules (``send``). A step that fails leaves an
    empty cache (a sequence then starts again at 0), never a half-extended one."""
    cache.check_room(start, h.shape[1])
    family = part.family
    ctx = placement_of(family).context(part, h, start)
    try:
        with attached(part, cache):
            for layer in part.layers:
                h = family.run_layer(layer, h, ctx)
            out = part.cut.send(family, part, h, ctx)[0] if send else h
    except BaseException:
        cache.clear()
        raise
    cache.length = start + h.shape[1]
    return out


def head_step(head: Any, cache: KVCache, input_ids: torch.Tensor, start: int) -> torch.Tensor:
    """``EdgeHead`` on tokens ``input_ids`` (1, q) at positions ``start ..``: the first cut's
    activations (1, q, width)."""
    h = placement_of(head.family).embed(head, input_ids, start)
    return _run(head, cache, h, start, send=True)


def middle_step(middle: Any, cache: KVCache, cut: torch.Tensor, start: int) -> torch.Tensor:
    """``CloudMiddle`` on the first cut's rows (1, q, width) at ``start ..``: the second cut's."""
    return _run(middle, cache, _received(middle, cut), start, send=True)


def tail_step(tail: Any, cache: KVCache, cut: torch.Tensor, start: int) -> torch.Tensor:
    """``LMTail`` on the second cut's rows (1, q, width) at ``start ..``: logits (1, q, vocab)."""
    h = _run(tail, cache, _received(tail, cut), start, send=False)
    return tail.lm_head(tail.norm(h))


def _received(part: Any, cut: torch.Tensor) -> torch.Tensor:
    """The part's first module on the activations it receives (none after a full-width cut)."""
    receiver: Optional[nn.Module] = part.tail
    return cut if receiver is None else receiver(cut, None)
