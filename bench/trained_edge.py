"""The edge half a finished split run trained: what its device sends up the (first) cut after training.

``trained_edge(DIR)`` opens a split run's ``--output-dir`` (or its export) the way
``sft_edge.finished.parts`` reopens it: the parts built from the base model the run names (checked
by its fingerprint), the run's LoRA adapters put on them as training put them, then the run's own
edge weights loaded over them (``load_owned``: every tensor the run saved must fit). It returns the
two-part split's net1, or the U's head, in eval mode: a module from a batch's ids, mask and token
types to the cut's (batch, seq, width) rows, as ``build_split_model``'s edge half is. The cloud's
part is not needed, nor a daemon.
"""

from __future__ import annotations

import os
from typing import Tuple

from safetensors.torch import load_file
from torch import nn

from sft_common.models.lora import lora_on_halves
from sft_common.storage.checkpoint import load_owned
from sft_common.topology.two_part import build_split_model
from sft_common.topology.ushape import lora_part
from sft_edge.data.glue import DataError
from sft_edge.finished.parts import base_of
from sft_edge.finished.record import EDGE, SPLIT, USHAPE, RunRecord, read_run
from sft_edge.sessions.tail_end import tail_end_of

EDGE_WEIGHTS = (EDGE, SPLIT, USHAPE)  # the folders whose first weight file is the edge's, as trained


def trained_edge(folder: str, device: str = "cpu") -> Tuple[nn.Module, RunRecord]:
    """The run in ``folder``'s edge half (net1, or the U's head) with its trained weights, and
    the run's record. DataError for a folder that holds no split run's edge, or a forward-only
    run's (its head is the base's: it never trained)."""
    record = read_run(folder)
    if record.part not in EDGE_WEIGHTS or record.forward_only:
        raise DataError(
            f"{folder} holds {record.part!r} weights{' of a forward-only run' if record.forward_only else ''}: "
            "give the --output-dir of a split run (two-part or --label-private), or its export"
        )
    state = load_file(os.path.join(folder, record.weight_files[0]), device=device)
    base, lora = base_of(record), record.lora_spec()
    if record.label_private:  # the edge saved its head and tail as one ModuleDict
        head, _, tail = tail_end_of(record.causal_lm).model(
            base, record.ushape_spec(), record.num_labels, record.seed, device
        )
        if lora is not None:
            lora_part(head, "head", lora, record.seed)
            lora_part(tail, "tail", lora, record.seed)
        load_owned(nn.ModuleDict({"head": head, "tail": tail}), state)
        return head.eval(), record
    edge, cloud = build_split_model(base, record.split_spec(), record.num_labels, record.seed, device=device)
    if lora is not None:
        lora_on_halves(edge, cloud, lora, record.seed)
    load_owned(edge, state)
    return edge.eval(), record
