"""What the daemon keeps of a finished session, and what its owner can do with it.

At close a session's trained net2 goes to ``<checkpoint-dir>/<session id>/final.safetensors``
(with its owner, config and fingerprint in the header). Its owner can reopen it for inference
only (evaluations; no step can change it), fetch the file in chunks checked by a digest
(``sft-edge export``), or have it deleted (``sft-edge forget``). Finished sessions older than the
retention (``--keep-finished-days``) are deleted by the daemon.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from typing import List, Optional, Tuple

import grpc
from safetensors import safe_open
from safetensors.torch import load_file

from sft_cloud.sessions.core import SessionCore
from sft_common.proto import sft_pb2 as pb
from sft_common.storage import checkpoint
from sft_common.wire.errors import ProtocolError

log = logging.getLogger("sft_cloud")
FINAL = "final.safetensors"
CHUNK_BYTES = 1 << 20  # one WeightsChunk: well under gRPC's message limits


def final_path(checkpoint_dir: str, session_id: str) -> Optional[str]:
    """The finished session's weights file, or None for an id that cannot name a folder."""
    if not session_id or os.sep in session_id or session_id.startswith("."):
        return None
    return os.path.join(checkpoint_dir, session_id, FINAL)


def read_final(checkpoint_dir: str, session_id: str, owner: str) -> Tuple[dict, str]:
    """The header of a finished session that ``owner`` owns, and its path; PERMISSION_DENIED
    (the same answer as for an unknown id: nothing is learned about others' sessions) otherwise."""
    path = final_path(checkpoint_dir, session_id)
    denied = ProtocolError(
        grpc.StatusCode.PERMISSION_DENIED,
        "no finished session with this id is kept for this identity (forgotten, expired, or "
        "closed by a daemon without --checkpoint-dir)",
    )
    if path is None or not os.path.isfile(path):
        raise denied
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "owner" not in meta or not secrets.compare_digest(meta["owner"].encode(), owner.encode()):
        raise denied
    return meta, path


def load_weights(core: SessionCore, path: str) -> None:
    """net2's trained weights into a freshly built session, now for inference only."""
    checkpoint.load_owned(core.net2, load_file(path, device=core.device))
    core.net2.eval()
    core.inference_only = True
    core.final_path = path


def weights_chunk(core: SessionCore, index: int) -> pb.WeightsChunk:
    """Chunk ``index`` of the session's final weights file, with the whole file's digest."""
    path = core.final_path
    if not core.inference_only or path is None:
        raise ProtocolError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "weights can be fetched from a finished session only: close it, then reopen it for inference",
        )
    if core.final_digest is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(block)
        core.final_digest = digest.hexdigest()
    size = os.path.getsize(path)
    chunks = max(1, -(-size // CHUNK_BYTES))
    if not 0 <= index < chunks:
        raise ProtocolError(grpc.StatusCode.OUT_OF_RANGE, f"chunk {index} of a file in {chunks} chunks")
    with open(path, "rb") as f:
        f.seek(index * CHUNK_BYTES)
        data = f.read(CHUNK_BYTES)
    return pb.WeightsChunk(chunk=index, chunks=chunks, data=data, size=size, sha256=core.final_digest)


def forget(checkpoint_dir: Optional[str], session_id: str) -> None:
    """Delete everything kept of a session (its folder)."""
    if checkpoint_dir and final_path(checkpoint_dir, session_id) is not None:
        shutil.rmtree(os.path.join(checkpoint_dir, session_id), ignore_errors=True)
    log.info("session %s: forgotten at its owner's request", session_id[:8])


def purge_expired(checkpoint_dir: Optional[str], max_age_s: float, now: Optional[float] = None) -> List[str]:
    """Delete finished sessions (a final file and no step checkpoints) older than ``max_age_s``."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return []
    now = time.time() if now is None else now
    purged = []
    for name in os.listdir(checkpoint_dir):
        folder = os.path.join(checkpoint_dir, name)
        final = os.path.join(folder, FINAL)
        if not os.path.isfile(final) or any(n.startswith("step-") for n in os.listdir(folder)):
            continue
        age = now - os.path.getmtime(final)
        if age > max_age_s:
            shutil.rmtree(folder, ignore_errors=True)
            purged.append(name)
            log.info("session %s: finished %.1f days ago, deleted (retention)", name[:8], age / 86400)
    return purged
