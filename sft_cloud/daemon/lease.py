"""Which replica owns a session, when replicas share ``--checkpoint-dir``: a lease with an epoch.

Two kinds of file in ``<checkpoint-dir>/.leases/<session id>/`` (beside the session's own folder,
which keeps holding checkpoints and final weights only):

- ``epoch-<n>`` (empty): the claim of epoch n, created with ``O_CREAT | O_EXCL``, so exactly one
  replica gets each epoch; claims are never removed while the session trains. The holder of
  epoch e is therefore *fenced* as soon as ``epoch-<e+1>`` exists: one ``stat``.
- ``lease.json``: ``{"epoch", "replica", "expires"}``, the holder and the wall-clock time its
  lease runs out; written (temporary file, then ``os.replace``) by the holder when it takes the
  session and at each renewal. It is also the check that survives NFS attribute caching (an
  ``open`` revalidates): a holder is fenced when it names a higher epoch than its own, or is
  gone (the session closed and its lease folder was removed).

A replica takes a session (``acquire``) when the device's stream arrives for a session it does
not hold in memory: the owner died (its lease expired), or the proxy moved the device while the
owner lives (split brain). Either way it claims the next epoch before it reads the newest
checkpoint, so the old owner cannot write a newer one afterwards: it checks the lease before it
applies a step and before each write, and drops the session (``SessionMoved``: ABORTED, which
the edge retries, re-attaching through the proxy to the new owner).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import grpc
import torch

from sft_common.storage import checkpoint
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.wire.errors import ProtocolError

LEASE_FILE = "lease.json"
LEASES = ".leases"  # under --checkpoint-dir; session ids never start with a dot
_CLAIM = re.compile(r"^epoch-(\d+)$")


def lease_folder(checkpoint_dir: str, session_id: str) -> str:
    return os.path.join(checkpoint_dir, LEASES, session_id)


def default_replica_id() -> str:
    """``<hostname>-<pid>``: unique among live replicas (a pod's hostname is its name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class SessionMoved(ProtocolError):
    """Another replica took the session over; this one must not touch it any more."""

    def __init__(self, epoch: int, record: Optional[LeaseRecord]):
        where = f" ({record.replica}, epoch {record.epoch})" if record and record.epoch > epoch else ""
        super().__init__(
            grpc.StatusCode.ABORTED,
            f"session moved to another replica{where}; re-attach through the proxy to continue there",
        )


@dataclass(frozen=True)
class LeaseRecord:
    """What ``lease.json`` says: the holder's epoch and id, and when its lease runs out (unix s)."""

    epoch: int
    replica: str
    expires: float

    def expired(self, now: Optional[float] = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


def read_record(folder: str) -> Optional[LeaseRecord]:
    """The lease of the session in ``folder``; None when it has none (or it is unreadable)."""
    try:
        with open(os.path.join(folder, LEASE_FILE)) as f:
            data = json.load(f)
        return LeaseRecord(int(data["epoch"]), str(data["replica"]), float(data["expires"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claimed_epochs(folder: str) -> int:
    """The highest epoch claimed in ``folder`` (0: none)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    return max((int(m.group(1)) for m in map(_CLAIM.match, names) if m), default=0)


class Lease:
    """This replica's lease on one session: take it (the next epoch), check it, renew it."""

    def __init__(
        self, folder: str, replica: str, seconds: float = 30.0, clock: Callable[[], float] = time.time
    ):
        self.folder = folder
        self.replica = replica
        self.seconds = seconds  # a lease not renewed for this long has expired
        self.clock = clock  # wall clock: replicas on different hosts compare expiry times
        self.epoch = 0  # 0: not taken

    def _claim(self, epoch: int) -> str:
        return os.path.join(self.folder, f"epoch-{epoch:09d}")

    def acquire(self, attempts: int = 100) -> Optional[LeaseRecord]:
        """Claim the next epoch (the first, for a new session) and write the lease; returns the
        previous holder's record (None for a new session). Never waits for a live holder: the
        device came here, so the holder is fenced from now on."""
        os.makedirs(self.folder, exist_ok=True)
        previous = read_record(self.folder)
        for _ in range(attempts):
            epoch = claimed_epochs(self.folder) + 1
            try:
                os.close(os.open(self._claim(epoch), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:  # another replica claimed it first: try the next one
                continue
            self.epoch = epoch
            self._write(self.clock() + self.seconds)
            return previous
        raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"could not claim a lease in {self.folder}")

    def held(self) -> bool:
        """Whether no replica has taken the session since this one did (a stat and a small read)."""
        if self.epoch == 0 or os.path.exists(self._claim(self.epoch + 1)):
            return False
        record = read_record(self.folder)
        return record is not None and record.epoch <= self.epoch

    def check(self) -> None:
        """Raise ``SessionMoved`` unless this replica still holds the session."""
        if not self.held():
            raise SessionMoved(self.epoch, read_record(self.folder))

    def renew(self) -> bool:
        """Extend the lease by ``seconds``; False (nothing written) when the session moved."""
        if not self.held():
            return False
        self._write(self.clock() + self.seconds)
        return True

    def release(self) -> None:
        """The session left this replica in good order (closed, evicted, shut down): the lease
        says it ran out now, so a takeover is logged as one of a released session."""
        if self.held():
            self._write(self.clock())

    def remove(self) -> None:
        """The session closed here: its lease folder goes (``lease.json`` first, so a stale holder
        reading it finds itself fenced)."""
        if self.held():
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, LEASE_FILE))
            shutil.rmtree(self.folder, ignore_errors=True)

    def _write(self, expires: float) -> None:
        path = os.path.join(self.folder, LEASE_FILE)
        tmp = f"{path}.tmp-{os.getpid()}-{self.epoch}"
        with open(tmp, "w") as f:
            json.dump({"epoch": self.epoch, "replica": self.replica, "expires": expires}, f)
        os.replace(tmp, path)


class FencedCheckpointDir(CheckpointDir):
    """A session's checkpoint folder whose writes happen only while ``lease`` is held: the file is
    written under a temporary name, the lease checked, then the file renamed into place; a
    fenced replica leaves nothing behind and raises ``SessionMoved``."""

    def __init__(self, folder: str, lease: Lease, keep: int = 3):
        super().__init__(folder, keep)
        self.lease = lease

    def save(self, step: int, tensors: Dict[str, torch.Tensor], meta: Dict) -> str:
        self.lease.check()  # before the work of writing
        path = self.path(step)
        tmp = f"{path}.epoch-{self.lease.epoch}"  # not a step file: steps() does not list it
        checkpoint.save(tmp, tensors, meta)
        try:
            self.lease.check()  # the last moment before the file becomes visible
        except SessionMoved:
            os.remove(tmp)
            raise
        os.replace(tmp, path)
        _fsync_folder(self.folder)
        for old in self.steps()[self.keep :]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(old))
        return path


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
