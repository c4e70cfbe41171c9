"""One edge process for the link and memory benchmarks: timed steps, bytes, peak memory, as JSON.

``--phase local``: the whole model in this process (``--local``). ``--phase inproc``: the split
with the cloud session in this process (edge and cloud compute, no network). ``--phase grpc``:
the split against the daemon at ``--cloud``, once per ``--rates`` entry (shaping the link with
``bench.netns.shape`` first, when rates are given), reading the edge interface's counters around
the measured steps. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from typing import Dict, List, Optional

import torch


def rss_kb() -> Dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of this process, in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def main(argv: Optional[List[str]] = None) -> int:
    from bench.common import add_workload_args, median

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", required=True, choices=["local", "inproc", "grpc"])
    add_workload_args(p, kind="sst2", steps=10, warmup=2)
    p.add_argument("--mode", default="sft")
    p.add_argument("--split-layer", type=int)
    p.add_argument("--compression", default="none")
    p.add_argument("--cloud", help="HOST:PORT of the daemon (grpc phase)")
    p.add_argument("--rates", nargs="*", type=float, default=[], help="Mbit/s; shape the link before each")
    p.add_argument("--iface", help="read this interface's counters around the measured steps")
    args = p.parse_args(argv)

    from bench.harness import StepTimer, batches, split_backend, time_steps, transport_for
    from sft_common.spec import SplitSpec
    from sft_common.models import load_base_model
    from sft_edge.backends import LocalBackend, OptimConfig

    idle = rss_kb()
    base = load_base_model(args.model)
    layer = base.config.num_hidden_layers - 1 if args.split_layer is None else args.split_layer
    spec = SplitSpec(split_layer=layer, rank=args.rank, mode=args.mode)
    n = args.warmup + args.steps
    data = batches(base, args.kind, n, batch_size=args.batch_size, seq=args.seq)
    out: Dict = {"phase": args.phase, "mode": "local" if args.phase == "local" else args.mode,
                 "model": args.model, "kind": args.kind, "split_layer": layer, "rank": args.rank,
                 "wire": args.wire, "compression": args.compression, "steps": args.steps,
                 "tokens_per_step": sum(sum(b.lengths) for b in data[args.warmup:]) / args.steps}  # fmt: skip

    if args.phase == "local":
        local = LocalBackend(base, 2, OptimConfig(lr=2e-5, total_steps=n, seed=42), "cpu")
        times = time_steps(local, data, args.warmup)
        out["step_s"] = median(times)
        out["all_step_s"] = times
    elif args.phase == "inproc":
        transport = transport_for("inproc", base)
        backend = split_backend(
            base, spec, transport, args.wire, args.compression, args.batch_size, args.seq, n
        )
        parts = _timed_steps(backend, transport, data, args.warmup, StepTimer)
        out.update({k: median([x[k] for x in parts]) for k in parts[0]})
        out["step_s"] = out.pop("total")
        backend.close()
    else:
        from bench import netns

        host, port = args.cloud.rsplit(":", 1)
        out["links"] = []
        for rate in args.rates or [0.0]:
            if rate:
                netns.shape(rate)
            rtt = netns.tcp_rtt(host, int(port))
            transport = transport_for("grpc", base, args.cloud)
            backend = split_backend(
                base, spec, transport, args.wire, args.compression, args.batch_size, args.seq, n
            )
            link: Dict = {"rate_mbit": rate, "rtt_s": rtt}
            parts = _timed_steps(backend, transport, data, args.warmup, StepTimer, args.iface, link)
            link.update({k: median([x[k] for x in parts]) for k in parts[0]})
            link["step_s"] = link.pop("total")
            link["all_step_s"] = [x["total"] for x in parts]
            backend.close()
            out["links"].append(link)
            print(f"  {args.mode} at {rate} Mbit/s: {link['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    out["memory_kb"] = {"idle": idle, "end": rss_kb()}
    print(json.dumps(out))
    return 0


def _timed_steps(
    backend, transport, data, warmup, timer_cls, iface=None, link=None
) -> List[Dict[str, float]]:
    from bench import netns

    timer = timer_cls()
    timer.install(transport)
    parts = []
    try:
        for k, b in enumerate(data):
            if k == warmup:
                sent0, recv0 = transport.bytes_sent, transport.bytes_received
                if iface:
                    c0 = netns.counters(iface)
            parts.append(timer.step(backend, k, b))
    finally:
        timer.uninstall()
    steps = len(data) - warmup
    if link is not None:
        link["msg_sent_per_step"] = (transport.bytes_sent - sent0) / steps
        link["msg_received_per_step"] = (transport.bytes_received - recv0) / steps
        if iface:
            c1 = netns.counters(iface)
            for key in c1:
                link[f"if_{key}_per_step"] = (c1[key] - c0[key]) / steps
    return parts[warmup:]


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
