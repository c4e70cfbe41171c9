"""Edge memory: a training process's peak resident set, the split edge against `--local`, by split layer.

Every run is its own process (``--child``): ``--local`` trains the whole model, each split run
net1 against an ``sft-cloud serve`` daemon on loopback. Training memory is the peak (``VmHWM``,
restarted once the model is built) above the resident size before the model was loaded; the table
sets it against the bytes ``bench.memory_accounting`` counts on the same batch.
Usage: python -m bench.memory [--layers 0 2 4 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

from bench import memory_accounting as acc
from bench.common import (
    add_workload_args,
    answer_child,
    daemon,
    median,
    proc_status,
    reset_peak,
    run_child,
    save,
    table,
)


def child(args: argparse.Namespace) -> Dict:
    """One process: build the model, train ``warmup + steps`` steps; in MiB above ``idle_mib`` (the
    resident size before the model), the peak while building and while training, and the median
    time of a step after the warm-up."""
    from bench.harness import batches, grpc, inproc, local_session, split_session, time_steps
    from sft_common.models.base_model import load_base_model
    from sft_common.topology.spec import SplitSpec

    idle = proc_status()["VmRSS"] / 1024
    base = load_base_model(args.model)
    n = args.warmup + args.steps
    data = batches(base, args.kind, n, batch_size=args.batch_size, seq=args.seq)
    session: Any
    if args.split_layer is None:
        session = local_session(base, n)
    else:
        transport = grpc(args.cloud) if args.cloud else inproc(base)
        spec = SplitSpec(args.split_layer, args.rank, args.mode)
        session = split_session(base, spec, transport, n, args.batch_size, args.seq)
    built = proc_status()["VmHWM"] / 1024 - idle
    reset_peak()
    times = time_steps(session, data, args.warmup)
    peak = proc_status()["VmHWM"] / 1024 - idle
    session.close()
    return {
        "run": "local" if args.split_layer is None else f"edge l={args.split_layer}",
        "idle_mib": idle,
        "built_mib": built,
        "peak_mib": peak,
        "step_s": median(times),
    }


def accounting(args: argparse.Namespace) -> Dict:
    """The counted bytes of one local step and of one split step per layer, on the benchmark's
    first batch (every batch of ``--kind fixed`` has the same shapes)."""
    from bench.harness import batches
    from sft_common.models.base_model import load_base_model
    from sft_common.topology.spec import SplitSpec

    base = load_base_model(args.model)
    batch = batches(base, args.kind, 1, batch_size=args.batch_size, seq=args.seq)[0]
    local = acc.account_local(base, batch)
    out: Dict = {"local": local, "layers": {}}
    for layer in args.layers:
        split = acc.account_split(base, SplitSpec(layer, args.rank, args.mode), batch, args.wire)
        out["layers"][layer] = {**split, "summary": acc.split_summary(local, split)}
        print(f"counted, layer {layer}: {out['layers'][layer]['summary']}", file=sys.stderr, flush=True)
    return out


def rss_row(run: Dict, counted: int, local: Optional[Dict] = None, summary: Optional[Dict] = None) -> Dict:
    """A run's peak against its counted bytes (and, for the edge, against local and the moved share)."""
    train = max(run["peak_mib"], run["built_mib"])
    row = {
        "run": "local" if local is None else f"edge ({run['mode']})",
        "split_layer": run["split_layer"],
        "peak_mib": run["idle_mib"] + train,
        "idle_mib": run["idle_mib"],
        "train_mib": train,
        "counted_mib": acc.mib(counted),
        "uncounted_mib": train - acc.mib(counted),
    }
    if local is not None and summary is not None:
        row.update(
            moved_mib=acc.mib(summary["moved_bytes"]),
            saved_share=1 - train / local["train_mib"],
            moved_share=summary["moved_share"],
            counted_saved_share=summary["edge_saved_share"],
            peak_vs_local=row["peak_mib"] / local["peak_mib"],
        )
        row["bar_rss"] = "met" if row["saved_share"] >= row["moved_share"] else "missed"
        row["bar_counted"] = "met" if row["counted_saved_share"] >= row["moved_share"] else "missed"
    return row


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, kind="fixed", warmup=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--layers", nargs="+", type=int, default=[0, 2, 4, 5])
    p.add_argument("--mode", default="sft")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one measured process: its arguments as JSON
    args = p.parse_args(argv)
    if answer_child(args.child, child):
        return 0

    def run(layer: Optional[int], cloud: Optional[str] = None) -> Dict:
        out = run_child("bench.memory", "--child", {**vars(args), "split_layer": layer, "cloud": cloud})
        print(f"{out['run']}: peak {out['peak_mib']:.0f} MiB above idle", file=sys.stderr, flush=True)
        return {**out, "mode": args.mode, "split_layer": "-" if layer is None else layer}

    runs = [run(None)]
    with daemon() as (_, port):
        runs += [run(layer, f"127.0.0.1:{port}") for layer in args.layers]
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}  # glibc tunables, if set
    counted = accounting(args)
    local = rss_row(runs[0], acc.total(counted["local"]))
    rows = [local]
    for r in runs[1:]:
        s = counted["layers"][r["split_layer"]]["summary"]
        rows.append(rss_row(r, s["edge_bytes"], local, s))
    columns = "run split_layer peak_mib idle_mib train_mib counted_mib uncounted_mib moved_mib saved_share"
    print(table(rows, columns + " moved_share bar_rss counted_saved_share bar_counted"))
    payload = {"rows": rows, "counted": counted}
    name = args.name or "memory"
    print(f"wrote {save(name, {**payload, 'malloc_env': malloc, 'args': vars(args)}, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
