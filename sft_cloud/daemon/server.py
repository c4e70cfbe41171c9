"""The server factory (every gRPC option, with why) and the serve loop (health, SIGTERM, the
shutdown checkpoint)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from typing import List, Optional, Tuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sft_cloud.daemon import auth
from sft_cloud.daemon.config import ServeConfig
from sft_cloud.daemon.metrics import DaemonMetrics
from sft_cloud.daemon.servicer import SplitTrainerServicer, StreamDecodingInterceptor
from sft_cloud.sessions import finished
from sft_cloud.sessions.admission import Admission
from sft_cloud.sessions.batcher import StepBatcher
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.proto import sft_pb2_grpc as pb_grpc
from sft_common.training import resolve_device

log = logging.getLogger("sft_cloud")
SERVICE_NAME = "sft.v1.SplitTrainer"
# SIGTERM: gRPC cancels the calls still open when the grace ends; a server that still has not
# stopped this long after that is given up on (the shutdown checkpoint is written all the same).
STOP_MARGIN_S = 2.0


def server_options(cfg: ServeConfig) -> list:
    cap = cfg.max_message_bytes
    return [
        # SL at BERT-base geometry is 32 x 128 x 768 x 4 B = 12.6 MB a message, over gRPC's 4 MB
        # default; each session still refuses anything over its own, config-derived cap.
        ("grpc.max_receive_message_length", cap),
        ("grpc.max_send_message_length", cap),
        # Edges ping every 10 s (see sft_edge.sessions.client); accept pings every 5 s without GOAWAY
        # "too_many_pings", and ping them back so a silently dead edge is noticed.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Two daemons on one port would split the sessions between them.
        ("grpc.so_reuseport", 0),
    ]


def create_server(
    cfg: ServeConfig, registry: SessionRegistry, metrics: Optional[DaemonMetrics] = None
) -> Tuple[grpc.Server, int, health.HealthServicer]:
    """Build and start the gRPC server; returns it, the port it bound and the health servicer.

    Refuses (ValueError) to build one without TLS material unless ``cfg.insecure``."""
    credentials = auth.server_credentials(cfg.insecure, cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    tokens = auth.TokenSet.from_file(cfg.auth_token_file) if cfg.auth_token_file else None
    interceptors: List[grpc.ServerInterceptor] = []
    if tokens is not None:
        # The token check runs before the handler, so a refused edge has no payload read.
        interceptors.append(auth.TokenInterceptor(tokens))
    # Bytes that are no message must not reach grpcio's own deserializer on a stream: see there.
    interceptors.append(StreamDecodingInterceptor())
    # One thread per open stream, plus a few for health checks.
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.max_sessions + 8, thread_name_prefix="sft-rpc"),
        options=server_options(cfg),
        maximum_concurrent_rpcs=cfg.max_sessions + 8,
        interceptors=interceptors,
    )
    servicer = SplitTrainerServicer(
        registry, identity=auth.identity, metrics=metrics, max_message_bytes=cfg.max_message_bytes
    )
    registry.batcher.report = servicer.metrics.batch  # batched steps' sizes and waits
    pb_grpc.add_SplitTrainerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # Reflection lets grpcurl / grpc_cli list and call the services without the .proto files.
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{cfg.listen_host()}:{cfg.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio >= 1.60 raises where older versions returned 0
        port = 0
    if port == 0:
        raise OSError(
            f"cannot listen on {address}: the port is in use (another sft-cloud serve?); "
            "pick another with --port, or stop the other daemon"
        )
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


def _tls_mode(cfg: ServeConfig) -> str:
    if cfg.insecure:
        return "PLAINTEXT"
    return "mutual TLS" if cfg.tls_client_ca else "TLS"


def serve(cfg: ServeConfig, ready: Optional[threading.Event] = None) -> None:
    """Run the daemon until SIGTERM / SIGINT, then drain in-flight steps and stop."""
    if cfg.insecure:
        log.warning("serving WITHOUT TLS (--insecure): activations and gradients cross the network in clear")
        if cfg.auth_token_file:
            log.warning("bearer tokens cross in clear too: only behind a TLS-terminating proxy")
    # Handlers first: a SIGTERM that arrives while the server starts still stops it gracefully.
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: shutting down (grace %.0fs)", signum, cfg.grace_seconds)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    device = resolve_device(cfg.device)
    admission = Admission.of(cfg.max_sessions, cfg.max_delta_cache_mb, cfg.delta_cache_total_mb)
    registry = SessionRegistry(
        device=device,
        checkpoint_dir=cfg.checkpoint_dir,
        idle_timeout=cfg.idle_timeout,
        replica_id=cfg.replica_id,
        lease_seconds=cfg.lease_seconds,
        batcher=StepBatcher(cfg.batch_window_ms / 1000, cfg.batch_max_sequences),
        admission=admission,
    )
    metrics = DaemonMetrics(sessions=registry.__len__, session_list=registry.sessions)
    if cfg.metrics_port is not None:
        _, metrics_port = metrics.serve(cfg.metrics_port, cfg.listen_host())
        print(f"sft-cloud: metrics on http://{cfg.listen_host()}:{metrics_port}/metrics", flush=True)
    server, port, health_servicer = create_server(cfg, registry, metrics)
    log.info(
        "sft-cloud serving on %s:%d (device %s, %s, %s, %s)",
        cfg.listen_host(),
        port,
        device,
        admission.describe(),
        _tls_mode(cfg),
        f"tokens from {cfg.auth_token_file}" if cfg.auth_token_file else "no tokens",
    )
    if cfg.checkpoint_dir:
        log.info(
            "replica %s: session leases of %.0fs under %s",
            registry.replica_id,
            cfg.lease_seconds,
            cfg.checkpoint_dir,
        )
    print(f"sft-cloud: listening on {cfg.listen_host()}:{port}", flush=True)
    if ready is not None:
        ready.set()
    # Evict idle sessions (checkpointed first when there is a checkpoint dir) while serving, and
    # delete finished sessions past their retention; renew the session leases every third of
    # --lease-seconds (dropping, unwritten, the sessions another replica took over).
    sweep = max(1.0, min(60.0, cfg.idle_timeout / 4))
    retention = cfg.keep_finished_days * 86400
    finished.purge_expired(cfg.checkpoint_dir, retention)
    swept = time.monotonic()
    while not stop.wait(min(sweep, cfg.lease_seconds / 3)):
        registry.renew_leases()
        if time.monotonic() - swept >= sweep:
            registry.evict_idle()
            finished.purge_expired(cfg.checkpoint_dir, retention)
            swept = time.monotonic()
    health_servicer.enter_graceful_shutdown()
    if not server.stop(cfg.grace_seconds).wait(cfg.grace_seconds + STOP_MARGIN_S):
        log.error(
            "the gRPC server had not stopped %.0fs after the grace of %.0fs; exiting without it",
            STOP_MARGIN_S,
            cfg.grace_seconds,
        )
    registry.renew_leases()  # sessions another replica took are not checkpointed here
    checkpoint_sessions(registry)
    registry.release_leases()
    print("sft-cloud: stopped", flush=True)


def checkpoint_sessions(registry: SessionRegistry, lock_timeout: float = STOP_MARGIN_S) -> List[str]:
    """At shutdown: checkpoint every session still held (with a checkpoint dir), so that its edge
    resumes from the step it reached; returns their ids. A session whose step is still running
    ``lock_timeout`` seconds on (its call outlived the grace) is skipped, and logged."""
    sessions = registry.sessions()
    saved = []
    for core in (s.core for s in sessions):
        if core.dir is None:
            continue
        sid = core.session_id[:8]
        if not core.lock.acquire(timeout=lock_timeout):
            log.error("session %s: a step was still running at shutdown; not checkpointed", sid)
            continue
        try:
            core.save_checkpoint()
        except Exception:  # one failed write must not cost the other sessions theirs
            log.exception("session %s: shutdown checkpoint failed", sid)
            continue
        finally:
            core.lock.release()
        log.info("session %s: checkpointed at step %d for shutdown", sid, core.next_step)
        saved.append(core.session_id)
    return saved
