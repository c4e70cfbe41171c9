"""Several LoRA sessions' parts run as one: the frozen base once over every row, each session's own
tensors over its own rows (the segmented LoRA product).

LoRA sessions of one model and split hold the same frozen tensors (``models.shared``) and each its
own adapters, factors and (two-part) head. A ``SegmentedPart`` is a copy of one session's part that
shares every tensor of it, in which, for a batch whose rows are the members' inputs one after the
other on dim 0 (``Segments``):

- each LoRA layer computes its frozen ``base_layer`` once on all rows, then adds, segment by
  segment, ``lora_B(lora_A(x_i)) * scaling`` of the session that owns rows i (PEFT's own sum);
- each module holding a session's own parameters (the cut's factors, a head) and each dropout run
  segment by segment as that session's module;
- the attention kernel runs segment by segment when it drops out (``segmented_attention``).

Whatever draws random numbers runs on its session's own RNG stream (``Segments.run``), started as
the session's solo step seeds the process's, so each session's rows see the masks of its solo step.
Between those runs the process's RNG holds a sentinel state: a draw anywhere else changes it, which
``Segments.clean`` reports, and the caller runs the sessions one at a time instead.
"""

from __future__ import annotations

import copy
import functools
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

SENTINEL_SEED = 0x5E6  # the process RNG's state between segments; no session draws from it
ATTENTION = "sft_segmented"  # the attention implementation name a SegmentedPart's config gets
_active = threading.local()  # the Segments of the part running now, for segmented_attention


def _rng_state(cuda: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def _seeded(seed: int, cuda: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The RNG state ``torch.manual_seed(seed)`` sets (on the CPU a fresh generator's: the same
    bytes, without the cost of seeding every device type)."""
    if cuda:
        torch.manual_seed(seed)
        return _rng_state(cuda)
    return torch.Generator().manual_seed(seed).get_state(), None


def _set_rng(state: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


class Segments:
    """Which rows of a batch are whose (dim 0, members in order), and each member's RNG stream."""

    def __init__(self, sizes: Sequence[int], seeds: Sequence[int], device: str = "cpu"):
        """``sizes``: each member's rows; ``seeds``: the seed each one's solo step would set."""
        self.sizes = list(sizes)
        self.total = sum(self.sizes)
        cuda = torch.device(device).type == "cuda"
        self.states = [_seeded(seed, cuda) for seed in seeds]
        self.sentinel = _seeded(SENTINEL_SEED, cuda)
        _set_rng(self.sentinel)

    def part(self, value: Any, i: int) -> Any:
        """Member ``i``'s rows of ``value`` when it is a tensor over the whole batch (or a tuple of
        them); else ``value``."""
        if isinstance(value, tuple):
            return tuple(self.part(v, i) for v in value)
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == self.total:
            start = sum(self.sizes[:i])
            return value[start : start + self.sizes[i]]
        return value

    def run(self, i: int, fn: Callable[[], Any]) -> Any:
        """``fn()`` drawing from member ``i``'s RNG stream (advanced as its solo step would)."""
        _set_rng(self.states[i])
        try:
            out = fn()
            self.states[i] = _rng_state(self.sentinel[1] is not None)
        finally:
            _set_rng(self.sentinel)
        return out

    def each(self, fn: Callable[[int], Any]) -> Any:
        """``fn(i)`` for every member on its own RNG stream, the outputs put back together on dim 0."""
        return concat([self.run(i, functools.partial(fn, i)) for i in range(len(self.sizes))])

    def clean(self) -> bool:
        """Whether nothing drew from the process's RNG outside a member's stream."""
        state = _rng_state(self.sentinel[1] is not None)
        return all(a is None or b is None or torch.equal(a, b) for a, b in zip(self.sentinel, state))


def concat(outs: List[Any]) -> Any:
    """Members' outputs (tensors, tuples of them, None) joined on dim 0."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)
    if isinstance(first, tuple):
        return tuple(concat([o[k] for o in outs]) for k in range(len(first)))
    return first


def _lora_layers(part: nn.Module) -> Set[str]:
    """Names of PEFT's LoRA layers in ``part`` (they hold ``lora_A`` and ``base_layer``)."""
    return {n for n, m in part.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def _own_modules(part: nn.Module) -> Set[str]:
    """The outermost modules holding a session's own parameters other than adapters."""
    owners = {
        name.rpartition(".")[0]
        for name, p in part.named_parameters()
        if p.requires_grad and "lora_" not in name
    }
    if "" in owners:
        raise ValueError("the part itself holds trainable parameters: nothing to share")
    return {n for n in owners if not any(n.startswith(o + ".") for o in owners if o != n)}


class SegmentedPart:
    """One forward of several sessions' parts (members of one model, split and LoRA targets)."""

    def __init__(self, template: nn.Module):
        """``template``: one member's part; the copy shares all its tensors (and uses only the frozen)."""
        tensors = list(template.parameters()) + list(template.buffers())
        self.part = copy.deepcopy(template, memo={id(t): t for t in tensors})
        own = _own_modules(template)
        inside = lambda name: any(name.startswith(o + ".") for o in own)  # noqa: E731
        self.names: List[str] = []  # modules run as each member's own, their names in every part
        for name in sorted(own):
            self._patch(name, self._members_module(name))
        for name in sorted(_lora_layers(template)):
            if not inside(name) and name not in own:
                self._patch(name, self._segmented_lora(name))
        for name, module in self.part.named_modules():
            if isinstance(module, nn.Dropout) and module.p > 0 and not inside(name) and name not in own:
                self._patch(name, self._segmented_dropout(module))
        self._attention_by_segment()
        self._segments: Optional[Segments] = None
        self._members: List[Dict[str, nn.Module]] = []
        self._lookup: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, members: Sequence[nn.Module], segments: Segments, *args: Any) -> Any:
        """The members' parts run on ``args`` (every member's rows on dim 0, in ``segments``' order)."""
        self._members = [self._modules_of(m) for m in members]
        self._segments = segments
        self.part.train(members[0].training)
        _active.segments = segments
        try:
            return self.part(*args)
        finally:
            self._segments, self._members, _active.segments = None, [], None

    def _modules_of(self, member: nn.Module) -> Dict[str, nn.Module]:
        found = self._lookup.get(member)
        if found is None:
            found = {name: member.get_submodule(name) for name in self.names}
            self._lookup[member] = found
        return found

    def _patch(self, name: str, forward: Callable[..., Any]) -> None:
        self.names.append(name)
        self.part.get_submodule(name).forward = forward

    def _now(self) -> Segments:
        assert self._segments is not None, "a SegmentedPart's modules run only inside its __call__"
        return self._segments

    def _members_module(self, name: str) -> Callable[..., Any]:
        """Each member's own module on its rows (its RNG stream: a cut's dropout)."""

        def forward(*args: Any, **kwargs: Any) -> Any:
            seg = self._now()

            def one(i: int) -> Any:
                a = [seg.part(x, i) for x in args]
                kw = {k: seg.part(v, i) for k, v in kwargs.items()}
                return self._members[i][name](*a, **kw)

            return seg.each(one)

        return forward

    def _segmented_lora(self, name: str) -> Callable[..., Any]:
        """The frozen base layer on all rows, plus each member's adapters on its rows."""
        base: Any = self.part.get_submodule(name).base_layer

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            seg = self._now()
            result = base(x, *args, **kwargs)
            deltas = [_lora_delta(self._members[i][name], seg.part(x, i)) for i in range(len(seg.sizes))]
            return (result + torch.cat(deltas)).to(result.dtype)

        return forward

    def _segmented_dropout(self, module: nn.Dropout) -> Callable[..., Any]:
        inner = module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            seg = self._now()
            return seg.each(lambda i: inner(seg.part(x, i)))

        return forward

    def _attention_by_segment(self) -> None:
        """The copy's attention kernel runs each member's rows on its stream (when it drops out)."""
        try:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
        except ImportError:  # an older transformers: a dropping attention is caught by Segments.clean
            return
        AttentionInterface.register(ATTENTION, segmented_attention)
        for module in self.part.modules():
            config: Any = getattr(module, "config", None)
            inner = getattr(config, "_attn_implementation", None)
            if inner in ALL_ATTENTION_FUNCTIONS and inner != ATTENTION:
                config.sft_inner_attention = inner
                config._attn_implementation = ATTENTION


def _lora_delta(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s adapters on ``x``, as PEFT's ``lora.Linear`` adds them to its base layer."""
    delta: Optional[torch.Tensor] = None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            raise ValueError("a LoRA variant (DoRA, ...) cannot be batched")
        a = layer.lora_A[name]
        term = layer.lora_B[name](a(layer.lora_dropout[name](x.to(a.weight.dtype)))) * layer.scaling[name]
        delta = term if delta is None else delta + term
    if delta is None:
        raise ValueError("a LoRA layer without an active adapter")
    return delta


def segmented_attention(module: Any, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The attention kernel of a ``SegmentedPart``: whole, unless it drops out in training; then
    each member's rows alone on its RNG stream, as in its solo step."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS[module.config.sft_inner_attention]
    seg: Optional[Segments] = getattr(_active, "segments", None)
    if seg is None or not kwargs.get("dropout") or query.shape[0] != seg.total:
        return inner(module, query, *args, **kwargs)

    def one(i: int) -> Any:
        a = [seg.part(x, i) for x in args]
        kw = {k: seg.part(v, i) for k, v in kwargs.items()}
        return inner(module, seg.part(query, i), *a, **kw)

    return seg.each(one)
