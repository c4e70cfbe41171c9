"""A finished run's record (``sft_edge.json``): what was trained, how it was split, what its folder holds.

``RunRecord`` is written once when a run ends (``sft_edge.runs.trainer``), rewritten by
``sft-edge export`` (``part`` and ``weights`` change), and read by everything that uses the run
(``load_trained``, ``predict``, ``export``, ``forget``, ``generate``). Files of older runs, which
lack the fields added since (``factorise``, ``lm_shape``), read with the defaults those runs had.
Runs written before the calibrated initialisations left the product (after commit 2dbf857) may
say ``"svd_init": "plain"``, the one start there is now; a run that says another is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from sft_common.storage.atomic import write_json
from sft_common.topology.spec import FFN_OUTPUT, SplitSpec
from sft_edge.data.glue import DataError

RUN_FILE = "sft_edge.json"

# What a run's folder holds (``part``): the edge's weights of a split run (net1; the U's head and
# tail), whose cloud part stays with the daemon; the whole model (--local); or an export of a split
# run: both halves ("split"), the U's three parts ("ushape"), or those and the side network of a
# forward-only --adapters parallel run ("ushape-side": sft_edge.finished.side_parts).
EDGE, FULL, SPLIT, USHAPE, USHAPE_SIDE = "edge", "full", "split", "ushape", "ushape-side"
CAUSAL_LM = "causal-lm"


@dataclass
class RunRecord:
    """The fields of ``sft_edge.json``, one a line, in the order they are written."""

    part: str  # edge | full | split | ushape | ushape-side (above)
    model: str  # the base model's name, as --model gave it
    mode: str  # sft | sl | local
    problem: str  # classification | regression | causal-lm
    num_labels: int  # 0 for a causal LM (its head is the vocabulary's)
    seed: int
    max_seq_len: int
    weights: Union[str, List[str]] = "model.safetensors"  # one file, or an export's edge and cloud files
    format: int = 1
    split_layer: Optional[int] = None
    label_private: bool = False  # the U-shape: the weights hold head.* and tail.*
    tail_layers: Optional[int] = None
    forward_only: bool = False  # a U whose head and middle stayed the base's: the cloud kept nothing
    adapters: Optional[str] = None  # forward-only: what trained on the device (tail | parallel)
    rank: int = 8
    factorise: str = FFN_OUTPUT  # the FFN linear cut: predict and export rebuild its halves
    lm_shape: Optional[str] = None  # causal LM: the rows' shape (generate templates chat runs' prompts)
    task: str = "custom"
    labels: Optional[List[str]] = None  # names, in id order; None: regression (or a causal LM)
    text_columns: List[str] = field(default_factory=lambda: ["text"])
    label_column: Optional[str] = None
    batch_size: int = 32
    wire_dtype: str = "fp32"
    compression: str = "none"
    lora: Optional[Dict[str, Any]] = None  # LoRA: the weights hold only what training owns
    base_fingerprint: Optional[str] = None  # the base the LoRA weights need, checked on load
    session_id: Optional[str] = None  # the cloud session that keeps the run's cloud part
    steps: int = 0
    metrics: Dict[str, float] = field(default_factory=dict)

    @property
    def causal_lm(self) -> bool:
        return self.problem == CAUSAL_LM

    @property
    def weight_files(self) -> List[str]:
        return [self.weights] if isinstance(self.weights, str) else list(self.weights)

    def split_spec(self) -> SplitSpec:
        """The two-part split (or the U's first cut) the run trained with."""
        assert self.split_layer is not None, f"a {self.part!r} run has no split"
        return SplitSpec(self.split_layer, self.rank, self.mode, factorise=self.factorise)

    def ushape_spec(self):
        """The U the run trained with (``label_private``)."""
        from sft_common.topology.ushape import UShapeSpec

        assert self.split_layer is not None and self.tail_layers is not None
        return UShapeSpec(self.split_layer, self.rank, self.tail_layers, self.mode, factorise=self.factorise)

    def lora_spec(self):
        """The run's LoRA (``sft_common.models.lora.LoraSpec``), or None."""
        from sft_common.models.lora import LoraSpec

        return LoraSpec.from_dict(self.lora) if self.lora else None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def write(self, folder: str) -> None:
        write_json(os.path.join(folder, RUN_FILE), self.as_dict())

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> RunRecord:
        """A record from ``sft_edge.json``'s fields; a null where a default exists (older runs
        wrote ``"factorise": null``) takes the default. DataError for a run whose factors started
        from a calibrated initialisation (no longer in the product)."""
        init = data.get("svd_init")
        if init not in (None, "plain"):
            raise DataError(
                f"this run started its factors with --svd-init {init}, which was removed from sft-edge "
                "(docs/accuracy.md: no gain, more leakage); the last commit that reads such runs is 2dbf857"
            )
        known = {f.name for f in fields(cls)}
        kept = {k: v for k, v in data.items() if k in known}
        for name in ("factorise", "rank", "text_columns"):
            if kept.get(name) is None:
                kept.pop(name, None)
        return cls(**kept)


def read_run(folder: str) -> RunRecord:
    """What ``sft_edge.json`` in ``folder`` says about the trained model."""
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        raise DataError(
            f"{folder}: no {RUN_FILE}; give a training run's --output-dir or a folder `sft-edge export` wrote"
        )
    with open(path) as f:
        data = json.load(f)
    missing = [name for name in ("part", "model", "mode", "problem", "num_labels") if name not in data]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: it is not a run's record")
    return RunRecord.from_dict(data)
