"""Forward-only against the backprop U and --local over several epochs: accuracy, bytes, the cloud's compute, the edge's memory (issue 32).

Each row is one `sft-edge train --problem causal-lm --peft lora` run, in a process of its own (its
peak resident set: ``ru_maxrss``), through its own `sft-cloud serve` process, whose Prometheus
``sft_step_seconds`` (every message: decode, forward, backward, encode) summed over the run is the
cloud's compute. The same rows, order, seed and budget for every row; bytes are the report's (the
edge's transport counts the serialised messages). Usage:

    python -m bench.forward_only --model smollm2-135m-instruct --data /tmp/smolmrpc --rows 64 --epochs 3

(``--model random:smollm2``: SmolLM2's geometry with random weights, for bytes and compute only.)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import sys
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench.common import add_output_args, answer_child, daemon, run_child, save, table
from bench.decoder_codecs import paraphrases

# (label, the flags beyond the common ones): the backprop U at its default (full width,
# int4-6-hadamard-grad4 on a decoder) and with int8 gradients, forward-only at 6 and 4 bits down,
# fp32 for the plain bytes, and the unsplit baseline.
KINDS: List[Tuple[str, Dict[str, Any]]] = [
    ("--local", {"local": True}),
    ("U (backprop), fp32", {"label_private": True, "mode": "sl", "wire_dtype": "fp32"}),
    ("U (backprop), int4-6-hadamard", {"label_private": True, "wire_dtype": "int4-6-hadamard"}),
    ("U (backprop), int4-6-hadamard-grad4 (the default)", {"label_private": True}),
    ("forward-only, fp32", {"forward_only": True, "wire_dtype": "fp32"}),
    ("forward-only, int4-6-hadamard", {"forward_only": True, "wire_dtype": "int4-6-hadamard"}),
    ("forward-only, int4-hadamard", {"forward_only": True, "wire_dtype": "int4-hadamard"}),
    # the gRPC stream packed (--compression zstd-stream: one zstd stream a direction, tensors raw)
    # at the U's default and at forward-only's 4 and 3 bits
    (
        "U (backprop), int4-6-hadamard-grad4, zstd-stream",
        {"label_private": True, "compression": "zstd-stream"},
    ),
    ("forward-only, int4-hadamard, zstd-stream", {"forward_only": True, "compression": "zstd-stream"}),
    ("forward-only, int3-hadamard", {"forward_only": True, "wire_dtype": "int3-hadamard"}),
    (
        "forward-only, int3-hadamard, zstd-stream",
        {"forward_only": True, "wire_dtype": "int3-hadamard", "compression": "zstd-stream"},
    ),
    # the side network beside the frozen model: no LoRA (the backbone stays the base's)
    ("forward-only, parallel", {"forward_only": True, "adapters": "parallel", "peft": None}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cloud_seconds(metrics_port: int) -> float:
    """The daemon's ``sft_step_seconds`` summed over every message kind, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "sft_step_seconds_sum"
    )


def train_child(args: argparse.Namespace) -> Dict[str, Any]:
    """In the child: one run; its report's numbers and this process's peak resident set."""
    from sft_edge.runs.config import TrainConfig
    from sft_edge.runs.trainer import train

    report = train(TrainConfig(**args.config))
    return {
        "dev_perplexity": report["metrics"]["perplexity"],
        "step0_perplexity": report["eval_history"][0]["perplexity"],
        "bytes_sent": report["bytes_sent"],
        "bytes_received": report["bytes_received"],
        "seconds": report["seconds"],
        "edge_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def one_row(label: str, flags: Dict[str, Any], common: Dict[str, Any], epochs: float, out: str) -> Dict:
    folder = os.path.join(out, label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""))
    shutil.rmtree(folder, ignore_errors=True)  # no cache or checkpoint of an earlier run
    config = {**common, **flags, "output_dir": folder}
    if flags.get("local"):
        got = run_child("bench.forward_only", "--child", {"config": config})
        return {"setting": label, **got, "cloud_s_per_epoch": None}
    mport = free_port()
    with daemon(["--metrics-port", str(mport)]) as (_, port):
        config.update(cloud=f"127.0.0.1:{port}", insecure=True)
        got = run_child("bench.forward_only", "--child", {"config": config})
        got["cloud_s_per_epoch"] = round(cloud_seconds(mport) / epochs, 1)
    return {"setting": label, **got}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    paraphrases(args.data)
    common = dict(
        problem="causal-lm", train_file=os.path.join(args.data, "train.jsonl"),
        dev_file=os.path.join(args.data, "dev.jsonl"), model=args.model, peft="lora",
        max_train_examples=args.rows, max_eval_examples=args.dev_rows, epochs=args.epochs,
        batch_size=8, max_seq_len=96, lr=args.lr, seed=42, progress=False,
    )  # fmt: skip
    kinds = [k for k in KINDS if args.only is None or k[0] in args.only]
    rows = [one_row(label, flags, common, args.epochs, args.work) for label, flags in kinds]
    for row in rows:
        for key in ("dev_perplexity", "step0_perplexity", "edge_peak_mib"):
            row[key] = round(row[key], 3)
    return {
        "model": args.model,
        "rows_trained": args.rows,
        "epochs": args.epochs,
        "common": common,
        "rows": rows,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", default="random:smollm2")
    p.add_argument("--data", default="/tmp/smolmrpc", help="the paraphrase set (made here if missing)")
    p.add_argument("--rows", type=int, default=64, help="training rows (each epoch sees them all)")
    p.add_argument("--dev-rows", type=int, default=40)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--work", default="/tmp/bench-forward-only", help="the runs' output folders")
    p.add_argument("--only", nargs="+", help="these settings only (by label)")
    add_output_args(p, "forward_only")
    args = p.parse_args(argv)
    if answer_child(args.child, train_child):
        return 0
    out = run(args)
    rows: List[Dict] = out["rows"]
    print(
        f"{args.model}, {args.rows} rows x {args.epochs:g} epochs, batch 8, LoRA: forward-only against the U"
    )
    print(table(rows, list(rows[0])))
    print("wrote", save(args.name, out, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
