"""Exact training memory of one step: what `--local` holds, and what each split half holds.

Counted from the real tensors of one step on one batch, through the product's own code:
``params`` (every parameter), ``grads`` (every ``.grad`` as the optimizer steps; the word
embedding's is dense), ``adam`` (AdamW's state after the step), ``saved`` (the storages autograd
keeps for backward, seen by a ``saved_tensors_hooks`` pack hook, counted once per storage and
charged to the side whose module is running; parameters, buffers and the batch are left out, and
ops outside any module, such as the packing of the cut and the loss, go to the side whose turn it
is). Transient buffers (activation gradients, the optimizer's temporaries) and allocator slack are
not counted: they are what a resident-size peak adds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, List, Set

import torch
from torch import nn

KINDS = ("params", "grads", "adam", "saved")
Counts = Dict[str, int]  # kind -> bytes


class Recorder:
    """Counts one training step's parameter, gradient, AdamW-state and saved-activation bytes, by side."""

    def __init__(self, side: str = "local") -> None:
        self.counts: Dict[str, Counts] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
        self.side = side  # whose ops run outside any watched module
        self.wire: Dict[str, int] = defaultdict(int)
        self._stack: List[str] = []
        self._seen: Set[int] = set()
        self._exclude: Set[int] = set()
        self._sides: Dict[int, str] = {}  # id(param) -> side
        self._handles: List[Any] = []

    def watch(self, root: nn.Module, side: str) -> None:
        """Charge ``root``'s parameters and the activations saved inside it to ``side``."""
        for module in root.modules():  # every module: a side may call its parts one by one
            self._handles.append(module.register_forward_pre_hook(lambda *_: self._stack.append(side)))
            self._handles.append(module.register_forward_hook(self._pop))
        for p in root.parameters():
            self._sides[id(p)] = side
            self.counts[side]["params"] += p.numel() * p.element_size()
            self._exclude.add(p.untyped_storage().data_ptr())
        for b in root.buffers():
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
                    self.counts[self._sides[id(p)]]["adam"] += adam
        finally:
            for h in self._handles:
                h.remove()

    def _count_grads(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        """Gradients as the optimizer sees them, before it steps."""
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.counts[self._sides[id(p)]]["grads"] += p.grad.numel() * p.grad.element_size()

    def _pop(self, *_: Any) -> None:  # a forward hook's return value would replace the output
        self._stack.pop()

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no plain storage (sparse, opaque): not seen here
            return t
        ptr = storage.data_ptr()
        if ptr and ptr not in self._exclude and ptr not in self._seen:
            self._seen.add(ptr)
            self.counts[self._stack[-1] if self._stack else self.side]["saved"] += storage.nbytes()
        return t


def account_local(base: Any, batch: Any) -> Counts:
    """``--local``: the whole model (``LocalSession``), one training step on ``batch``."""
    from bench.harness import local_session

    session = local_session(base, 2)
    rec = Recorder()
    rec.watch(session.model, "local")
    rec.train_step(session, batch, [session.optimizer])
    return rec.counts["local"]


def account_split(base: Any, spec: Any, batch: Any, wire: str = "fp32") -> Dict[str, Any]:
    """One split training step through the product (``EdgeSession`` and a ``TwoPartSession`` in
    this process, the messages serialized both ways): ``{"edge": counts, "cloud": counts, "wire":
    {...}}``, ``wire`` being the codec's bytes at each end and the messages', read as they cross
    (by a listener that also tells whose turn it is: the cloud's from the step sent to its answer)."""
    from bench.harness import inproc, split_session
    from sft_edge.runs.config import LinkOptions

    transport = inproc(base)
    link = LinkOptions(wire_dtype=wire)
    session = split_session(base, spec, transport, 2, len(batch.lengths), batch.input_ids.shape[1], link)
    cloud = transport.protocol.session
    rec = Recorder(side="edge")
    rec.watch(session.net1, "edge")
    rec.watch(cloud.net2, "cloud")

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
    return {"edge": rec.counts["edge"], "cloud": rec.counts["cloud"], "wire": dict(rec.wire)}


def total(counts: Counts) -> int:
    return sum(counts.values())


def split_summary(local: Counts, split: Dict[str, Any]) -> Dict[str, Any]:
    """What moved to the cloud and what the edge keeps, wire copies included (bytes, shares of local's)."""
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
