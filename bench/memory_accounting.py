"""Exact training memory of one step, by module: what `--local` holds, and what each split half holds.

Counted from the real tensors of one step on one batch, through the product's own code:
``params`` (every parameter), ``grads`` (every ``.grad`` as the optimizer steps; the word
embedding's is dense), ``adam`` (AdamW's state after the step), ``saved`` (the storages autograd
keeps for backward, seen by a ``saved_tensors_hooks`` pack hook, counted once per storage and
charged to the innermost module running; parameters, buffers and the batch are left out, and ops
outside any module, such as the packing of the cut and the loss, go to ``(outside)``). Modules
are named as in the unsplit model on every side (``canonical``), so the cloud half's bytes are
what moved off the edge. Transient buffers (activation gradients, the optimizer's temporaries)
and allocator slack are not counted: they are what a resident-size peak adds.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Callable, Dict, List, Set, Tuple

import torch
from torch import nn

OUTSIDE = "(outside)"
MODEL = "(model)"
KINDS = ("params", "grads", "adam", "saved")
Groups = Dict[str, Dict[str, int]]  # module group -> kind -> bytes


def canonical(side: str, name: str, split_layer: int = 0) -> str:
    """A module's qualified name in its root (``local``: the whole model; ``edge``: ``EdgeHalf``;
    ``cloud``: ``CloudHalf``) -> its group, named as in the unsplit model."""
    l = split_layer
    if side == "local":
        name = re.sub(r"^encoder\.layer\.", "layers.", re.sub(r"^bert\.?", "", name))
    elif side == "edge":  # layers 0..l-1 keep their index; layer l's attention, intermediate and u
        name = re.sub(r"^(attention|intermediate)", rf"layers.{l}.\1", name)
        name = re.sub(r"^u$", f"layers.{l}.output.u", name)
    else:  # the cloud's layers.k is layer l+1+k; its tail is the rest of layer l's output
        name = re.sub(r"^layers\.(\d+)", lambda m: f"layers.{l + 1 + int(m.group(1))}", name)
        name = re.sub(r"^tail", f"layers.{l}.output.tail", name)
    m = re.match(r"^layers\.(\d+)(?:\.(attention|intermediate|output)(?:\.(u|tail))?)?", name)
    if m:
        return "layer." + ".".join(g for g in m.groups() if g)
    for group in ("embeddings", "pooler", "classifier"):
        if name.startswith(group):
            return group
    if name == "dropout":  # the head's dropout, before the classifier
        return "classifier"
    return MODEL


class Recorder:
    """Counts one training step's parameter, gradient, AdamW-state and saved-activation bytes."""

    def __init__(self, side: str = "local") -> None:
        self.groups: Dict[Tuple[str, str], Dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
        self.side = side  # whose ops run outside any watched module
        self.wire: Dict[str, int] = defaultdict(int)
        self._stack: List[Tuple[str, str]] = []
        self._seen: Set[int] = set()
        self._exclude: Set[int] = set()
        self._names: Dict[int, Tuple[str, str]] = {}  # id(param) -> (side, group)
        self._handles: List[Any] = []

    def watch(self, root: nn.Module, side: str, split_layer: int = 0) -> None:
        """Charge ``root``'s parameters and the activations saved inside it to ``side``."""
        for name, module in root.named_modules():
            group = canonical(side, name, split_layer)
            self._handles.append(module.register_forward_pre_hook(self._push(side, group)))
            self._handles.append(module.register_forward_hook(self._pop))
            for p in module.parameters(recurse=False):
                self._names[id(p)] = (side, group)
                self.groups[side, group]["params"] += p.numel() * p.element_size()
                self._exclude.add(p.untyped_storage().data_ptr())
            for b in module.buffers(recurse=False):
                self._exclude.add(b.untyped_storage().data_ptr())

    def train_step(self, session: Any, batch: Any, optimizers: List[torch.optim.Optimizer]) -> None:
        """``session``'s step 0 on ``batch``, counted; then the hooks are removed."""
        # The batch's storages exist whatever the split: never counted as activations.
        for t in (batch.input_ids, batch.token_type_ids, batch.attention_mask, batch.labels):
            self._exclude.add(t.untyped_storage().data_ptr())
        self._handles += [opt.register_step_pre_hook(self._count_grads) for opt in optimizers]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                session.train_step(0, batch)
            for opt in optimizers:  # AdamW's state after its step: every tensor it keeps per parameter
                for p, state in opt.state.items():
                    adam = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
                    self.groups[self._names[id(p)]]["adam"] += adam
        finally:
            for h in self._handles:
                h.remove()

    def _count_grads(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        """Gradients as the optimizer sees them, before it steps."""
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.groups[self._names[id(p)]]["grads"] += p.grad.numel() * p.grad.element_size()

    def _push(self, side: str, group: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self._stack.append((side, group))

        return hook

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        self._stack.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, opaque): not seen here
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in self._exclude and ptr not in self._seen:
            self._seen.add(ptr)
            side, group = self._stack[-1] if self._stack else (self.side, OUTSIDE)
            self.groups[side, group]["saved"] += storage.nbytes()
        return t

    def groups_of(self, side: str) -> Groups:
        return {group: dict(kinds) for (s, group), kinds in self.groups.items() if s == side}


def account_local(base: Any, batch: Any) -> Groups:
    """``--local``: the whole model (``LocalSession``), one training step on ``batch``."""
    from bench.harness import local_session

    session = local_session(base, 2)
    rec = Recorder()
    rec.watch(session.model, "local")
    rec.train_step(session, batch, [session.optimizer])
    return rec.groups_of("local")


def account_split(base: Any, spec: Any, batch: Any, wire: str = "fp32") -> Dict[str, Any]:
    """One split training step through the product (``EdgeSession`` and a ``CloudSession`` in
    this process, the messages serialized both ways): ``{"edge": groups, "cloud": groups, "wire":
    {...}}``, ``wire`` being the codec's bytes at each end and the messages', read as they cross
    (by a listener that also tells whose turn it is: the cloud's from the step sent to its answer)."""
    from bench.harness import inproc, split_session
    from sft_edge.runs.config import LinkOptions

    transport = inproc(base)
    link = LinkOptions(wire_dtype=wire)
    session = split_session(base, spec, transport, 2, len(batch.lengths), batch.input_ids.shape[1], link)
    cloud = transport.protocol.session
    rec = Recorder(side="edge")
    rec.watch(session.net1, "edge", spec.split_layer)
    rec.watch(cloud.net2, "cloud", spec.split_layer)

    def crossed(direction: str, msg: Any, at: float) -> None:
        if msg.WhichOneof("kind") != "train":
            return
        tensor = msg.train.activations if direction == "sent" else msg.train.grad
        encoded, decoded = len(tensor.data), math.prod(tensor.shape) * 4  # decoded to float32
        sender, receiver = ("edge", "cloud") if direction == "sent" else ("cloud", "edge")
        rec.wire[f"{sender}_encode"] += encoded
        rec.wire[f"{receiver}_decode"] += decoded
        rec.wire[f"message_{direction}"] += msg.ByteSize()
        rec.side = receiver

    transport.listeners.append(crossed)
    try:
        rec.train_step(session, batch, [session.optimizer, cloud.optimizer])
    finally:
        session.close()
    return {"edge": rec.groups_of("edge"), "cloud": rec.groups_of("cloud"), "wire": dict(rec.wire)}


def total(groups: Groups, kinds: Tuple[str, ...] = KINDS) -> int:
    return sum(v[k] for v in groups.values() for k in kinds)


def by_kind(groups: Groups) -> Dict[str, int]:
    return {k: sum(v[k] for v in groups.values()) for k in KINDS}


def split_summary(local: Groups, split: Dict[str, Any]) -> Dict[str, Any]:
    """What moved to the cloud and what the edge keeps, wire copies included (bytes, shares of
    local's). The one-off breakdown of the edge's new holdings and of the cut's own output
    (docs/benchmarks.md §5) ran at 2a703f4: bench/results/memory.json keeps it, and
    ``git show 51eb003:bench/memory_accounting.py`` has its code."""
    edge, cloud, wire = split["edge"], split["cloud"], split["wire"]
    local_total, cloud_total = total(local), total(cloud)
    edge_wire = sum(
        wire.get(k, 0) for k in ("edge_encode", "edge_decode", "message_sent", "message_received")
    )
    return {
        "edge_bytes": total(edge) + edge_wire,
        "moved_bytes": cloud_total,
        "moved_share": cloud_total / local_total,
        "edge_saved_share": 1 - (total(edge) + edge_wire) / local_total,
    }


def mib(n: float) -> float:
    return n / 2**20
