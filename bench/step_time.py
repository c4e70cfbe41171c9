"""Per-step time of split training over gRPC against the same split in one process, by part.

Variants (each an ``EdgeSession`` of the product, on the same batches, steps interleaved
round-robin so that load from other processes hits every variant alike):
- ``inproc``: ``InProcessTransport``: the same messages serialized and parsed, no network;
- ``grpc``: a gRPC stream over loopback TCP to a server in this process (the cloud's parts visible);
- ``daemon``: a gRPC stream to an ``sft-cloud serve`` process (the deployment; cloud time is
  inside ``transfer_and_cloud``).
Parts: ``bench.harness.timed_step``; medians over ``--reps`` steps after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Dict, List, Optional

from bench.common import add_workload_args, daemon, median, save, table
from bench.harness import batches, grpc, grpc_server, inproc, record, split_session, timed_step
from sft_common.models.base_model import load_base_model
from sft_common.topology.spec import SplitSpec
from sft_edge.link.transport import Transport
from sft_edge.runs.config import LinkOptions

VARIANTS = ("inproc", "grpc", "daemon")
PARTS = (
    "total edge_compute edge_encode transfer cloud_decode cloud_compute cloud_encode edge_decode"
    " transfer_and_cloud"
).split()


def run(args: argparse.Namespace) -> List[Dict]:
    base = load_base_model(args.model)
    layer = base.config.num_hidden_layers - 1 if args.split_layer is None else args.split_layer
    spec = SplitSpec(split_layer=layer, rank=args.rank, mode=args.mode)
    data = batches(base, args.kind, max(1, args.batches), batch_size=args.batch_size, seq=args.seq)
    total = args.warmup + args.reps
    link = LinkOptions(wire_dtype=args.wire, compression=args.compression)
    with contextlib.ExitStack() as stack:
        sessions = {}
        for v in args.variants:
            cloud: Optional[Callable[[], float]] = None
            transport: Transport
            if v == "inproc":
                transport = inproc(base, device=args.device)
                cloud = lambda p=transport.protocol: p.seconds  # noqa: E731
            elif v == "grpc":
                address, cloud = stack.enter_context(grpc_server(base, args.device))
                transport = grpc(address)
            else:  # daemon
                _, port = stack.enter_context(daemon(["--device", args.device]))
                transport = grpc(f"127.0.0.1:{port}")
            session = split_session(
                base, spec, transport, total, args.batch_size, args.seq, link, args.device
            )
            sessions[v] = session, record(transport), cloud
        samples: Dict[str, List[Dict[str, float]]] = {v: [] for v in sessions}
        for k in range(total):
            for v, (session, events, cloud) in sessions.items():
                parts = timed_step(session, events, k, data[k % len(data)].to(args.device), cloud)
                if k >= args.warmup:
                    samples[v].append(parts)
                print(f"  step {k} {v}: {parts['total']:.3f}s", file=sys.stderr, flush=True)
        for session, _, _ in sessions.values():
            session.close()
    rows = []
    for v, runs in samples.items():
        row: Dict = {"variant": v, **{p: median([r[p] for r in runs]) for p in PARTS if p in runs[0]}}
        row.update(steps=len(runs), all_totals=[round(r["total"], 4) for r in runs])
        rows.append(row)
    if "inproc" in samples:
        ref = next(r for r in rows if r["variant"] == "inproc")["total"]
        for r in rows:
            r["vs_inproc"] = r["total"] / ref
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p, model="random:bert-base", kind="fixed", warmup=1)
    p.add_argument("--device", default="cpu", help="where both halves run (cuda: edge and cloud on the GPU)")
    p.add_argument("--mode", default="sft")
    p.add_argument("--split-layer", type=int)
    p.add_argument("--compression", default="none")
    p.add_argument("--batches", type=int, default=2, help="distinct batches cycled through")
    p.add_argument("--reps", type=int, default=5, help="timed steps")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = p.parse_args()
    rows = run(args)
    print(table(rows, ["variant", "steps", *[c for c in PARTS if any(c in r for r in rows)], "vs_inproc"]))
    name = args.name or f"step_time_{args.mode}"
    print(f"wrote {save(name, {'rows': rows, 'args': vars(args)}, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
