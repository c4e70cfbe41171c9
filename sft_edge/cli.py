"""`sft-edge`: parse the command line and call the trainer. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from sft_common.logs import FORMATS, setup_logging
from sft_common.topology.spec import FACTORISATIONS, INITS, MODES
from sft_edge.runs.config import COMPRESSIONS, PROBLEMS, WIRE_DTYPES
from sft_edge.runs.config import TrainConfig as D  # every default lives there


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-edge", description="Split fine-tuning: the edge trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train",
        help="fine-tune on your own labelled file or a GLUE task, split with a cloud daemon (or --local)",
    )
    t.add_argument("--task", help="a GLUE task: sst2 mrpc rte cola stsb qnli qqp mnli wnli (or --train-file)")
    t.add_argument("--train-file", help="your labelled data: .csv, .tsv, .jsonl/.json or .parquet")
    t.add_argument(
        "--dev-file", help="dev data in the same columns (default: hold out --dev-share of --train-file)"
    )
    t.add_argument("--text-columns", help="the text column, or two for sentence pairs: A,B")
    t.add_argument("--label-column", help="the label column")
    t.add_argument(
        "--problem", default=D.problem, choices=PROBLEMS,
        help="auto (default): strings and integers are classes, floats regression; causal-lm: fine-tune "
        "a decoder on a JSON Lines file of text, prompt/completion or chat rows (needs --label-private)",
    )  # fmt: skip
    t.add_argument(
        "--dev-share", type=float, default=D.dev_share,
        help=f"share of --train-file held out for evaluation without --dev-file (default {D.dev_share:g})",
    )  # fmt: skip
    t.add_argument("--cloud", default=D.cloud, help=f"HOST:PORT of sft-cloud (default {D.cloud})")
    t.add_argument(
        "--model",
        default=D.model,
        help=f"hub name, local folder or random:<preset> (default {D.model})",
    )
    t.add_argument(
        "--data-dir", help="GLUE data in the TSV layout (e.g. ../shared/data/glue); default: the hub"
    )
    t.add_argument("--split-layer", type=int, help="0-based layer to cut at (default: the last layer)")
    t.add_argument("--rank", type=int, default=D.rank, help=f"SFT rank R (default {D.rank})")
    t.add_argument(
        "--mode", default=D.mode, choices=MODES, help="sft (rank-R cut) or sl (plain split learning)"
    )
    t.add_argument(
        "--factorise", default=D.factorise, choices=FACTORISATIONS,
        help="SFT: the cut layer's FFN linear that is factorised: ffn-output (default; the paper's cut: "
        "the edge keeps the residual) or ffn-input (the paper's code's: the edge sends A·r, the "
        "post-attention residual stream through a rank-R bottleneck; not with --label-private)",
    )  # fmt: skip
    t.add_argument(
        "--wire-dtype",
        default=D.wire_dtype,
        choices=WIRE_DTYPES,
        help="dtype on the wire (int8, int4: one scale per token; int4 packs two values a byte)",
    )
    t.add_argument(
        "--compression", default=D.compression, choices=COMPRESSIONS, help="compress tensors on the wire"
    )
    t.add_argument(
        "--batch-size", type=int, default=D.batch_size, help=f"examples per step (default {D.batch_size})"
    )
    t.add_argument(
        "--micro-batches", type=int, default=D.micro_batches,
        help="send each step as this many micro-batches, pipelined so that edge compute, the link "
        "and cloud compute overlap; the update is the whole batch's (default 1: no pipelining)",
    )  # fmt: skip
    t.add_argument(
        "--pipeline-depth", type=int, default=D.pipeline_depth,
        help=f"micro-batches in flight at once with --micro-batches (default {D.pipeline_depth})",
    )  # fmt: skip
    t.add_argument(
        "--cls-only", action="store_true",
        help="with the cut at the last layer: send only each example's [CLS] row, the only one the "
        "classifier reads (exact; about sequence-length times less traffic)",
    )  # fmt: skip
    t.add_argument(
        "--label-private", action="store_true",
        help="the U-shaped split: the last --tail-layers layers, the head and the loss run here too, so "
        "no label leaves the device; the cloud runs the middle (default --split-layer: 0)",
    )  # fmt: skip
    t.add_argument(
        "--tail-layers", type=int, default=D.tail_layers,
        help=f"--label-private: whole layers the edge runs after the cloud's part (default {D.tail_layers})",
    )  # fmt: skip
    t.add_argument("--epochs", type=float, default=D.epochs, help=f"training epochs (default {D.epochs:g})")
    t.add_argument("--max-steps", type=int, help="train exactly this many steps (overrides --epochs)")
    t.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    t.add_argument("--max-eval-examples", type=int, help="evaluate on only the first N dev examples")
    t.add_argument("--lr", type=float, default=D.lr, help=f"AdamW learning rate (default {D.lr:g})")
    t.add_argument(
        "--factor-lr", type=float, default=D.factor_lr,
        help="SFT: learning rate of the SVD factors u, Σ, v, on both sides (default: --lr)",
    )  # fmt: skip
    t.add_argument(
        "--svd-init", default=D.svd_init, choices=INITS,
        help="SFT: how the factors start: plain (default: the cloud's SVD), activation-aware or "
        "residual-aware (both from this device's activations on --calibration-batches training "
        "batches, computed here; activation-aware: the FFN output whitened by the FFN activations, or "
        "with --factorise ffn-input the residual stream's principal directions; residual-aware: the "
        "best rank-R fit of the cut layer's whole output, the residual the cut drops included; what "
        "the cloud is sent reveals second-order statistics of them: docs/privacy.md)",
    )  # fmt: skip
    t.add_argument(
        "--calibration-batches", type=int, default=D.calibration_batches,
        help=f"--svd-init activation-aware or residual-aware: training batches for the statistics (default {D.calibration_batches})",
    )  # fmt: skip
    t.add_argument(
        "--peft", choices=["lora"], help="train LoRA adapters (PEFT) on both halves, the base frozen"
    )
    t.add_argument("--lora-rank", type=int, default=D.lora_rank, help=f"LoRA rank (default {D.lora_rank})")
    t.add_argument(
        "--lora-alpha", type=float, default=D.lora_alpha, help=f"LoRA alpha (default {D.lora_alpha:g})"
    )
    t.add_argument(
        "--lora-targets",
        help="comma-separated module names to adapt (default: the family's attention query, value)",
    )
    t.add_argument(
        "--weight-decay",
        type=float,
        default=D.weight_decay,
        help=f"AdamW weight decay (default {D.weight_decay:g})",
    )
    t.add_argument(
        "--warmup-ratio",
        type=float,
        default=D.warmup_ratio,
        help=f"share of steps spent warming up (default {D.warmup_ratio:g})",
    )
    t.add_argument(
        "--max-seq-len",
        type=int,
        default=D.max_seq_len,
        help=f"truncate inputs to this many tokens (default {D.max_seq_len})",
    )
    t.add_argument(
        "--seed",
        type=int,
        default=D.seed,
        help=f"seed for the head, dropout and data order (default {D.seed})",
    )
    t.add_argument("--device", default=D.device, choices=["auto", "cpu", "cuda"], help="where net1 runs")
    t.add_argument("--output-dir", help="save the trained edge half (or whole model with --local) here")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    t.add_argument("--checkpoint-every", type=int, help="checkpoint both sides every N steps")
    t.add_argument(
        "--local", action="store_true", help="train the whole model here, without a cloud (baseline)"
    )
    _connection_flags(t, cloud=False)
    t.add_argument("--report", help="write a JSON report of the run here")
    t.add_argument(
        "--step-timeout", type=float, default=D.step_timeout,
        help=f"seconds to wait for the cloud's answer before treating the link as dead (default {D.step_timeout:g})",
    )  # fmt: skip
    t.add_argument(
        "--reconnect-timeout", type=float, default=D.reconnect_timeout,
        help=f"seconds to keep re-attaching to the session after a broken link (default {D.reconnect_timeout:g})",
    )  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    t.add_argument("--log-format", default="text", choices=FORMATS, help="text, or one JSON object a line")
    for name, what in (
        ("predict", "predict a file's examples with a trained model (through its daemon, or an export here)"),
        ("export", "fetch net2 (the U's middle) from the daemon: a folder that predicts or generates alone"),
        ("forget", "have the daemon delete what it keeps of a finished run"),
    ):
        c = sub.add_parser(name, help=what)
        c.add_argument(
            "--run", required=True, help="a training run's --output-dir (or, for predict, an export)"
        )
        if name == "predict":
            c.add_argument(
                "--input", required=True, help=".csv .tsv .jsonl .json .parquet, or .txt (one example a line)"
            )
            c.add_argument("--output", required=True, help=".csv or .jsonl: a prediction per example")
            c.add_argument("--batch-size", type=int, default=32, help="examples per batch (default 32)")
            c.add_argument(
                "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where net1 runs"
            )
        if name == "export":
            c.add_argument("--to", required=True, help="the folder to write (new or empty)")
        _connection_flags(c, cloud=True)
        c.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
        c.add_argument(
            "--log-format", default="text", choices=FORMATS, help="text, or one JSON object a line"
        )
    g = sub.add_parser(
        "generate",
        help="text from a --problem causal-lm run, through its daemon, or here from an export or a "
        "--local run (no KV cache: each new token reruns the whole sequence)",
    )
    g.add_argument(
        "--run",
        required=True,
        help="a causal-LM run's --output-dir (through its daemon), its export, or a --local run's",
    )
    g.add_argument("--prompt", required=True, help="the text to continue (a chat run: the user's message)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="stop after this many tokens (default 32)")
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy; > 0: sample from softmax(logits / T)",
    )
    g.add_argument("--seed", type=int, default=0, help="the sampling seed with --temperature > 0 (default 0)")
    g.add_argument(
        "--raw",
        action="store_true",
        help="feed the prompt as plain text even if the run trained on chat rows",
    )
    g.add_argument(
        "--json", action="store_true", help="print a JSON object (completion, tokens, why it stopped)"
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the edge's parts run"
    )
    _connection_flags(g, cloud=True)
    g.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    g.add_argument("--log-format", default="text", choices=FORMATS, help="text, or one JSON object a line")
    p = sub.add_parser("plot", help="draw loss, dev metrics and traffic of a run to PNG (needs matplotlib)")
    p.add_argument("run", help="a run's --output-dir (holding scalars.csv) or a scalars CSV file")
    p.add_argument("--out", help="PNG to write (default: beside the CSV)")
    p.add_argument("--title", help="figure title (default: the run folder's name)")
    return parser


def _connection_flags(parser: argparse.ArgumentParser, cloud: bool) -> None:
    if cloud:
        parser.add_argument("--cloud", default=D.cloud, help=f"HOST:PORT of sft-cloud (default {D.cloud})")
    parser.add_argument("--insecure", action="store_true", help="connect without TLS; logs a warning")
    parser.add_argument("--tls-ca", help="PEM CA that the daemon's certificate must chain to")
    parser.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", help="PEM client private key (mutual TLS)")
    parser.add_argument("--auth-token-file", help="file holding this device's bearer token")


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

            out = generate(
                GenerateConfig(
                    args.run, args.prompt, args.max_new_tokens, args.temperature, args.seed, args.raw, conn,
                    args.device,
                )
            )  # fmt: skip
            print(json.dumps(out) if args.json else out["completion"])
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
