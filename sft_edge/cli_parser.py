"""The `sft-edge` command line: its subcommands and their flags, grouped by topic in ``--help``.

Every default comes from ``sft_edge.runs.config``; nothing here imports torch, so mistakes are
reported before anything heavy loads.
"""

from __future__ import annotations

import argparse

from sft_common.logs import FORMATS
from sft_common.topology.spec import FACTORISATIONS, MODES
from sft_edge.runs.config import COMPRESSIONS, PROBLEMS, WIRE_DTYPES
from sft_edge.runs.config import TrainConfig as D  # every default lives there

DEVICES = ["auto", "cpu", "cuda"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-edge", description="Split fine-tuning: the edge trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="fine-tune on your own labelled file or a GLUE task, split with a cloud daemon (or --local)",
    )
    _data_flags(train.add_argument_group("data"))
    _split_flags(train.add_argument_group("model and split"))
    _link_flags(train.add_argument_group("what crosses the link"))
    _defence_flags(train.add_argument_group("privacy defence (docs/privacy.md)"))
    _training_flags(train.add_argument_group("training"))
    _output_flags(train.add_argument_group("output, checkpoints and resume"))
    _connection_flags(train.add_argument_group("connection to the daemon"), timeouts=True)
    _log_flags(train.add_argument_group("progress and logs"), progress=True)
    _finished_parsers(sub)
    _generate_parser(sub)
    plot = sub.add_parser(
        "plot", help="draw loss, dev metrics and traffic of a run to PNG (needs matplotlib)"
    )
    plot.add_argument("run", help="a run's --output-dir (holding scalars.csv) or a scalars CSV file")
    plot.add_argument("--out", help="PNG to write (default: beside the CSV)")
    plot.add_argument("--title", help="figure title (default: the run folder's name)")
    return parser


def _data_flags(g) -> None:
    g.add_argument("--task", help="a GLUE task: sst2 mrpc rte cola stsb qnli qqp mnli wnli (or --train-file)")
    g.add_argument("--train-file", help="your data: .csv, .tsv, .jsonl/.json or .parquet")
    g.add_argument(
        "--dev-file", help="dev data in the same columns (default: hold out --dev-share of --train-file)"
    )
    g.add_argument("--text-columns", help="the text column, or two for sentence pairs: A,B")
    g.add_argument("--label-column", help="the label column")
    g.add_argument(
        "--problem",
        default=D.problem,
        choices=PROBLEMS,
        help="auto (default): strings and integers are classes, floats regression; causal-lm: fine-tune "
        "a decoder on a JSON Lines file of text, prompt/completion or chat rows (needs --label-private)",
    )
    g.add_argument(
        "--dev-share",
        type=float,
        default=D.dev_share,
        help=f"share of --train-file held out for evaluation without --dev-file (default {D.dev_share:g})",
    )
    g.add_argument(
        "--data-dir", help="GLUE data in the TSV layout (e.g. ../shared/data/glue); default: the hub"
    )
    g.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    g.add_argument("--max-eval-examples", type=int, help="evaluate on only the first N dev examples")
    g.add_argument(
        "--max-seq-len",
        type=int,
        default=D.max_seq_len,
        help=f"truncate to this many tokens (default {D.max_seq_len})",
    )


def _split_flags(g) -> None:
    g.add_argument(
        "--model", default=D.model, help=f"hub name, local folder or random:<preset> (default {D.model})"
    )
    g.add_argument(
        "--local", action="store_true", help="train the whole model here, without a cloud (baseline)"
    )
    g.add_argument(
        "--label-private",
        action="store_true",
        help="the U-shaped split: the last --tail-layers layers, the head and the loss run here too, so "
        "no label leaves the device; the cloud runs the middle (default --split-layer: 0)",
    )
    g.add_argument(
        "--tail-layers",
        type=int,
        default=D.tail_layers,
        help=f"--label-private: whole layers the edge runs after the cloud's part (default {D.tail_layers})",
    )
    g.add_argument(
        "--forward-only",
        action="store_true",
        help="the U with its head and the cloud's middle frozen: each example's activations cross once, "
        "no gradient ever does, and later epochs read the middle's answers from a cache here",
    )
    g.add_argument(
        "--adapters",
        default=D.adapters,
        help="--forward-only: what trains here; tail: the last --tail-layers layers and the head "
        "(with --peft lora, their adapters); parallel: a side network beside the frozen model, reading "
        "every middle layer's output projected to 64 values a token (PAC, ladder side-tuning)",
    )
    g.add_argument(
        "--activation-cache-mb",
        type=float,
        default=D.activation_cache_mb,
        help=f"--forward-only: MiB of the middle's answers kept in --output-dir/activation_cache "
        f"(default {D.activation_cache_mb:.0f}); examples past it are sent again each epoch",
    )
    g.add_argument("--split-layer", type=int, help="0-based layer to cut at (default: the last layer)")
    g.add_argument(
        "--mode",
        default=D.mode,
        choices=MODES,
        help="sft (rank-R cut) or sl (plain split learning, the full width); default: sl for a decoder's "
        "--label-private U, sft otherwise (docs/reference.md)",
    )
    g.add_argument("--rank", type=int, default=D.rank, help=f"SFT rank R (default {D.rank})")
    g.add_argument(
        "--factorise",
        default=D.factorise,
        choices=FACTORISATIONS,
        help="SFT: the cut layer's FFN linear that is factorised: ffn-output (default; the paper's cut: "
        "the edge keeps the residual) or ffn-input (the paper's code's: the edge sends A·r, the "
        "post-attention residual stream through a rank-R bottleneck)",
    )
    g.add_argument(
        "--peft", choices=["lora"], help="train LoRA adapters (PEFT) on both halves, the base frozen"
    )
    g.add_argument("--lora-rank", type=int, default=D.lora_rank, help=f"LoRA rank (default {D.lora_rank})")
    g.add_argument(
        "--lora-alpha", type=float, default=D.lora_alpha, help=f"LoRA alpha (default {D.lora_alpha:g})"
    )
    g.add_argument(
        "--lora-targets",
        help="comma-separated module names to adapt (default: the family's attention query, value)",
    )


def _link_flags(g) -> None:
    g.add_argument(
        "--wire-dtype",
        default=D.wire_dtype,
        choices=WIRE_DTYPES,
        help="what crosses the cut (int8, int4: one scale per token; int4-hadamard, int6-hadamard: codes "
        "in rotated groups of 64, massive tokens in bf16, gradients int8; int4-6-hadamard: 4 bits up, 6 "
        "down the U's second cut; -grad4: its gradients in 4-bit groups too; int3-hadamard: 3 bits, forward-only's "
        "cheapest, +6.5%% perplexity on SmolLM2); default: "
        "int4-6-hadamard-grad4 for a decoder's --label-private U, int4-hadamard for its --forward-only, "
        "fp32 otherwise",
    )
    g.add_argument(
        "--compression",
        default=D.compression,
        choices=COMPRESSIONS,
        help="compress tensors on the wire (zstd: smaller, lz4: faster), or the whole gRPC stream (zstd-stream: "
        "each message against the ones before it; the daemon must know it); default: zstd-stream with a "
        "rotated-group wire (*-hadamard: a decoder U's default), none otherwise",
    )
    g.add_argument(
        "--delta-cache-mb",
        type=float,
        default=D.delta_cache_mb,
        help="delta mode at full-width cuts (--mode sl; AQ-SGD): each side keeps up to this many MiB a cut "
        "of every example's last activations, so later epochs send 2-bit differences from them; "
        "0 (the default): off; at most 4096, and what the daemon allows (sft-cloud serve --max-delta-cache-mb)",
    )
    g.add_argument(
        "--micro-batches",
        type=int,
        default=D.micro_batches,
        help="send each step as this many micro-batches, pipelined so that edge compute, the link "
        "and cloud compute overlap; the update is the whole batch's (default 1: no pipelining)",
    )
    g.add_argument(
        "--pipeline-depth",
        type=int,
        default=D.pipeline_depth,
        help=f"micro-batches in flight at once with --micro-batches (default {D.pipeline_depth})",
    )
    g.add_argument(
        "--cls-only",
        action="store_true",
        help="with the cut at the last layer: send only each example's [CLS] row, the only one the "
        "classifier reads (exact; about sequence-length times less traffic)",
    )


def _defence_flags(g) -> None:
    g.add_argument(
        "--dp-noise",
        type=float,
        default=D.dp_noise,
        metavar="SIGMA",
        help="clip each example's activations sent up to --dp-clip (L2) and add Gaussian noise of std "
        "SIGMA x clip to every value, train and eval messages alike; the report gives epsilon (default 0: off)",
    )
    g.add_argument("--dp-clip", type=float, default=D.dp_clip, metavar="C", help="L2 clip of --dp-noise")
    g.add_argument(
        "--dp-grad-noise",
        type=float,
        default=D.dp_grad_noise,
        metavar="SIGMA",
        help="--label-private: the same on each example's gradient sent up at the second cut, clipped "
        "to --dp-grad-clip (default 0: off)",
    )
    g.add_argument(
        "--dp-grad-clip", type=float, default=D.dp_grad_clip, metavar="C", help="L2 clip of --dp-grad-noise"
    )
    g.add_argument(
        "--dp-delta",
        type=float,
        default=D.dp_delta,
        help=f"delta of the reported epsilon (default {D.dp_delta:g})",
    )


def _training_flags(g) -> None:
    g.add_argument(
        "--batch-size", type=int, default=D.batch_size, help=f"examples per step (default {D.batch_size})"
    )
    g.add_argument("--epochs", type=float, default=D.epochs, help=f"training epochs (default {D.epochs:g})")
    g.add_argument("--max-steps", type=int, help="train exactly this many steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=D.lr, help=f"AdamW learning rate (default {D.lr:g})")
    g.add_argument(
        "--factor-lr",
        type=float,
        default=D.factor_lr,
        help="SFT: learning rate of the SVD factors u, Σ, v, on both sides (default: --lr)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=D.weight_decay,
        help=f"AdamW weight decay (default {D.weight_decay:g})",
    )
    g.add_argument(
        "--warmup-ratio",
        type=float,
        default=D.warmup_ratio,
        help=f"share of steps spent warming up (default {D.warmup_ratio:g})",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=D.seed,
        help=f"seed for the head, dropout and data order (default {D.seed})",
    )
    g.add_argument("--device", default=D.device, choices=DEVICES, help="where this device's part runs")


def _output_flags(g) -> None:
    g.add_argument("--output-dir", help="save the trained edge part (or the whole model with --local) here")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint both sides every N steps")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    g.add_argument("--report", help="write a JSON report of the run here")


def _connection_flags(g, timeouts: bool) -> None:
    """How to reach the daemon; a training run also says how long to wait for it."""
    g.add_argument("--cloud", default=D.cloud, help=f"HOST:PORT of sft-cloud (default {D.cloud})")
    g.add_argument("--insecure", action="store_true", help="connect without TLS; logs a warning")
    g.add_argument("--tls-ca", help="PEM CA that the daemon's certificate must chain to")
    g.add_argument("--tls-cert", help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-key", help="PEM client private key (mutual TLS)")
    g.add_argument("--auth-token-file", help="file holding this device's bearer token")
    if not timeouts:
        return
    g.add_argument(
        "--step-timeout",
        type=float,
        default=D.step_timeout,
        help=f"seconds to wait for the cloud's answer before treating the link as dead (default {D.step_timeout:g})",
    )
    g.add_argument(
        "--reconnect-timeout",
        type=float,
        default=D.reconnect_timeout,
        help=f"seconds to keep re-attaching to the session after a broken link (default {D.reconnect_timeout:g})",
    )


def _log_flags(g, progress: bool = False) -> None:
    if progress:
        g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    g.add_argument("--log-format", default="text", choices=FORMATS, help="text, or one JSON object a line")


def _finished_parsers(sub) -> None:
    """predict, export, forget: a finished run, through the daemon that keeps its cloud part."""
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
            c.add_argument("--device", default="auto", choices=DEVICES, help="where net1 runs")
        if name == "export":
            c.add_argument("--to", required=True, help="the folder to write (new or empty)")
        _connection_flags(c.add_argument_group("connection to the daemon"), timeouts=False)
        _log_flags(c.add_argument_group("logs"))


def _generate_parser(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="text from a --problem causal-lm run, through its daemon, or here from an export or a "
        "--local run, printed as it is decided (each new token runs alone, with a KV cache)",
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
        "--no-kv-cache",
        action="store_true",
        help="recompute the whole sequence for each new token (the reference; slower, more traffic)",
    )
    g.add_argument("--device", default="auto", choices=DEVICES, help="where the edge's parts run")
    _connection_flags(g.add_argument_group("connection to the daemon"), timeouts=False)
    _log_flags(g.add_argument_group("logs"))
