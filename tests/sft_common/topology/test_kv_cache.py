"""The U's parts on new rows with the key/value cache of their layers give the whole sequence's logits.

Prefill a prompt, then one token at a time through the head, the middle and the LM tail (each with
its own ``KVCache``): every row's logits equal the parts' forward over the whole sequence (1e-5),
for Llama (rotary positions, grouped-query attention) and GPT-2 (learned positions), at both
factorised cuts and the full-width one. The cache refuses rows that do not follow it or overflow
its cap, and a refused or failed step leaves nothing half-appended.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sft_common.models.base_model import load_base_model
from sft_common.topology.kv_cache import (
    CacheFull,
    KVCache,
    attention_modules,
    head_step,
    middle_step,
    placement_of,
    tail_step,
)
from sft_common.topology.ushape import UShapeSpec
from sft_common.topology.ushape_lm import build_ushape_lm_model

CASES = [
    ("random:tiny-llama", "sft", "ffn-output"),
    ("random:tiny-llama", "sft", "ffn-input"),
    ("random:tiny-llama", "sl", "ffn-output"),
    ("random:tiny-gpt2", "sft", "ffn-output"),
    ("random:tiny-gpt2", "sft", "ffn-input"),
]


@functools.lru_cache(maxsize=None)
def _base(name):
    return load_base_model(name)  # once a model: a random preset takes seconds to draw


def _parts(name, mode="sft", factorise="ffn-output", split_layer=0):
    base = _base(name)
    spec = UShapeSpec(split_layer=split_layer, rank=8, tail_layers=1, mode=mode, factorise=factorise)
    return tuple(p.eval() for p in build_ushape_lm_model(base, spec, seed=3))


def _whole(parts, ids):
    head, middle, tail = parts
    mask = torch.ones_like(ids)
    cut, _ = head(ids, mask)
    return tail(middle(cut, mask)[0], mask)


@pytest.mark.parametrize("name, mode, factorise", CASES)
def test_cached_rows_give_the_whole_sequences_logits(name, mode, factorise):
    parts = _parts(name, mode, factorise)
    ids = torch.randint(1000, 3000, (1, 14), generator=torch.Generator().manual_seed(1))
    caches = [KVCache(32) for _ in parts]
    with torch.no_grad():
        want = _whole(parts, ids)
        got = []
        for start, end in (
            [(0, 6)] + [(t, t + 1) for t in range(6, 11)] + [(11, 14)]
        ):  # prompt, tokens, 3 rows
            first = head_step(parts[0], caches[0], ids[:, start:end], start)
            second = middle_step(parts[1], caches[1], first, start)
            got.append(tail_step(parts[2], caches[2], second, start))
    assert float((torch.cat(got, dim=1) - want).abs().max()) <= 1e-5
    assert [c.length for c in caches] == [14, 14, 14]
    assert all(k.shape[-2] == 14 for c in caches for k, _ in c.layers.values())
    assert len(caches[1].layers) >= 1 and caches[1].nbytes > 0  # the middle has layers of its own


def test_the_cache_refuses_rows_that_do_not_follow_or_overflow_it():
    head, _, _ = _parts("random:tiny-llama")
    cache = KVCache(8)
    ids = torch.randint(1000, 3000, (1, 9))
    with torch.no_grad():
        head_step(head, cache, ids[:, :5], 0)
        with pytest.raises(ValueError, match="holds 5 tokens"):
            head_step(head, cache, ids[:, 6:7], 6)  # a gap
        with pytest.raises(CacheFull, match="at most 8"):
            head_step(head, cache, ids[:, 5:9], 5)  # 9 > the cap
        assert cache.length == 5 and all(k.shape[-2] == 5 for k, _ in cache.layers.values())  # unchanged
        head_step(head, cache, ids[:, 5:8], 5)
    assert cache.length == 8
    assert not any(m._forward_pre_hooks for m, _ in attention_modules(head))  # hooks only inside a step


def test_a_step_that_fails_midway_leaves_an_empty_cache():
    """The middle's last attention fails after its first layer appended its keys: nothing is
    left half-appended (the sequence starts again at 0), and a wrong width changes nothing."""
    _, middle, _ = _parts("random:tiny-llama")
    cache = KVCache(16)
    with torch.no_grad():
        middle_step(middle, cache, torch.randn(1, 4, 8), 0)
        with pytest.raises(RuntimeError):
            middle_step(middle, cache, torch.randn(1, 1, 7), 4)  # refused before any layer runs
        assert cache.length == 4
        last, _ = attention_modules(middle)[-1]

        def fail(module, args, kwargs):
            raise RuntimeError("the device ran out of memory")

        handle = last.register_forward_pre_hook(fail, with_kwargs=True)
        with pytest.raises(RuntimeError, match="out of memory"):
            middle_step(middle, cache, torch.randn(1, 1, 8), 4)
        handle.remove()
    assert cache.length == 0 and not cache.layers


def test_encoders_have_no_placement():
    with pytest.raises(ValueError, match="for decoders"):
        placement_of(_base("random:tiny").family)
    with pytest.raises(ValueError, match="at least 1 token"):
        KVCache(0)
