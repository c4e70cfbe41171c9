"""A forward-only ``--adapters parallel`` run's export: the frozen U's three parts and the side network beside them.

The run trained a side network (``sft_common.topology.side``) and, for a classifier, the task head;
the head, the middle and the rest of the tail are the base's, frozen. So ``sft-edge export`` needs no
daemon here either (as ``frozen_parts`` for a tail run): ``side_files`` builds the three parts from
the base model, loads what the run trained into them, and writes ``edge.safetensors`` (the head,
the tail and the side network, ``head.*``, ``tail.*``, ``side.*``) and ``cloud.safetensors`` (the
middle), as whole modules. P, the side network's projection, is not saved: it is a function of the
base's fingerprint (``RunRecord.base_fingerprint``), rebuilt on load as the daemon and the edge
built it in training.

``load_sided(folder, record)`` opens such a folder (``record.part`` ``USHAPE_SIDE``) with no base
model and no daemon: a ``SidedU``, whose forward is the logits of a batch as a daemon's session
computes them (the middle on the first cut with zeros at padding, its layers tapped by P; the tail
on h2 + side([P·x1, P·h_1, ...]) at real tokens). ``SideMiddle`` is the same middle for KV-cached
generation: the middle's step on the new rows with their taps, and the side network's output
added, so ``cached.UShapeLM`` runs it as it runs any middle (the side network is a function of
each token alone, so the new rows' side needs no cache of its own).
"""

from __future__ import annotations

import os
from typing import Dict, cast

import torch
from safetensors.torch import load_file, save
from torch import nn

from sft_common.storage.checkpoint import owned_state
from sft_common.topology.kv_cache import KVCache, middle_step
from sft_common.topology.side import SideNetwork, middle_taps, side_projection, side_width, tapped
from sft_common.topology.ushape import CloudMiddle
from sft_edge.data.glue import Batch, DataError
from sft_edge.finished.parts import base_of, load_ushape
from sft_edge.finished.record import RUN_FILE, RunRecord


def side_network(record: RunRecord, hidden: int, num_layers: int) -> SideNetwork:
    """The run's side network, untrained (its weights are loaded after), for a model of width
    ``hidden`` and ``num_layers`` layers: an adapter for each middle layer, P from the base's fingerprint."""
    spec = record.ushape_spec()
    layers = spec.second_layer(num_layers) - spec.split_layer  # the middle's (as ParallelPlacement's)
    if not record.base_fingerprint:
        raise DataError(
            f"{RUN_FILE} names no base fingerprint: the side network's projection is built from it"
        )
    projection = side_projection(record.base_fingerprint, hidden, side_width(hidden))
    return SideNetwork(hidden, layers, projection, record.seed)


def side_files(folder: str, record: RunRecord) -> Dict[str, bytes]:
    """``{file name: safetensors bytes}`` of the export of the ``--adapters parallel`` run in ``folder``."""
    from sft_edge.sessions.tail_end import tail_end_of

    base = base_of(record)
    end = tail_end_of(record.causal_lm)
    head, middle, tail = end.model(base, record.ushape_spec(), record.num_labels, record.seed, "cpu")
    side = side_network(record, base.hidden_size, base.num_hidden_layers)
    edge = nn.ModuleDict({"head": head, "tail": tail, "side": side})
    trained = load_file(os.path.join(folder, "edge.safetensors"))
    _, unexpected = edge.load_state_dict(trained, strict=False)  # the frozen backbone is the base's
    untrained = sorted(k for k in owned_state(edge) if k.startswith("side.") and k not in trained)
    if unexpected or untrained or not all(k.startswith(("tail.", "side.")) for k in trained):
        raise DataError(
            f"{folder}/edge.safetensors does not hold this run's side network and task head "
            f"(unexpected: {unexpected[:5]}, missing: {untrained[:5]})"
        )
    return {"edge.safetensors": save(owned_state(edge)), "cloud.safetensors": save(owned_state(middle))}


class SidedU(nn.Module):
    """An exported ``--adapters parallel`` run: the head, middle and tail, and the side network beside them."""

    def __init__(self, head: nn.Module, middle: CloudMiddle, tail: nn.Module, side: SideNetwork):
        super().__init__()
        self.head, self.middle, self.tail, self.side = head, middle, tail, side

    def forward(self, batch: Batch, index: int = 0) -> torch.Tensor:
        """Logits of ``batch``: (batch, num_labels), or a causal LM's (batch, seq, vocab)."""
        mask = batch.attention_mask
        rows = mask[..., None].float()  # as through a daemon: only real rows cross, re-padded with zeros
        first, _ = self.head(batch.input_ids, mask, batch.token_type_ids)
        second, taps = middle_taps(self.middle, first.float() * rows, mask, self.side.projection)
        side = self.side(torch.cat([self.side.start(first), taps], dim=-1) * rows)
        return self.tail(second * rows + side * rows, mask)


def load_sided(folder: str, record: RunRecord, device: str = "cpu") -> SidedU:
    """The export in ``folder``, loaded and in eval mode; no base model is read."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    side = side_network(record, config.hidden_size, config.num_hidden_layers).to(device)
    head, middle, tail = load_ushape(folder, record, device, beside={"side": side})
    return SidedU(head, cast(CloudMiddle, middle), tail, side).eval()


class SideMiddle:
    """An exported middle with the side network, for ``cached.UShapeLM``: (1, q, hidden) rows of
    the first cut at ``start`` -> what the tail reads there, h2 + the side network's output."""

    def __init__(self, sided: SidedU, cap: int):
        self.middle, self.side, self.cache = sided.middle, sided.side, KVCache(cap)

    def __call__(self, cut: torch.Tensor, start: int) -> torch.Tensor:
        with tapped(self.middle.layers, self.side.projection) as taps:
            second = middle_step(self.middle, self.cache, cut, start)
        return second + self.side(torch.cat([self.side.start(cut), *taps], dim=-1))

    def clear(self) -> None:
        self.cache.clear()
