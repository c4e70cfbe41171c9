"""The daemon's sessions: open new ones, re-attach to existing ones, share loaded base models."""

from __future__ import annotations

import secrets
import threading
from typing import Dict

import grpc

from sft_cloud.session import CloudSession
from sft_common.errors import ProtocolError
from sft_common.models import BaseModel, ModelError, load_base_model
from sft_common.proto import sft_pb2 as pb


class SessionRegistry:
    """Thread-safe map of session id -> CloudSession, with a cap and a base-model cache."""

    def __init__(self, device: str = "cpu", max_sessions: int = 64, max_batch: int = 256, max_seq: int = 512):
        self.device = device
        self.max_sessions = max_sessions
        self.max_batch = max_batch
        self.max_seq = max_seq
        self._sessions: Dict[str, CloudSession] = {}
        self._bases: Dict[str, BaseModel] = {}
        self._lock = threading.Lock()
        self._compute_lock = threading.Lock()  # see CloudSession._rng

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def open(self, msg: pb.OpenSession, owner: str) -> CloudSession:
        """A new session (empty ``session_id``) or an existing one, checked against ``msg``."""
        if msg.session_id:
            return self.attach(msg, owner)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                raise ProtocolError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the daemon already serves {len(self._sessions)} sessions (--max-sessions "
                    f"{self.max_sessions}); try again later",
                )
        base = self._base(msg.config.model)
        session = CloudSession(
            secrets.token_urlsafe(24), owner, msg.config, base, self.device,
            self._compute_lock, self.max_batch, self.max_seq,
        )  # fmt: skip
        _check_fingerprint(msg, session)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:  # lost a race with another open
                raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the daemon is full; try again later")
            self._sessions[session.session_id] = session
        return session

    def attach(self, msg: pb.OpenSession, owner: str) -> CloudSession:
        with self._lock:
            session = self._sessions.get(msg.session_id)
        # The same answer for "no such session" and "not yours": nothing leaks about others' sessions.
        if session is None or not secrets.compare_digest(session.owner.encode(), owner.encode()):
            code = grpc.StatusCode.NOT_FOUND if session is None else grpc.StatusCode.PERMISSION_DENIED
            raise ProtocolError(code, "no session with this id is open for this identity")
        _check_fingerprint(msg, session)
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def get(self, session_id: str) -> CloudSession:
        with self._lock:
            return self._sessions[session_id]

    def _base(self, name: str) -> BaseModel:
        with self._lock:
            if name in self._bases:
                return self._bases[name]
        try:
            base = load_base_model(name)
        except ModelError as exc:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION, f"cloud cannot load the model: {exc}"
            ) from None
        with self._lock:
            return self._bases.setdefault(name, base)


def _check_fingerprint(msg: pb.OpenSession, session: CloudSession) -> None:
    if msg.fingerprint != session.fingerprint:
        raise ProtocolError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"fingerprint mismatch for model {msg.config.model!r}: the edge has {msg.fingerprint[:16]}..., "
            f"the cloud has {session.fingerprint[:16]}... (different base weights, split or label count)",
        )
