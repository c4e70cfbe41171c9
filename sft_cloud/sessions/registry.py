"""The daemon's sessions: open new ones, re-attach to existing ones, share loaded base models.

With ``--checkpoint-dir`` every session this replica holds has a lease (``sft_cloud.daemon.lease``), so
that replicas sharing the folder never both change a session: an attach for a session held
elsewhere takes it over (the next epoch, then the newest checkpoint), and a session whose lease
was taken is dropped here without writing anything."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

import grpc

from sft_cloud.daemon.lease import (
    FencedCheckpointDir,
    Lease,
    LeaseRecord,
    SessionMoved,
    default_replica_id,
    lease_folder,
)
from sft_cloud.sessions import finished
from sft_cloud.sessions.admission import Admission
from sft_cloud.sessions.batcher import StepBatcher
from sft_cloud.sessions.core import Session
from sft_cloud.sessions.frozen import FrozenMiddleSession
from sft_cloud.sessions.host import SessionHost
from sft_cloud.sessions.inference import IdleCaches
from sft_cloud.sessions.middle import MiddleSession
from sft_cloud.sessions.two_part import TwoPartSession
from sft_cloud.sessions.validation import refuse_calibrated_init
from sft_common.models.base_model import BaseModel, ModelError, load_base_model
from sft_common.models.shared import SharedBase
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.wire.errors import ProtocolError

log = logging.getLogger("sft_cloud")


class SessionRegistry:
    """Thread-safe map of session id -> session (two-part or the U's middle), with a cap and a base-model cache."""

    def __init__(
        self,
        device: str = "cpu",
        max_sessions: int = 64,
        max_batch: int = 256,
        max_seq: int = 512,
        checkpoint_dir: Optional[str] = None,
        idle_timeout: float = 3600.0,
        replica_id: Optional[str] = None,
        lease_seconds: float = 30.0,
        batcher: Optional[StepBatcher] = None,
        admission: Optional[Admission] = None,
    ):
        self.idle_timeout = idle_timeout
        self.admission = admission or Admission(max_sessions)  # the limits; none given: max_sessions alone
        self.replica_id = replica_id or default_replica_id()  # names this replica in lease files
        self.lease_seconds = lease_seconds  # a lease not renewed for this long has expired
        self._sessions: Dict[str, Session] = {}
        self._leases: Dict[str, Lease] = {}  # of the sessions held, with a checkpoint dir
        self._takeover = threading.Lock()  # one attach-from-disk at a time: one claim per session
        self._bases: Dict[str, BaseModel] = {}
        self._frozen: Dict[Tuple, SharedBase] = {}  # one per model and split: its LoRA sessions share it
        self._lock = threading.Lock()
        self.batcher = batcher or StepBatcher(window=0.0)  # LoRA sessions' steps together (0 s: alone)
        self._compute_lock = self.batcher.compute_lock  # see SessionCore.rng
        # Where every session runs, its limits and its checkpoints (restored from there after a restart).
        self.host = SessionHost(device, self._compute_lock, max_batch, max_seq, checkpoint_dir)
        self.caches = IdleCaches()  # the KV caches of streams generating now: freed when idle

    def sessions(self) -> List[Session]:
        """The sessions held now (a snapshot)."""
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, msg: pb.OpenSession, owner: str) -> Session:
        """A new session (empty ``session_id``) or an existing one, checked against ``msg``."""
        refuse_calibrated_init(msg)  # however it opens: new, re-attached or finished
        if msg.inference_only:
            return self.reopen_finished(msg, owner)
        if msg.session_id:
            return self.attach(msg, owner)
        with self._lock:
            self._admit(msg.config)  # before anything is built: delta mode's caches included
        session = self._build(secrets.token_urlsafe(24), owner, msg.config, self._base(msg.config.model))
        _check_fingerprint(msg, session)
        lease, _ = self._take(session)
        try:
            with self._lock:
                self._admit(msg.config)  # again: another open may have taken the room meanwhile
                self._hold(session, lease)
        except ProtocolError:
            if lease is not None:
                lease.remove()
            raise
        return session

    def attach(self, msg: pb.OpenSession, owner: str) -> Session:
        """An existing session (in memory, or on disk after a restart or an eviction)."""
        with self._takeover:
            with self._lock:
                session = self._sessions.get(msg.session_id)
                lease = self._leases.get(msg.session_id)
            if session is not None and lease is not None and not lease.held():
                self._drop(msg.session_id, lease)  # taken over elsewhere: what is held here is stale
                log.info("session %s: moved to another replica; dropped here", msg.session_id[:8])
                session = None
            if session is None:
                session = self._from_disk(msg.session_id, owner)
        # The same status and message for "no such session" and "not yours": a caller learns
        # nothing about other identities' sessions, not even that an id exists.
        if session is None or not secrets.compare_digest(session.core.owner.encode(), owner.encode()):
            raise ProtocolError(
                grpc.StatusCode.PERMISSION_DENIED,
                "no session with this id is open for this identity (a daemon restarted without "
                "--checkpoint-dir forgets its sessions)",
            )
        _check_fingerprint(msg, session)
        return session

    def _from_disk(self, session_id: str, owner: str) -> Optional[Session]:
        """Take a session over from disk: claim the next epoch of its lease (the replica that held
        it is fenced from now on), then rebuild it from the newest checkpoint (``resume`` may then
        roll it back to an older one). Caller holds ``_takeover``."""
        if not self.checkpoint_dir or not session_id or os.sep in session_id or session_id.startswith("."):
            return None
        ckpts = CheckpointDir(os.path.join(self.checkpoint_dir, session_id))
        steps = ckpts.steps()
        if not steps:
            return None
        newest = steps[0]  # steps() lists newest first
        meta = ckpts.meta(newest)
        if not secrets.compare_digest(str(meta["owner"]).encode(), owner.encode()):
            raise ProtocolError(
                grpc.StatusCode.PERMISSION_DENIED, "no session with this id is open for this identity"
            )
        config = pb.SessionConfig.FromString(bytes.fromhex(meta["config"]))
        base = self._base(config.model)
        with self._lock:
            if session_id in self._sessions:  # another stream restored it meanwhile
                return self._sessions[session_id]
            self._admit(config)  # a restored session is held to today's limits
        session = self._build(session_id, str(meta["owner"]), config, base)
        lease, previous = self._take(session)
        try:
            newest = ckpts.steps()[0]  # read after the claim: the old holder can write no newer one
            session.core.restore(newest)
        except (OSError, IndexError) as exc:  # a checkpoint pruned meanwhile: the edge tries again
            raise ProtocolError(grpc.StatusCode.UNAVAILABLE, f"cannot restore the session: {exc}") from None
        with self._lock:
            self._hold(session, lease)
        if previous is None:
            how = "no lease"
        elif previous.replica == self.replica_id:
            how = f"epoch {previous.epoch} was this replica's"
        else:
            state = (
                "expired"
                if previous.expired()
                else "live: the holder, if alive, is fenced at its next step or write"
            )
            how = f"from {previous.replica}, epoch {previous.epoch}, lease {state}"
        log.info(
            "session %s: restored from checkpoint at step %d; taken at epoch %d (%s)",
            session_id[:8],
            newest,
            lease.epoch if lease else 0,
            how,
        )
        return session

    def _build(
        self, session_id: str, owner: str, config: pb.SessionConfig, base: BaseModel, reopened: bool = False
    ) -> Session:
        """The session ``config`` asks for (``session_class``) on this daemon's host, built on the
        frozen base its model and split share; a finished session ``reopened`` for inference on its
        own tensors, with no checkpoint folder."""
        if reopened:
            return session_class(config)(
                session_id, owner, config, base, replace(self.host, checkpoint_dir=None)
            )
        return session_class(config)(session_id, owner, config, base, self.host, self._shared(config, base))

    @property
    def checkpoint_dir(self) -> Optional[str]:
        """Where sessions are checkpointed and restored from after a restart; None: nowhere."""
        return self.host.checkpoint_dir

    def _take(self, session: Session) -> Tuple[Optional[Lease], Optional[LeaseRecord]]:
        """Claim the session's lease (with a checkpoint dir): its steps and checkpoints are fenced
        by it from now on. Returns the lease and the previous holder's record."""
        core = session.core
        if core.dir is None or self.checkpoint_dir is None:
            return None, None
        lease = Lease(lease_folder(self.checkpoint_dir, core.session_id), self.replica_id, self.lease_seconds)
        previous = lease.acquire()
        core.ckpts = FencedCheckpointDir(core.dir, lease)
        core.fence = lease.check
        return lease, previous

    def _admit(self, config: pb.SessionConfig) -> None:
        """Refuse a session of ``config`` the daemon may not hold now (``Admission``); caller holds ``_lock``."""
        self.admission.check(config, [s.core.config for s in self._sessions.values()])

    def _hold(self, session: Session, lease: Optional[Lease]) -> None:
        """Keep ``session`` (and its lease) in the registry; caller holds ``_lock``."""
        self._sessions[session.core.session_id] = session
        session.core.batcher = self.batcher
        if lease is not None:
            self._leases[session.core.session_id] = lease

    def _drop(self, session_id: str, lease: Optional[Lease] = None) -> None:
        """Forget a session here (``lease``: only if it is still the one held), writing nothing."""
        with self._lock:
            if lease is None or self._leases.get(session_id) is lease:
                self._sessions.pop(session_id, None)
                self._leases.pop(session_id, None)

    def renew_leases(self) -> List[str]:
        """Renew the lease of every session held (the serve loop calls this every
        ``lease_seconds / 3``); drop, writing nothing, those another replica took. Returns their ids."""
        with self._lock:
            leases = list(self._leases.items())
        moved = []
        for session_id, lease in leases:
            if not lease.renew():
                self._drop(session_id, lease)
                log.info("session %s: taken over by another replica; dropped here", session_id[:8])
                moved.append(session_id)
        return moved

    def release_leases(self) -> None:
        """At shutdown, after the shutdown checkpoints: every lease held says it ran out now."""
        with self._lock:
            leases = list(self._leases.values())
        for lease in leases:
            lease.release()

    def reopen_finished(self, msg: pb.OpenSession, owner: str) -> Session:
        """A closed session of ``owner``, rebuilt from its final weights for inference only."""
        if not self.checkpoint_dir:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this daemon runs without --checkpoint-dir, so it keeps no finished sessions",
            )
        with self._lock:
            live = self._sessions.get(msg.session_id)
        if live is not None and not live.core.inference_only:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION, "the session is still training: close it before using it"
            )
        meta, path = finished.read_final(self.checkpoint_dir, msg.session_id, owner)
        config = pb.SessionConfig.FromString(bytes.fromhex(meta["config"]))
        session = self._build(msg.session_id, owner, config, self._base(config.model), reopened=True)
        _check_fingerprint(msg, session)
        finished.load_weights(session.core, path)
        session.core.next_step = int(meta["step"])
        log.info(
            "session %s: reopened for inference (%d steps trained)",
            msg.session_id[:8],
            session.core.next_step,
        )
        return session

    def forget(self, session: Session) -> None:
        """Delete what the daemon keeps of ``session`` (its owner asked)."""
        session_id = session.core.session_id
        self.close(session_id)
        finished.forget(self.checkpoint_dir, session_id)
        if self.checkpoint_dir:  # a lease left by an eviction: whoever holds it finds it gone
            shutil.rmtree(lease_folder(self.checkpoint_dir, session_id), ignore_errors=True)

    def evict_idle(self, now: Optional[float] = None) -> List[str]:
        """Checkpoint (when there is a checkpoint dir) and drop sessions idle past the timeout;
        free the KV caches of generations idle as long."""
        now = time.monotonic() if now is None else now
        self.caches.free_idle(now, self.idle_timeout)
        with self._lock:
            idle = [
                s.core
                for s in self._sessions.values()
                if not s.core.attached and now - s.core.last_active > self.idle_timeout
            ]
        evicted = []
        for core in idle:
            with core.lock:
                if core.attached or now - core.last_active <= self.idle_timeout:
                    continue
                note = ""
                try:
                    if core.ckpts is not None:
                        core.save_checkpoint()
                        note = " (checkpointed)"
                except SessionMoved:  # another replica holds it now: nothing to keep here
                    note = " (moved to another replica: not checkpointed)"
                self.close(core.session_id, evicted=True)
            evicted.append(core.session_id)
            log.info(
                "session %s: idle for %.0fs, evicted%s",
                core.session_id[:8],
                now - core.last_active,
                note,
            )
        return evicted

    def close(self, session_id: str, evicted: bool = False) -> None:
        """The session leaves this replica: closed or forgotten (its lease folder goes), or
        ``evicted`` (its lease is released: the next attach, here or elsewhere, takes it)."""
        with self._lock:
            self.batcher.forget(self._sessions.pop(session_id, None))  # its peers wait for it no more
            lease = self._leases.pop(session_id, None)
        if lease is not None and evicted:
            lease.release()
        elif lease is not None:
            lease.remove()

    def get(self, session_id: str) -> Session:
        with self._lock:
            return self._sessions[session_id]

    def _shared(self, config: pb.SessionConfig, base: BaseModel) -> SharedBase:
        """The frozen base the sessions of this model and split share: the first LoRA session
        records it, the later ones are built on it; a session that fine-tunes every parameter
        leaves it empty."""
        # a U's middle (label_private) freezes other tensors than a two-part net2; the label count
        # shapes only a two-part head, which each session builds itself
        key = (
            base.fingerprint,
            config.mode,
            config.split_layer,
            config.rank,
            config.label_private,
            config.tail_layers,
            config.factorise,
        )
        with self._lock:
            return self._frozen.setdefault(key, SharedBase())

    def _base(self, name: str) -> BaseModel:
        with self._lock:
            if name in self._bases:
                return self._bases[name]
        try:
            # Under the compute lock: a random:* model is initialised from the process-wide RNG,
            # which must not shift the dropout masks of a step running meanwhile.
            with self._compute_lock:
                base = load_base_model(name)
        except ModelError as exc:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION, f"cloud cannot load the model: {exc}"
            ) from None
        with self._lock:
            return self._bases.setdefault(name, base)


def session_class(config: pb.SessionConfig) -> Callable[..., Session]:
    """The session a config asks for, chosen here once: a forward-only config's serves the U's
    middle frozen, a label-private config's trains the U's middle, any other the two-part net2;
    the rest of the daemon asks the session."""
    if config.forward_only:
        return FrozenMiddleSession
    return MiddleSession if config.label_private else TwoPartSession


def _check_fingerprint(msg: pb.OpenSession, session: Session) -> None:
    if msg.fingerprint != session.core.fingerprint:
        raise ProtocolError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"fingerprint mismatch for model {msg.config.model!r}: the edge has {msg.fingerprint[:16]}..., "
            f"the cloud has {session.core.fingerprint[:16]}... (different base weights, split or label count)",
        )
