"""A real two-host link: local, split learning and SFT over a shaped veth.

The cloud (`sft-cloud serve`) runs in network namespace ``sftb-cloud``, the edge (``--edge``) in
``sftb-edge``, joined by a veth pair that tbf shapes both ways to each of ``--rates`` (Mbit/s);
needs root, and ``namespaces()`` deletes them however it ends. Each configuration is
``MODE[:SPLIT_LAYER]`` (default the last layer) or ``local`` (no link). The default table sets each
step against its floor: edge compute + cloud compute + interface bytes / rate + one round trip.
What each column is: docs/benchmarks.md §3.
Usage: sudo python -m bench.link [--rates 1000 100 10] [--configs local sl sft]
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Dict, Iterator, List, Optional

from bench.common import (
    add_workload_args,
    answer_child,
    daemon,
    exit_on_signals,
    median,
    run_child,
    save,
    table,
)

CLOUD_NS, EDGE_NS = "sftb-cloud", "sftb-edge"
CLOUD_IF, EDGE_IF = "sftb-c", "sftb-e"
CLOUD_IP, EDGE_IP = "192.0.2.1", "192.0.2.2"  # TEST-NET-1 (RFC 5737): routes nowhere
EXEC_CLOUD, EXEC_EDGE = ["ip", "netns", "exec", CLOUD_NS], ["ip", "netns", "exec", EDGE_NS]
METRICS_PORT = 9100  # the daemon's /metrics, in its own namespace


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def teardown() -> None:
    for ns in (CLOUD_NS, EDGE_NS):
        sh("ip", "netns", "del", ns, check=False)


def shape(rate_mbit: float) -> Dict[str, str]:
    """Rate-limit both directions with tbf (no delay: the kernel measured on had no netem)."""
    rate_bytes = rate_mbit * 1e6 / 8
    # Burst: at least one 10 ms token refill (and 32 KB); queue: 200 ms at the rate (at least
    # 256 KB), so TCP sees a deep enough queue to reach the rate without excess drops.
    burst = max(int(rate_bytes / 100), 32 * 1024)
    limit = max(int(rate_bytes * 0.2), 256 * 1024)
    tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "limit", str(limit)]
    applied = {}
    for ns, ifname in ((CLOUD_NS, CLOUD_IF), (EDGE_NS, EDGE_IF)):
        tc = ["ip", "netns", "exec", ns, "tc", "qdisc"]
        sh(*tc, "del", "dev", ifname, "root", check=False)
        sh(*tc, "add", "dev", ifname, "root", *tbf)
        applied[ifname] = sh(*tc, "show", "dev", ifname).stdout.strip()
    return applied


def counters() -> Dict[str, int]:
    """tx/rx bytes and packets of the edge's interface (all headers included), from its namespace."""
    stats = pathlib.Path(f"/sys/class/net/{EDGE_IF}/statistics")
    keys = ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets")
    return {key: int((stats / key).read_text()) for key in keys}


def tcp_rtt(host: str, port: int, n: int = 15) -> float:
    """Median TCP connect time (SYN -> SYN/ACK): one round trip, in seconds."""
    times: List[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=10):
            times.append(time.perf_counter() - t0)
    return median(times)


@contextlib.contextmanager
def namespaces() -> Iterator[None]:
    """The two namespaces, joined by the veth pair and up, for the block; deleted however it ends."""
    with exit_on_signals():
        try:
            teardown()
            for ns in (CLOUD_NS, EDGE_NS):
                sh("ip", "netns", "add", ns)
            sh(
                *f"ip link add {CLOUD_IF} netns {CLOUD_NS} type veth peer name {EDGE_IF} netns {EDGE_NS}".split()
            )
            for ns, ifname, ip in ((CLOUD_NS, CLOUD_IF, CLOUD_IP), (EDGE_NS, EDGE_IF, EDGE_IP)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
                sh("ip", "-n", ns, "link", "set", ifname, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            yield
        finally:
            teardown()


def cloud_seconds() -> float:
    """The daemon's time answering train steps so far (its ``sft_step_seconds`` metric)."""
    with urllib.request.urlopen(f"http://{CLOUD_IP}:{METRICS_PORT}/metrics", timeout=30) as r:
        found = re.search(r'^sft_step_seconds_sum\{kind="train"\} (\S+)$', r.read().decode(), re.M)
    return float(found.group(1)) if found else 0.0


def edge(args: argparse.Namespace) -> List[Dict]:
    """Runs in the edge namespace: every configuration at every rate, timed."""
    import torch

    from bench.harness import Watched, batches, grpc, local_session, split_session, time_steps
    from sft_common.models.base_model import load_base_model
    from sft_common.topology.spec import SplitSpec
    from sft_edge.runs.config import LinkOptions

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
        shape(rate)
        rtt = tcp_rtt(host, int(port))
        for config in [c for c in args.configs if c != "local"]:
            mode, _, layer = config.partition(":")
            spec = SplitSpec(split_layer=int(layer or last), rank=args.rank, mode=mode)
            transport = Watched(grpc(args.cloud))
            session = split_session(
                base, spec, transport, n, args.batch_size, args.seq, LinkOptions(args.wire)
            )
            time_steps(session, data[: args.warmup])
            cloud0, if0 = cloud_seconds(), counters()
            bytes0 = transport.bytes_sent + transport.bytes_received
            times = time_steps(session, data[args.warmup :], first=args.warmup)
            if1, cloud1 = counters(), cloud_seconds()
            msg_bytes = transport.bytes_sent + transport.bytes_received - bytes0
            wait = sum(transport.waits[-args.steps :]) / args.steps
            session.close()
            row = {
                "config": config,
                "mode": mode,
                "split_layer": spec.split_layer,
                "rate_mbit": rate,
                "step_s": median(times),
                "all_step_s": times,
                "edge_wait_s": wait,
                "edge_busy_s": median(times) - wait,
                "rtt_s": rtt,
                "cloud_s": (cloud1 - cloud0) / args.steps,
                "tokens_per_step": tokens,
                "msg_bytes_per_step": msg_bytes / args.steps,
                **{f"if_{k}_per_step": (if1[k] - if0[k]) / args.steps for k in if1},
            }
            rows.append(row)
            print(f"  {rate} Mbit/s {config}: {row['step_s']:.3f} s/step", file=sys.stderr, flush=True)
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
        out.append(
            {
                "mode": r["mode"],
                "rate_mbit": r["rate_mbit"],
                "step_s": r["step_s"],
                "floor_s": floor,
                "vs_floor": r["step_s"] / floor,
                "edge_s": r["edge_busy_s"],
                "cloud_s": r["cloud_s"],
                "wire_s": wire_bytes / rate_bps,
                "rtt_ms": r["rtt_s"] * 1e3,
                "msg_bytes_per_step": r["msg_bytes_per_step"],
                "if_bytes_per_step": wire_bytes,
                "if_over_msg": wire_bytes / r["msg_bytes_per_step"],
                "vs_local": r["step_s"] / local if local else None,
            }
        )
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", nargs="+", type=float, default=[1000, 100, 10], help="Mbit/s")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["local", "sl", "sft"],
        help="local, or MODE[:SPLIT_LAYER] (default: the last layer)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    add_workload_args(p)
    p.add_argument("--edge", help=argparse.SUPPRESS)  # the edge half, in its namespace: arguments as JSON
    args = p.parse_args(argv)
    if answer_child(args.edge, edge):
        return 0
    metrics = ["--metrics-port", str(METRICS_PORT)]
    with namespaces():
        with daemon(metrics, host=CLOUD_IP, prefix=EXEC_CLOUD) as (_, port):
            rows = run_child("bench.link", "--edge", {**vars(args), "cloud": f"{CLOUD_IP}:{port}"}, EXEC_EDGE)
    order = {c: i for i, c in enumerate(args.configs)}
    rows.sort(key=lambda r: order[r["config"]])  # stable: rates in the order run
    link_rows = link_table(rows)
    columns = "mode rate_mbit step_s floor_s vs_floor edge_s cloud_s wire_s rtt_ms"
    print(table(link_rows, columns + " msg_bytes_per_step if_bytes_per_step if_over_msg vs_local"))
    payload = {"rows": link_rows, "raw": rows, "args": vars(args)}
    print(f"wrote {save(args.name or 'link', payload, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
