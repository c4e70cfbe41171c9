"""The edge's checkpoints in ``--output-dir``: net1 (or the whole model), optimizer, schedule, run.

``<output-dir>/checkpoints/step-<k>.safetensors`` holds the state after k steps, written
atomically after the cloud has written its own checkpoint of the same step. Data order and
dropout are functions of the step number, so the step is the whole data position and RNG state.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List

from sft_common import checkpoint

_NAME = re.compile(r"^step-(\d+)\.safetensors$")


class EdgeCheckpoints:
    def __init__(self, output_dir: str, keep: int = 3):
        self.dir = os.path.join(output_dir, "checkpoints")
        self.keep = keep  # the cloud keeps 3 too: an edge crash mid-checkpoint still finds a common step

    def steps(self) -> List[int]:
        """Steps with a complete checkpoint, newest first."""
        if not os.path.isdir(self.dir):
            return []
        return sorted((int(m.group(1)) for m in map(_NAME.match, os.listdir(self.dir)) if m), reverse=True)

    def path(self, step: int) -> str:
        return os.path.join(self.dir, f"step-{step:09d}.safetensors")

    def save(self, step: int, backend: Any, run: Dict) -> None:
        tensors, meta = checkpoint.pack(backend.module, backend.optimizer, backend.schedule)
        meta.update(step=step, run=run)
        checkpoint.save(self.path(step), tensors, meta)
        for old in self.steps()[self.keep :]:
            os.remove(self.path(old))

    def run_meta(self, step: int) -> Dict:
        """The run record saved with a checkpoint (session id, losses, evals, ...), no tensors."""
        import json

        from safetensors import safe_open

        with safe_open(self.path(step), framework="pt") as f:
            return json.loads((f.metadata() or {})["sft"])["run"]

    def load(self, step: int, backend: Any) -> Dict:
        """Restore the backend's module, optimizer and schedule; returns the run record."""
        tensors, meta = checkpoint.load(self.path(step), device=getattr(backend, "device", "cpu"))
        checkpoint.unpack(tensors, meta, backend.module, backend.optimizer, backend.schedule)
        return meta["run"]
