"""Overlap: the step time with micro-batches in flight (--micro-batches) against whole steps.

Two one-core hosts on a shaped link: the cloud (`sft-cloud serve`) in one network namespace and
the edge (this module, ``--edge``) in another, each limited to one intra-op thread
(OMP_NUM_THREADS=1), so each has a core of this 2-core machine to itself and the cloud's work
can overlap the edge's. For each rate, each configuration (mode and split layer) and each
micro-batch count, the edge trains ``--steps`` steps (after ``--warmup``) on real SST-2 batches
and records the median step time, the mean time a step spent blocked waiting for answers
(``edge_wait_s``) and the rest (``edge_busy_s``: the edge computing). The update is the same in
every row (tests/test_pipeline.py shows micro-batched training equals whole-batch training);
only the schedule differs.
Needs root; the namespaces are deleted however the run ends.
Micro-batches without overlap (``--pipeline-depth 1``) are measured too: smaller micro-batches are
each padded to their own longest sequence, which saves compute by itself; the difference between
depth 1 and depth 2 is what the overlap buys.
Usage: sudo python -m bench.overlap [--rates 100 10] [--micro 1 2 4] [--depths 1 2] [--configs sl:5 sft:5 sft:2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

from bench import netns
from bench.common import ROOT, add_workload_args, median, save, table
from sft_cloud import launch

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def edge(args: argparse.Namespace) -> List[Dict]:
    """Runs in the edge namespace: every (rate, configuration, micro-batch count), timed."""
    import torch

    from bench.harness import batches, split_backend, time_steps, transport_for
    from sft_common.spec import SplitSpec
    from sft_common.models import load_base_model

    torch.manual_seed(0)
    base = load_base_model(args.model)
    n = args.warmup + args.steps
    data = batches(base, args.kind, n, batch_size=args.batch_size, seq=args.seq)
    rows = []
    for rate in args.rates:
        netns.shape(rate)
        for config in args.configs:
            mode, layer = config.split(":")
            spec = SplitSpec(split_layer=int(layer), rank=args.rank, mode=mode)
            # Depth 1 with several micro-batches: their smaller, less padded matrices without overlap.
            for micro, depth in [(m, d) for m in args.micro for d in (args.depths if m > 1 else [1])]:
                transport = transport_for("grpc", base, args.cloud)
                waited = _time_waits(transport)
                backend = split_backend(
                    base, spec, transport, args.wire, "none", args.batch_size, args.seq, n, micro, depth
                )
                waited.clear()
                times = time_steps(backend, data, args.warmup)
                wait_s = sum(waited[-args.steps * micro :]) / args.steps
                sent = transport.bytes_sent + transport.bytes_received
                backend.close()
                row = {"rate_mbit": rate, "mode": mode, "split_layer": int(layer), "micro": micro, "depth": depth,
                       "step_s": median(times), "edge_wait_s": wait_s, "edge_busy_s": median(times) - wait_s,
                       "all_step_s": times, "bytes_per_step": sent / n}  # fmt: skip
                rows.append(row)
                say = f"  {rate} Mbit/s {config} micro {micro} depth {depth}: {row['step_s']:.3f} s/step"
                print(say, file=sys.stderr, flush=True)
    return rows


def _time_waits(transport) -> List[float]:
    """Record how long each ``result()`` blocks: the edge idle, waiting for the link and the cloud."""
    waited: List[float] = []
    result = transport.result

    def timed_result():
        t0 = time.perf_counter()
        try:
            return result()
        finally:
            waited.append(time.perf_counter() - t0)

    transport.result = timed_result
    return waited


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", nargs="+", type=float, default=[100, 10])
    p.add_argument("--configs", nargs="+", default=["sl:5", "sft:5", "sft:2"], help="MODE:SPLIT_LAYER")
    p.add_argument("--micro", nargs="+", type=int, default=[1, 2, 4], help="micro-batch counts")
    p.add_argument(
        "--depths", nargs="+", type=int, default=[1, 2], help="--pipeline-depth values (micro > 1)"
    )
    add_workload_args(p, kind="sst2", steps=6, warmup=2, name="overlap")
    p.add_argument("--edge", action="store_true", help=argparse.SUPPRESS)  # the edge half (in its namespace)
    p.add_argument("--cloud", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.edge:
        print(json.dumps(edge(args)))
        return 0

    env = dict(os.environ, **ONE_THREAD)
    with netns.link():
        daemon, port = launch.start_daemon(
            ["--insecure"], host=netns.CLOUD_IP, prefix=["ip", "netns", "exec", netns.CLOUD_NS],
            cwd=ROOT, env=env,
        )  # fmt: skip
        try:
            cmd = ["ip", "netns", "exec", netns.EDGE_NS, sys.executable, "-m", "bench.overlap", "--edge",
                   "--cloud", f"{netns.CLOUD_IP}:{port}"] + _forward(argv if argv is not None else sys.argv[1:])  # fmt: skip
            out = subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True).stdout
        finally:
            launch.stop_daemon(daemon)
    rows = json.loads(out.strip().splitlines()[-1])
    whole = {(r["rate_mbit"], r["mode"], r["split_layer"]): r["step_s"] for r in rows if r["micro"] == 1}
    for r in rows:
        base = whole.get((r["rate_mbit"], r["mode"], r["split_layer"]))
        r["speedup"] = base / r["step_s"] if base else None
    cols = ["rate_mbit", "mode", "split_layer", "micro", "depth", "step_s", "speedup", "edge_busy_s", "edge_wait_s",
            "bytes_per_step"]  # fmt: skip
    print(table(rows, cols))
    path = save(args.name, {"rows": rows, "args": vars(args), "threads_per_side": 1}, args.out_dir)
    print(f"wrote {path}")
    return 0


def _forward(argv: List[str]) -> List[str]:
    """The user's options, minus those only the parent uses."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--name", "--out-dir"):
            skip = True
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
