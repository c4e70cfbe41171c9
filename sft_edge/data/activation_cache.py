"""A forward-only run's activation cache: what the cloud's frozen middle answered for each example.

A forward-only run (``sft_edge.sessions.forward_only``) sends an example's first-cut activations
once. The middle's answer (``Answer``: named tensors of one row a token, fp32, as decoded from
the wire: ``rows``, the second cut (tokens, width); with ``--adapters parallel`` also ``side``, the
side network's inputs (tokens, (1 + layers) * side width)) is kept here, one file an example holding
all of them, under the example's hash, so later epochs, dev evaluations and ``--resume`` read it and
send nothing. ``cache.json`` in the folder names what the values depend on (the base's
fingerprint, the cuts, the wire, the side width): a folder made for anything else is refused,
never read. Each file also names its example's hash and token count, checked when it is read; files appear whole
(written beside, then renamed), so a run killed mid-write leaves none half written.
``budget_mb`` bounds the files: an example past it is sent again each epoch (slower, not wrong).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sft_common.storage.atomic import write_json

MANIFEST = "cache.json"
Answer = Dict[str, torch.Tensor]  # what is kept for one example: name -> (tokens, ...) fp32


class CacheMismatch(ValueError):
    """The cache folder was made for another base model, cut or wire."""


def example_key(input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> str:
    """The hash of one example's real tokens (and segment ids): what the middle's answer depends on."""
    digest = hashlib.sha256(input_ids.to(torch.int64).cpu().numpy().tobytes())
    if token_type_ids is not None:
        digest.update(token_type_ids.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()


class ActivationCache:
    """Example hash -> the middle's ``Answer``; on disk in ``folder``, or in memory (None)."""

    def __init__(self, folder: Optional[str], identity: Dict[str, Any], budget_mb: float):
        self.folder, self.identity = folder, identity
        self.budget = int(budget_mb * 2**20)
        self.memory: Dict[str, Answer] = {}
        self.used = 0  # bytes held
        self.hits = self.misses = self.skipped = 0  # reads answered, reads not, stores over budget
        if folder is not None:
            self._open_folder(folder)

    def _open_folder(self, folder: str) -> None:
        manifest = os.path.join(folder, MANIFEST)
        if os.path.isfile(manifest):
            with open(manifest) as f:
                found = json.load(f).get("identity")
            if found != self.identity:
                raise CacheMismatch(
                    f"{folder} caches another model, cut or wire ({_differs(found, self.identity)}): "
                    "remove it, or give this run another --output-dir"
                )
        else:
            os.makedirs(folder, exist_ok=True)
            write_json(manifest, {"identity": self.identity})
        self.used = sum(
            os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors")
        )

    def get(self, key: str, tokens: int) -> Optional[Answer]:
        """The cached answer for the example ``key`` of ``tokens`` tokens, or None."""
        answer = self.memory.get(key) if self.folder is None else self._read(key)
        if not answer or any(t.shape[0] != tokens for t in answer.values()):
            self.misses += 1
            return None
        self.hits += 1
        return answer

    def _read(self, key: str) -> Optional[Answer]:
        path = self._path(key)
        if not os.path.isfile(path):
            return None
        try:
            answer = load_file(path)
        except (SafetensorError, OSError):
            return None  # unreadable: sent again, and rewritten
        with open(path, "rb") as f:  # the header's metadata: the example it was written for
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        return answer if header.get("__metadata__", {}).get("key") == key else None

    def put(self, key: str, answer: Answer) -> bool:
        """Keep ``answer`` for the example ``key`` unless the budget is spent; True if kept."""
        size = sum(t.numel() * 4 for t in answer.values())
        if self.used + size > self.budget:
            self.skipped += 1
            return False
        answer = {name: t.detach().float().cpu().contiguous() for name, t in answer.items()}
        if self.folder is None:
            self.memory[key] = answer
        else:
            path = self._path(key)
            tmp = f"{path}.tmp-{os.getpid()}"
            save_file(answer, tmp, metadata={"key": key})
            os.replace(tmp, path)
        self.used += size
        return True

    def _path(self, key: str) -> str:
        assert self.folder is not None
        return os.path.join(self.folder, f"{key}.safetensors")


def _differs(found: Any, wanted: Dict[str, Any]) -> str:
    """Which of the identity's fields differ, for the error."""
    if not isinstance(found, dict):
        return "no identity recorded"
    names = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return ", ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} here" for k in names)
