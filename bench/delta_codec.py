"""Delta mode (``--delta-cache-mb``, AQ-SGD) on a decoder's U: bytes a token each way per epoch, and dev loss.

For each setting this trains the U-shaped causal LM (``--label-private --mode sl``, LoRA) for 3 epochs
on a small subset of the paraphrase set through a real daemon (`sft-cloud serve`, its own process)
and records, from the serialised messages of each training step (evaluations not counted), the
bytes a token each way in each epoch (up: ForwardUp and GradientUp; down: ForwardDown and
GradientDown), and the dev loss at step 0 and after training. The settings without delta mode are
the same runs with the decoder U's wire (``int4-6-hadamard``); the delta settings vary the base
codec of an example's first crossing (8-bit rotated groups, or the cut's own wire dtype) and the
deltas' width (4 or 2 bits), patched into ``sft_common.wire.delta`` in the edge's process (the
session config carries them to the daemon).

python -m bench.delta_codec --model smollm2-135m-instruct --data /tmp/smolmrpc   (OMP_NUM_THREADS=1;
the paraphrase set: bench/results/smollm2/paraphrase-commands.sh). Writes bench/results/delta_codec.json;
``--settings 3 4 --append`` runs more of ``SETTINGS`` and keeps those already there.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Dict, List, Optional

from bench.common import (
    RESULTS,
    add_output_args,
    answer_child,
    daemon,
    read_json,
    run_child,
    save,
    table,
    threads_env,
)

# (label, --delta-cache-mb, base codec of the first crossing ("" for the cut's wire dtype), deltas,
# --wire-dtype ("": the decoder U's default, int4-6-hadamard))
SETTINGS = [
    ("int4-6-hadamard, no delta (the decoder U's default)", 0, "", "", ""),
    ("delta: int8-hadamard, then 4-bit deltas", 256, "INT8_HADAMARD", "INT4_HADAMARD", ""),
    ("delta: the cut's wire (4 / 6 bits), then 2-bit deltas", 256, "", "INT2_HADAMARD", ""),
    ("fp32, no delta (exact activations and gradients)", 0, "", "", "fp32"),
    ("delta: int8-hadamard, then 2-bit deltas", 256, "INT8_HADAMARD", "INT2_HADAMARD", ""),
]
EPOCHS = 3
COLUMNS = [
    "setting",
    "epoch 1 up",
    "epoch 2 up",
    "epoch 3 up",
    "epoch 1 down",
    "epoch 2 down",
    "epoch 3 down",
    "dev loss step 0",
    "dev loss after",
    "cache MiB (edge)",
    "seconds",
]


def child(args: argparse.Namespace) -> Dict:
    """One training run in this process (the edge), its traffic recorded step by step."""
    from sft_common.proto import sft_pb2 as pb
    from sft_common.wire import delta
    from sft_edge.runs.config import TrainConfig
    from sft_edge.runs.trainer import train
    from sft_edge.sessions.ushape import UShapeSession

    if args.base or args.delta:
        delta.BASE_DTYPE = pb.DType.Value(args.base) if args.base else pb.DTYPE_UNSPECIFIED
        delta.DELTA_DTYPE = pb.DType.Value(args.delta)
    steps: List[List[int]] = []  # (tokens, bytes sent, bytes received) of each training step
    step_once = UShapeSession.train_step

    def recorded(session: UShapeSession, step: int, batch) -> float:
        sent, received = session.bytes_sent, session.bytes_received
        loss = step_once(session, step, batch)
        steps.append([sum(batch.lengths), session.bytes_sent - sent, session.bytes_received - received])
        return loss

    UShapeSession.train_step = recorded  # type: ignore[method-assign,assignment]
    cfg = TrainConfig(
        problem="causal-lm",
        train_file=os.path.join(args.data, "train.jsonl"),
        dev_file=os.path.join(args.data, "dev.jsonl"),
        model=args.model,
        cloud=f"127.0.0.1:{args.port}",
        insecure=True,
        label_private=True,
        mode="sl",
        peft="lora",
        delta_cache_mb=args.cache_mb,
        wire_dtype=getattr(args, "wire", "") or None,
        epochs=EPOCHS,
        max_train_examples=args.train_examples,
        max_eval_examples=args.dev_examples,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        lr=5e-4,
        seed=args.seed,
        progress=False,
    )
    report = train(cfg)
    return {"steps": steps, "report": {k: report[k] for k in _KEPT}}


_KEPT = (
    "eval_history",
    "start_check",
    "delta_cache_bytes",
    "seconds",
    "wire_dtype",
    "steps",
    "train_examples",
)


def per_epoch(steps: List[List[int]], epochs: int = EPOCHS) -> List[Dict[str, float]]:
    """Bytes a token each way in each epoch, from each step's (tokens, sent, received)."""
    size = math.ceil(len(steps) / epochs)
    out = []
    for e in range(epochs):
        part = steps[e * size : (e + 1) * size]
        tokens = sum(s[0] for s in part)
        out.append({"up": sum(s[1] for s in part) / tokens, "down": sum(s[2] for s in part) / tokens})
    return out


def row(label: str, result: Dict) -> Dict:
    epochs, report = per_epoch(result["steps"]), result["report"]
    history = report["eval_history"]
    out = {"setting": label, "dev loss step 0": history[0]["loss"], "dev loss after": history[-1]["loss"]}
    for e, traffic in enumerate(epochs, 1):
        out[f"epoch {e} up"], out[f"epoch {e} down"] = round(traffic["up"], 1), round(traffic["down"], 1)
    cache = report["delta_cache_bytes"]
    out["cache MiB (edge)"] = round(cache / 2**20, 2) if cache is not None else "-"
    out["seconds"] = round(report["seconds"])
    return out


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="/tmp/smolmrpc", help="train.jsonl and dev.jsonl of the paraphrase set")
    p.add_argument("--train-examples", type=int, default=32)
    p.add_argument("--dev-examples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of the daemon and the edge")
    p.add_argument("--settings", type=int, nargs="*", help="indices into SETTINGS (default: all)")
    p.add_argument("--append", action="store_true", help="keep the settings already in the results file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    add_output_args(p, "delta_codec")
    args = p.parse_args(argv)
    if answer_child(args.child, child):
        return {}
    env = threads_env(args.threads)
    rows: List[Dict] = []
    runs: List[Dict] = []
    earlier = os.path.join(args.out_dir or RESULTS, f"{args.name}.json")
    if args.append and os.path.isfile(earlier):  # the settings run before, kept beside these
        rows, runs = read_json(earlier)["rows"], read_json(earlier)["runs"]
    payload: Dict = {}
    path = ""
    for index in args.settings if args.settings is not None else range(len(SETTINGS)):
        label, cache_mb, base, deltas, wire = SETTINGS[index]
        with tempfile.TemporaryDirectory() as tmp, daemon(["--checkpoint-dir", tmp], env=env) as (_, port):
            keys = ("model", "data", "train_examples", "dev_examples", "batch_size", "max_seq_len", "seed")
            job = {k: getattr(args, k) for k in keys}
            job.update(port=port, cache_mb=cache_mb, base=base, delta=deltas, wire=wire)
            result = run_child("bench.delta_codec", "--child", job, env=env)
        rows.append(row(label, result))
        runs.append({"setting": label, "delta_cache_mb": cache_mb, "base": base, "delta": deltas, **result})
        runs[-1]["wire"] = wire or "int4-6-hadamard"
        payload = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows, "runs": runs}
        path = save(args.name, payload, args.out_dir)  # after each setting: a stopped run keeps what it had
        print(table(rows[-1:], COLUMNS), flush=True)
    print(table(rows, COLUMNS))
    print("wrote", path)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
