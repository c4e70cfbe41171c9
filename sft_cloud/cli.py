"""`sft-cloud`: parse the command line and call the daemon. No logic lives here."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from sft_cloud.daemon.config import ServeConfig
from sft_common.logs import FORMATS, setup_logging

D = ServeConfig  # every default lives there


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-cloud", description="Split fine-tuning: the cloud daemon.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve split fine-tuning sessions over gRPC")
    _listening(s.add_argument_group("listening and security"))
    _sessions(s.add_argument_group("sessions"))
    _replicas(s.add_argument_group("replicas sharing --checkpoint-dir"))
    logs = s.add_argument_group("logs and metrics")
    logs.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    logs.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    logs.add_argument("--log-format", default="text", choices=FORMATS, help="text, or one JSON object a line")
    return parser


def _listening(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--host",
        help="interface to listen on (default: 0.0.0.0 with TLS; 127.0.0.1 with --insecure, so a "
        "plaintext daemon is reachable from other hosts only when --host says so, e.g. --host 0.0.0.0 "
        "behind a TLS-terminating proxy)",
    )
    g.add_argument("--port", type=int, default=D.port, help="port (default 50051; 0 picks a free one)")
    g.add_argument("--insecure", action="store_true", help="serve plaintext gRPC (no TLS); logs a warning")
    g.add_argument("--tls-cert", help="PEM certificate chain of the server")
    g.add_argument("--tls-key", help="PEM private key of the server")
    g.add_argument("--tls-client-ca", help="PEM CA that client certificates must chain to (mutual TLS)")
    g.add_argument("--auth-token-file", help="file with accepted bearer tokens, one per line")


def _sessions(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--device", default=D.device, choices=["auto", "cpu", "cuda"], help="where net2 runs")
    g.add_argument("--checkpoint-dir", help="directory for session checkpoints")
    g.add_argument(
        "--max-sessions", type=int, default=D.max_sessions, help="concurrent sessions (default 64)"
    )
    g.add_argument(
        "--keep-finished-days",
        type=float,
        default=D.keep_finished_days,
        help="keep a finished session's trained net2 (for its owner's predict / export) this many days "
        f"after it closed, with --checkpoint-dir (default {D.keep_finished_days:g}; 0: delete at once)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=D.idle_timeout,
        help="seconds without a stream after which a session is checkpointed and evicted (default 3600)",
    )
    g.add_argument(
        "--grace-seconds",
        type=float,
        default=D.grace_seconds,
        help="on SIGTERM, let running steps finish for at most this long, then checkpoint and exit "
        "(default 10; keep it a few seconds under the orchestrator's own grace period)",
    )
    g.add_argument(
        "--batch-window-ms",
        type=float,
        default=D.batch_window_ms,
        help="LoRA sessions on one base whose steps arrive within this many milliseconds run them as "
        "one forward and one backward, forward-only sessions their evaluations as one forward "
        f"(default {D.batch_window_ms:g}: each alone; try 5 on a GPU: "
        "on a CPU a SmolLM2-sized part gained nothing, docs/benchmarks.md §8)",
    )
    g.add_argument(
        "--batch-max-sequences",
        type=int,
        default=D.batch_max_sequences,
        help=f"sequences one batched step holds at most (default {D.batch_max_sequences})",
    )
    g.add_argument(
        "--max-delta-cache-mb",
        type=float,
        default=D.max_delta_cache_mb,
        metavar="MB",
        help="delta mode (the edge's --delta-cache-mb): the largest cache a session may ask for, each "
        f"cut, in MiB; more is refused at open (default {D.max_delta_cache_mb:g}, the protocol's "
        "most; 0: delta mode refused)",
    )
    g.add_argument(
        "--delta-cache-total-mb",
        type=float,
        default=D.delta_cache_total_mb,
        metavar="MB",
        help="delta mode: the caches' budgets of every session held together, every cut, in MiB; a "
        "session that would pass it is refused at open until others leave (default: no bound)",
    )


def _replicas(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--replica-id",
        help="this replica's name in the session leases under --checkpoint-dir "
        "(default <hostname>-<pid>; replicas sharing the folder must differ)",
    )
    g.add_argument(
        "--lease-seconds",
        type=float,
        default=D.lease_seconds,
        help="a session lease not renewed for this long has expired; "
        f"renewed every third of it (default {D.lease_seconds:g})",
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    cfg = ServeConfig(
        host=args.host,
        port=args.port,
        device=args.device,
        insecure=args.insecure,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        checkpoint_dir=args.checkpoint_dir,
        max_sessions=args.max_sessions,
        idle_timeout=args.idle_timeout,
        grace_seconds=args.grace_seconds,
        metrics_port=args.metrics_port,
        keep_finished_days=args.keep_finished_days,
        replica_id=args.replica_id,
        lease_seconds=args.lease_seconds,
        batch_window_ms=args.batch_window_ms,
        batch_max_sequences=args.batch_max_sequences,
        max_delta_cache_mb=args.max_delta_cache_mb,
        delta_cache_total_mb=args.delta_cache_total_mb,
    )
    try:
        cfg.validate()  # before torch and grpc are imported: mistakes are reported at once
        from sft_cloud.daemon.server import serve

        serve(cfg)
    except (ValueError, OSError) as exc:
        print(f"sft-cloud: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the daemon's own SIGINT handler was in place
        print("sft-cloud: interrupted while starting", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
