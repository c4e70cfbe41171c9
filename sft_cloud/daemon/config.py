"""What `sft-cloud serve` takes (``ServeConfig``) and its checks: no torch or grpc imported, so
the CLI answers --help and argument mistakes at once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

EVERY_INTERFACE = "0.0.0.0"
LOOPBACK = "127.0.0.1"


@dataclass
class ServeConfig:
    """Everything `sft-cloud serve` takes, one field a flag (``--max-sessions`` is ``max_sessions``)."""

    host: Optional[str] = None  # interface to listen on; None: see listen_host
    port: int = 50051  # 0 picks a free port (tests)
    device: str = "auto"  # auto | cpu | cuda
    insecure: bool = False  # plaintext; must be asked for explicitly
    tls_cert: Optional[str] = None  # PEM server certificate chain
    tls_key: Optional[str] = None  # PEM private key
    tls_client_ca: Optional[str] = None  # PEM CA for client certificates (mutual TLS)
    auth_token_file: Optional[str] = None  # one bearer token per line
    checkpoint_dir: Optional[str] = None  # where sessions are checkpointed
    max_sessions: int = 64  # concurrent sessions; more get RESOURCE_EXHAUSTED
    metrics_port: Optional[int] = None  # serve Prometheus /metrics on this port (0: a free one)
    max_message_mb: int = 256  # transport cap; sessions enforce tighter, config-derived caps
    grace_seconds: float = 10.0  # SIGTERM: finish in-flight steps for at most this long, then checkpoint
    idle_timeout: float = 3600.0  # sessions with no stream this long are checkpointed and evicted
    keep_finished_days: float = 30.0  # finished sessions' net2 is kept this long for its owner (0: not kept)
    replica_id: Optional[str] = None  # names this replica in the session leases (None: <hostname>-<pid>)
    lease_seconds: float = 30.0  # a session lease not renewed this long has expired (renewed every third)
    # LoRA sessions' steps arriving this close run as one batch; 0 (the default): each alone. Off
    # by default: on this CPU a SmolLM2-sized part gained nothing at 8 sessions (docs/benchmarks.md §8)
    batch_window_ms: float = 0.0
    batch_max_sequences: int = 256  # sequences one batched step holds at most
    # delta mode's caches: the largest budget a session may ask for, each cut, in MiB (the default:
    # the protocol's 4 GiB; 0: delta mode refused), and the granted budgets of all sessions held
    # together, every cut (None: no bound)
    max_delta_cache_mb: float = 4096.0
    delta_cache_total_mb: Optional[float] = None

    @property
    def max_message_bytes(self) -> int:
        """``max_message_mb`` in bytes: gRPC's cap each way, and what a packed message may unpack to."""
        return self.max_message_mb * 1024 * 1024

    def listen_host(self) -> str:
        """The interface the daemon binds: ``host`` when given; else every interface with TLS, and
        only this machine's loopback with ``insecure``, so that plaintext reaches other hosts only
        when --host says so (behind a TLS-terminating proxy, say)."""
        if self.host is not None:
            return self.host
        return LOOPBACK if self.insecure else EVERY_INTERFACE

    def validate(self) -> None:
        """Raise ValueError, naming the flag, for what can be checked before anything is loaded."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be 0..65535, got {self.port}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if (
            self.max_sessions < 1
            or self.idle_timeout <= 0
            or self.grace_seconds < 0
            or self.keep_finished_days < 0
        ):
            raise ValueError(
                "--max-sessions must be >= 1, --idle-timeout > 0, --grace-seconds and --keep-finished-days >= 0"
            )
        if not 0 <= self.batch_window_ms <= 1000 or self.batch_max_sequences < 1:
            raise ValueError(
                f"--batch-window-ms must be in 0..1000 and --batch-max-sequences >= 1, got "
                f"{self.batch_window_ms:g} and {self.batch_max_sequences}"
            )
        if not 0 <= self.max_delta_cache_mb <= 4096 or (self.delta_cache_total_mb or 0) < 0:
            raise ValueError(
                f"--max-delta-cache-mb must be in 0..4096 (0: delta mode refused) and --delta-cache-total-mb "
                f">= 0, got {self.max_delta_cache_mb:g} and {self.delta_cache_total_mb}"
            )
        if not 1 <= self.lease_seconds <= 3600:
            raise ValueError(f"--lease-seconds must be in 1..3600, got {self.lease_seconds:g}")
        if self.replica_id is not None and not (
            0 < len(self.replica_id) <= 128 and self.replica_id.isprintable() and "/" not in self.replica_id
        ):
            raise ValueError(
                f"--replica-id must be 1..128 printable characters without '/', got {self.replica_id!r}"
            )
        check_tls_flags(self.insecure, self.tls_cert, self.tls_key, self.tls_client_ca)
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--auth-token-file", self.auth_token_file),
        ):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{flag} {path}: no such file")


def check_tls_flags(
    insecure: bool, tls_cert: Optional[str], tls_key: Optional[str], tls_client_ca: Optional[str]
) -> None:
    """TLS is the default: certificate and key, or --insecure said explicitly; not both."""
    tls_given = any(p is not None for p in (tls_cert, tls_key, tls_client_ca))
    if insecure:
        if tls_given:
            raise ValueError("--insecure and --tls-cert/--tls-key/--tls-client-ca exclude each other")
        return
    if tls_cert is None or tls_key is None:
        if tls_given:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        raise ValueError(
            "no TLS material: pass --tls-cert and --tls-key (`make certs` writes development ones "
            "into certs/dev/), or --insecure to serve plaintext"
        )
