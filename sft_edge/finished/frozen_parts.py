"""A forward-only run's export, made here: its head and middle are the base's, only its tail trained.

``sft-edge export`` of a ``--forward-only`` run needs no daemon: the U's three parts are built from
the base model (with the run's LoRA on each, as ``parts.load_ushape`` builds an export: fresh
adapters are the identity, so the head's and the middle's change nothing), the run's trained tail is
loaded into them, and the files are written as the export of a backprop U holds them
(``edge.safetensors``: the head and the tail; ``cloud.safetensors``: the middle).
"""

from __future__ import annotations

import os
from typing import Dict

from safetensors.torch import load_file, save
from torch import nn

from sft_common.storage.checkpoint import owned_state
from sft_edge.data.glue import DataError
from sft_edge.finished.parts import base_of
from sft_edge.finished.record import RunRecord


def forward_only_files(folder: str, record: RunRecord) -> Dict[str, bytes]:
    """``{file name: safetensors bytes}`` of the export of the forward-only run in ``folder``."""
    from sft_common.topology.ushape import lora_part
    from sft_edge.sessions.tail_end import tail_end_of

    spec, seed, lora = record.ushape_spec(), record.seed, record.lora_spec()
    parts = tail_end_of(record.causal_lm).model(base_of(record), spec, record.num_labels, seed, "cpu")
    if lora is not None:
        for which, part in zip(("head", "middle", "tail"), parts):
            lora_part(part, which, lora, seed)
    head, middle, tail = parts
    edge = nn.ModuleDict({"head": head, "tail": tail})
    trained = load_file(os.path.join(folder, "edge.safetensors"))
    _, unexpected = edge.load_state_dict(trained, strict=False)  # the head is the base's: not saved
    if unexpected or not all(k.startswith("tail.") for k in trained):
        raise DataError(
            f"{folder}/edge.safetensors does not hold this run's tail (unexpected: {unexpected[:5]})"
        )
    return {"edge.safetensors": save(owned_state(edge)), "cloud.safetensors": save(owned_state(middle))}
