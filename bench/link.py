"""A real two-host link: local, plain split learning and SFT over a shaped veth, whole steps or
micro-batches in flight.

The cloud (`sft-cloud serve`, with its Prometheus metrics) runs in one network namespace and the
edge (this module, ``--edge``) in another, joined by a veth pair shaped by tbf to each rate in
``--rates`` (Mbit/s); ``bench.netns`` makes them and deletes them however the run ends. Needs root.
For each rate, each configuration (``MODE[:SPLIT_LAYER]``, the last layer by default; ``local``:
the whole model, no link) and each micro-batch count and depth, the edge trains ``--steps`` steps
after ``--warmup`` and records: the median step time; ``edge_wait_s``, the mean time a step kept
the edge blocked waiting for answers, and ``edge_busy_s``, the rest (the edge computing); the
message bytes the product counted and the bytes that crossed the edge's interface (every header
included); the daemon's own time for a step (mean, from its ``sft_step_seconds`` metric); and one
round trip (median TCP connect time).

The default table compares each step with its floor: edge compute + cloud compute + interface
bytes / rate + one round trip. ``--overlap``: the micro-batch table (``--micro-batches K
--pipeline-depth D``), with each side on one intra-op thread (OMP_NUM_THREADS=1), so each has one
core of a 2-core machine and the cloud's work can overlap the edge's; the update is the same in
every row (tests/test_pipeline.py), only the schedule differs. Depth 1 with K > 1 is
micro-batching without overlap: each micro-batch is padded only to its own longest sequence.
Usage: sudo python -m bench.link [--rates 1000 100 10] [--configs local sl sft]
       sudo python -m bench.link --overlap [--rates 100 10] [--configs sl:5 sft:5 sft:2] [--micro 1 2 4] [--depths 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.request
from typing import Dict, List, Optional

from bench import netns
from bench.common import ONE_THREAD, add_workload_args, daemon, median, run_child, save, table

METRICS_PORT = 9100  # the daemon's /metrics, in its own namespace
DEFAULTS = {
    "link": {"rates": [1000, 100, 10], "configs": ["local", "sl", "sft"], "micro": [1], "depths": [1], "steps": 10},
    "overlap": {"rates": [100, 10], "configs": ["sl:5", "sft:5", "sft:2"], "micro": [1, 2, 4], "depths": [1, 2],
                "steps": 6},
}  # fmt: skip


def cloud_seconds() -> List[float]:
    """The daemon's ``sft_step_seconds{kind="train"}`` sum and count: its time answering train steps."""
    with urllib.request.urlopen(f"http://{netns.CLOUD_IP}:{METRICS_PORT}/metrics", timeout=30) as r:
        text = r.read().decode()
    found = dict(re.findall(r'^sft_step_seconds_(sum|count)\{kind="train"\} (\S+)$', text, re.M))
    return [float(found.get("sum", 0)), float(found.get("count", 0))]


def edge(args: argparse.Namespace) -> List[Dict]:
    """Runs in the edge namespace: every configuration at every rate, timed."""
    import torch

    from bench.harness import Watched, batches, grpc, local_session, split_session, time_steps
    from sft_common.models import load_base_model
    from sft_common.spec import SplitSpec
    from sft_edge.config import LinkOptions

    torch.manual_seed(0)
    base = load_base_model(args.model)
    n, last = args.warmup + args.steps, base.config.num_hidden_layers - 1
    data = batches(base, args.kind, n, batch_size=args.batch_size, seq=args.seq)
    tokens = sum(sum(b.lengths) for b in data[args.warmup :]) / args.steps
    rows = []
    if "local" in args.configs:
        times = time_steps(local_session(base, n), data, args.warmup)
        rows.append(
            {
                "config": "local",
                "mode": "local",
                "rate_mbit": "-",
                "step_s": median(times),
                "all_step_s": times,
            }
        )
    host, port = args.cloud.rsplit(":", 1)
    for rate in args.rates:
        netns.shape(rate)
        rtt = netns.tcp_rtt(host, int(port))
        for config in [c for c in args.configs if c != "local"]:
            mode, _, layer = config.partition(":")
            spec = SplitSpec(split_layer=int(layer or last), rank=args.rank, mode=mode)
            # Depth 1 with several micro-batches: their smaller, less padded matrices without overlap.
            for micro, depth in [(m, d) for m in args.micro for d in (args.depths if m > 1 else [1])]:
                transport = Watched(grpc(args.cloud))
                link = LinkOptions(args.wire, micro_batches=micro, pipeline_depth=depth)
                session = split_session(base, spec, transport, n, args.batch_size, args.seq, link)
                time_steps(session, data[: args.warmup])
                cloud0, bytes0, if0 = (
                    cloud_seconds(),
                    transport.bytes_sent + transport.bytes_received,
                    netns.counters(),
                )
                times = time_steps(session, data[args.warmup :], first=args.warmup)
                if1, cloud1 = netns.counters(), cloud_seconds()
                msg_bytes = transport.bytes_sent + transport.bytes_received - bytes0
                wait = sum(transport.waits[-args.steps * micro :]) / args.steps
                session.close()
                row = {"config": config, "mode": mode, "split_layer": spec.split_layer, "rate_mbit": rate,
                       "micro": micro, "depth": depth, "step_s": median(times), "all_step_s": times,
                       "edge_wait_s": wait, "edge_busy_s": median(times) - wait, "rtt_s": rtt,
                       "cloud_s": (cloud1[0] - cloud0[0]) / args.steps, "tokens_per_step": tokens,
                       "msg_bytes_per_step": msg_bytes / args.steps,
                       **{f"if_{k}_per_step": (if1[k] - if0[k]) / args.steps for k in if1}}  # fmt: skip
                rows.append(row)
                print(f"  {rate} Mbit/s {config} micro {micro} depth {depth}: {row['step_s']:.3f} s/step",
                      file=sys.stderr, flush=True)  # fmt: skip
    return rows


def link_table(rows: List[Dict]) -> List[Dict]:
    """Each split row against its floor and against local training."""
    local = next((r["step_s"] for r in rows if r["mode"] == "local"), None)
    out = [{"mode": "local", "rate_mbit": "-", "step_s": local}] if local else []
    for r in rows:
        if r["mode"] == "local":
            continue
        rate_bps = r["rate_mbit"] * 1e6 / 8
        wire_bytes = r["if_tx_bytes_per_step"] + r["if_rx_bytes_per_step"]
        floor = r["edge_busy_s"] + r["cloud_s"] + wire_bytes / rate_bps + r["rtt_s"]
        out.append({"mode": r["mode"], "rate_mbit": r["rate_mbit"], "step_s": r["step_s"], "floor_s": floor,
                    "vs_floor": r["step_s"] / floor, "edge_s": r["edge_busy_s"], "cloud_s": r["cloud_s"],
                    "wire_s": wire_bytes / rate_bps, "rtt_ms": r["rtt_s"] * 1e3,
                    "msg_bytes_per_step": r["msg_bytes_per_step"], "if_bytes_per_step": wire_bytes,
                    "if_over_msg": wire_bytes / r["msg_bytes_per_step"],
                    "vs_local": r["step_s"] / local if local else None})  # fmt: skip
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overlap", action="store_true", help="micro-batches in flight against whole steps")
    p.add_argument("--rates", nargs="+", type=float, help="Mbit/s")
    p.add_argument("--configs", nargs="+", help="local, or MODE[:SPLIT_LAYER] (default: the last layer)")
    p.add_argument("--micro", nargs="+", type=int, help="micro-batch counts")
    p.add_argument("--depths", nargs="+", type=int, help="--pipeline-depth values (micro > 1)")
    add_workload_args(p, kind="sst2", steps=None, warmup=2)
    p.add_argument("--edge", help=argparse.SUPPRESS)  # the edge half, in its namespace: arguments as JSON
    args = p.parse_args(argv)
    if args.edge:
        print(json.dumps(edge(argparse.Namespace(**json.loads(args.edge)))))
        return 0
    what = "overlap" if args.overlap else "link"
    for key, value in DEFAULTS[what].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    env = dict(os.environ, **ONE_THREAD) if args.overlap else None
    metrics = ["--metrics-port", str(METRICS_PORT)]
    with netns.link():
        netem = netns.netem_available()
        with daemon(metrics, host=netns.CLOUD_IP, prefix=netns.EXEC_CLOUD, env=env) as (_, port):
            edge_args = json.dumps({**vars(args), "cloud": f"{netns.CLOUD_IP}:{port}"})
            rows = run_child("bench.link", ["--edge", edge_args], netns.EXEC_EDGE, env)
    order = {c: i for i, c in enumerate(args.configs)}
    rows.sort(key=lambda r: order[r["config"]])  # stable: rates, then micro-batches, in the order run
    if args.overlap:
        whole = {(r["rate_mbit"], r["config"]): r["step_s"] for r in rows if r["micro"] == 1}
        for r in rows:
            base = whole.get((r["rate_mbit"], r["config"]))
            r["speedup"] = base / r["step_s"] if base else None
            r["bytes_per_step"] = r["msg_bytes_per_step"]
        print(table(rows, ["rate_mbit", "mode", "split_layer", "micro", "depth", "step_s", "speedup", "edge_busy_s",
                           "edge_wait_s", "bytes_per_step"]))  # fmt: skip
        payload = {"rows": rows, "args": vars(args), "threads_per_side": 1}
    else:
        link_rows = link_table(rows)
        print(table(link_rows, ["mode", "rate_mbit", "step_s", "floor_s", "vs_floor", "edge_s", "cloud_s", "wire_s",
                                "rtt_ms", "msg_bytes_per_step", "if_bytes_per_step", "if_over_msg", "vs_local"]))  # fmt: skip
        print(f"netem delay available: {netem}")
        payload = {"rows": link_rows, "raw": rows, "netem": netem, "args": vars(args)}
    print(f"wrote {save(args.name or what, payload, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
