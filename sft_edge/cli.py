"""`sft-edge`: parse the command line and call the trainer. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from sft_common.logs import setup_logging
from sft_edge.cli_parser import build_parser
from sft_edge.runs.config import TrainConfig as D  # every default lives there

__all__ = ["build_parser", "main"]


def after_training(args: argparse.Namespace) -> int:
    """predict, generate, export, forget: a finished run, through its daemon or here."""
    from sft_common.models.base_model import ModelError
    from sft_edge.finished import predict
    from sft_edge.link.transport import CloudError
    from sft_edge.runs.config import Connection, ExportConfig, GenerateConfig, PredictConfig

    conn = Connection(
        args.cloud, args.insecure, args.tls_ca, args.tls_cert, args.tls_key, args.auth_token_file
    )
    try:
        if args.command == "predict":
            n = predict.predict(
                PredictConfig(args.run, args.input, args.output, conn, args.batch_size, args.device)
            )
            print(json.dumps({"predictions": n, "output": args.output}))
        elif args.command == "generate":
            from sft_edge.finished.generate import generate

            cfg = GenerateConfig(
                args.run,
                args.prompt,
                args.max_new_tokens,
                args.temperature,
                args.seed,
                args.raw,
                conn,
                args.device,
                kv_cache=not args.no_kv_cache,
            )
            if args.json:
                print(json.dumps(generate(cfg)))
            else:  # each token's text as it is decided
                generate(cfg, on_text=lambda text: print(text, end="", flush=True))
                print()
        elif args.command == "export":
            print(json.dumps({"exported": predict.export(ExportConfig(args.run, args.to, conn))}))
        else:
            print(json.dumps({"forgotten": predict.forget(args.run, conn)}))
    except (ValueError, ModelError, CloudError, OSError) as exc:
        print(f"sft-edge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def plot(args: argparse.Namespace) -> int:
    from sft_edge.runs.plot import plot_run

    try:
        print(plot_run(args.run, args.out, args.title))
    except (ValueError, OSError, ImportError) as exc:
        print(f"sft-edge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plot":
        return plot(args)
    setup_logging(args.log_level, args.log_format)
    if args.command in ("predict", "generate", "export", "forget"):
        return after_training(args)
    fields = vars(args).copy()
    for key in ("command", "log_level", "log_format", "no_progress"):
        fields.pop(key)
    cfg = D(progress=not args.no_progress, **fields)
    try:
        cfg.validate()  # before torch, transformers and grpc are imported: mistakes are reported at once
    except ValueError as exc:
        return _error(exc)
    try:
        return _train(cfg)
    except KeyboardInterrupt:
        print("sft-edge: interrupted before training started; nothing was written", file=sys.stderr)
        return 130


def _train(cfg: D) -> int:
    from sft_edge.link.connect import connect_to_cloud
    from sft_edge.link.transport import CloudError

    try:
        connect, route = connect_to_cloud(cfg)  # grpc only: a wrong address is reported before torch loads
    except (ValueError, CloudError, OSError) as exc:
        return _error(exc)
    from sft_common.models.base_model import ModelError
    from sft_edge.data.glue import DataError
    from sft_edge.runs.trainer import Interrupted, train

    try:
        report = train(cfg, connect, route=route)
    except Interrupted as stop:
        print(f"sft-edge: {stop}", file=sys.stderr)
        return 130
    except (ValueError, DataError, ModelError, CloudError, OSError) as exc:
        return _error(exc)
    summary = {k: report[k] for k in ("task", "steps", "metrics", "bytes_sent", "bytes_received", "seconds")}
    print(json.dumps(summary))
    return 0


def _error(exc: BaseException) -> int:
    print(f"sft-edge: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
