"""A two-host link on one machine: two network namespaces joined by a veth pair, shaped by tc.

The cloud lives in ``sftb-cloud`` (192.0.2.1), the edge in ``sftb-edge`` (192.0.2.2): addresses
from TEST-NET-1 (RFC 5737), which routes nowhere. ``tbf`` shapes each end's egress, so both
directions run at the rate. Needs root. ``link`` makes both namespaces for the duration of a
block and deletes them (and with them the veth pair) on exit, on error and on SIGTERM / SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import statistics
import subprocess
import time
from typing import Dict, Iterator, List

CLOUD_NS, EDGE_NS = "sftb-cloud", "sftb-edge"
CLOUD_IF, EDGE_IF = "sftb-c", "sftb-e"
CLOUD_IP, EDGE_IP = "192.0.2.1", "192.0.2.2"
EXEC_CLOUD, EXEC_EDGE = ["ip", "netns", "exec", CLOUD_NS], ["ip", "netns", "exec", EDGE_NS]


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True)


def teardown() -> None:
    for ns in (CLOUD_NS, EDGE_NS):
        sh("ip", "netns", "del", ns, check=False)


def setup() -> None:
    teardown()
    sh("ip", "netns", "add", CLOUD_NS)
    sh("ip", "netns", "add", EDGE_NS)
    sh(*f"ip link add {CLOUD_IF} netns {CLOUD_NS} type veth peer name {EDGE_IF} netns {EDGE_NS}".split())
    for ns, ifname, ip in ((CLOUD_NS, CLOUD_IF, CLOUD_IP), (EDGE_NS, EDGE_IF, EDGE_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")


def shape(rate_mbit: float, delay_ms: float = 0.0) -> Dict[str, str]:
    """Rate-limit both directions with tbf (and add netem delay where the kernel has netem)."""
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
        if delay_ms:
            netem = sh(*tc, "add", "dev", ifname, "root", "handle", "1:", "netem", "delay", f"{delay_ms / 2}ms",
                       check=False)  # fmt: skip
            if netem.returncode != 0:
                raise RuntimeError(f"netem is not available in this kernel: {netem.stderr.strip()}")
            sh(*tc, "add", "dev", ifname, "parent", "1:", "handle", "2:", *tbf)
        else:
            sh(*tc, "add", "dev", ifname, "root", *tbf)
        applied[ifname] = sh(*tc, "show", "dev", ifname).stdout.strip()
    return applied


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (tried on the edge's veth, then removed)."""
    tc = [*EXEC_EDGE, "tc", "qdisc"]
    out = sh(*tc, "add", "dev", EDGE_IF, "root", "netem", "delay", "1ms", check=False)
    sh(*tc, "del", "dev", EDGE_IF, "root", check=False)
    return out.returncode == 0


def counters(ifname: str = EDGE_IF) -> Dict[str, int]:
    """tx/rx bytes and packets of an interface in this process's namespace (all headers included)."""
    out = {}
    for key in ("tx_bytes", "rx_bytes", "tx_packets", "rx_packets"):
        with open(f"/sys/class/net/{ifname}/statistics/{key}") as f:
            out[key] = int(f.read())
    return out


def tcp_rtt(host: str, port: int, n: int = 15) -> float:
    """Median TCP connect time (SYN -> SYN/ACK): one round trip, in seconds."""
    times: List[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=10):
            times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


@contextlib.contextmanager
def link() -> Iterator[None]:
    """The two namespaces for the duration of the block; deleted however the block ends."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum, frame):  # turn SIGTERM into an exception so `finally` runs
        raise KeyboardInterrupt(f"signal {signum}")

    for s in previous:
        signal.signal(s, on_signal)
    try:
        setup()
        yield
    finally:
        teardown()
        for s, h in previous.items():
            signal.signal(s, h)
