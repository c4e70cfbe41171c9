"""Load: N concurrent edge sessions on one daemon; each must end with its solo run's weights.

    python -m bench.load --sessions 32 --steps 20       # or: make bench-load

Starts `sft-cloud serve` as its own process (so its memory and threads are its own), runs every
session alone first (the reference), then all of them at once, and checks that each session's
final weights, edge and cloud, are bitwise those of its solo run. Prints and writes to
bench/results/load.json: step latency as the edges see it (p50/p99 of the round trip of a train
step: network, queueing behind other sessions and the cloud's compute), and the daemon's RSS and
thread count before, at peak and after.

The edges are threads of this process. Dropout draws from the process-wide RNG, so each edge's
own compute runs under one lock that it releases while it waits for the cloud: 32 threads then
draw exactly the masks that 32 devices would (the cloud does the same, see CloudSession._rng).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from sft_common.spec import SplitSpec  # noqa: E402
from sft_common.models import BaseModel, load_base_model  # noqa: E402
from sft_common.proto import sft_pb2 as pb  # noqa: E402
from sft_edge.backends import OptimConfig, SplitBackend  # noqa: E402
from sft_edge.client import GrpcTransport, Transport, open_channel  # noqa: E402
from sft_edge.data import Batch  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results")


class LockReleasingTransport(Transport):
    """Holds ``lock`` for the edge's compute and lets go of it while waiting for the cloud;
    times each train step's round trip (what the edge sees as step latency)."""

    def __init__(self, inner: Transport, lock: threading.Lock):
        super().__init__()
        self.inner, self.lock = inner, lock
        self.latencies: List[float] = []
        self._start = 0.0

    def submit(self, msg: pb.EdgeMessage) -> None:
        self._start = time.perf_counter()
        self.inner.submit(msg)

    def result(self) -> pb.CloudMessage:
        self.lock.release()
        try:
            reply = self.inner.result()
            if reply.WhichOneof("kind") == "train":
                self.latencies.append(time.perf_counter() - self._start)
            return reply
        finally:
            self.lock.acquire()

    def close(self) -> None:
        self.inner.close()


def batch_for(seed: int, step: int, batch: int, seq: int) -> Batch:
    """Session ``seed``'s batch at ``step``: right-padded random ids, lengths 2..seq, 2 labels."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g).tolist()
    ids = torch.randint(1000, 5000, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = torch.randint(0, 2, (batch,), generator=g)
    return Batch(ids * mask, torch.zeros_like(ids), mask, lengths, labels)


def run_edge(
    address: str,
    base: BaseModel,
    seed: int,
    steps: int,
    lock: threading.Lock,
    batch: int = 8,
    seq: int = 16,
    start: Optional[threading.Barrier] = None,
) -> Dict:
    """One edge session of ``steps`` train steps (tiny SFT split at layer 3, rank 8), then close.

    Returns session_id, the edge's final weights, the cloud's step count and the latencies."""
    if start is not None:
        start.wait()
    stream = GrpcTransport(open_channel(address), timeout=600, owns_channel=True)
    with lock:
        transport = LockReleasingTransport(stream, lock)
        optim = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, total_steps=steps, seed=seed)
        backend = SplitBackend(base, SplitSpec(split_layer=3, rank=8), 2, transport, optim, batch, seq)
        for step in range(steps):
            backend.train_step(step, batch_for(seed, step, batch, seq))
        cloud_steps = backend.close()
        edge = {k: v.detach().clone() for k, v in backend.state_dict().items()}
    return {
        "session_id": backend.session.session_id,
        "edge": edge,
        "cloud_steps": cloud_steps,
        "latencies": transport.latencies,
    }


def run_many(
    address: str, base: BaseModel, seeds: Sequence[int], steps: int, lock: threading.Lock, concurrent: bool
) -> List[Dict]:
    """Every seed's session, all at once (released together by a barrier) or one after another."""
    if not concurrent:
        return [run_edge(address, base, s, steps, lock) for s in seeds]
    barrier = threading.Barrier(len(seeds))
    with ThreadPoolExecutor(max_workers=len(seeds), thread_name_prefix="edge") as pool:
        futures = [pool.submit(run_edge, address, base, s, steps, lock, start=barrier) for s in seeds]
        return [f.result() for f in futures]


def cloud_weights(checkpoint_dir: str, session_id: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(checkpoint_dir, session_id, "final.safetensors"))


def mismatches(checkpoint_dir: str, solo: List[Dict], together: List[Dict]) -> List[str]:
    """Sessions whose concurrent run differs (edge or cloud, any bit) from their solo run."""
    bad = []
    for i, (a, b) in enumerate(zip(solo, together)):
        ca, cb = (
            cloud_weights(checkpoint_dir, a["session_id"]),
            cloud_weights(checkpoint_dir, b["session_id"]),
        )
        same_edge = a["edge"].keys() == b["edge"].keys() and all(
            torch.equal(a["edge"][k], b["edge"][k]) for k in a["edge"]
        )
        same_cloud = ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
        if not (same_edge and same_cloud and a["cloud_steps"] == b["cloud_steps"]):
            bad.append(
                f"session {i}: edge {'same' if same_edge else 'DIFFERS'}, cloud {'same' if same_cloud else 'DIFFERS'}"
            )
    return bad


# -- the daemon as a process --------------------------------------------------------------------


def proc_status(pid: int) -> Dict[str, int]:
    """RSS (bytes) and thread count of a process, from /proc (Linux)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


def start_daemon(extra: Sequence[str], log_path: str, timeout: float = 180.0) -> Tuple[subprocess.Popen, int]:
    """`sft-cloud serve --insecure` on a free port, logging to ``log_path``: (process, port)."""
    cmd = [sys.executable, "-m", "sft_cloud.cli", "serve", "--insecure", "--host", "127.0.0.1", "--port", "0"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd + list(extra), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        with open(log_path) as f:
            m = re.search(r"listening on [\d.]+:(\d+)", f.read())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.1)
    proc.kill()
    with open(log_path) as f:
        raise RuntimeError("sft-cloud did not start:\n" + f.read())


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Sampler(threading.Thread):
    """Samples a process's RSS and threads every ``period`` seconds; keeps the peaks."""

    def __init__(self, pid: int, period: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak = {"rss": 0, "threads": 0}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            s = proc_status(self.pid)
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            self.done.wait(self.period)


def percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def machine() -> Dict:
    model = platform.processor() or "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="train steps per session")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16, help="longest sequence (lengths are drawn in 2..seq)")
    p.add_argument("--no-solo", action="store_true", help="skip the solo runs and the weight check")
    p.add_argument("--out", default=os.path.join(RESULTS, "load.json"))
    args = p.parse_args(argv)

    info: Dict[str, Any] = {
        "command": " ".join(["python", "-m", "bench.load", *(argv or sys.argv[1:])]),
        "machine": machine(),
    }
    base = load_base_model("random:tiny")
    seeds = [1000 + i for i in range(args.sessions)]
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--device", "cpu", "--checkpoint-dir", tmp, "--max-sessions", str(max(64, args.sessions))]
        proc, port = start_daemon(extra, os.path.join(tmp, "daemon.log"))
        address = f"127.0.0.1:{port}"
        try:
            before = proc_status(proc.pid)
            solo: List[Dict] = []
            if not args.no_solo:
                t0 = time.perf_counter()
                solo = run_many(address, base, seeds, args.steps, lock, concurrent=False)
                info["solo_seconds"] = round(time.perf_counter() - t0, 2)
            after_solo = proc_status(proc.pid)
            sampler = Sampler(proc.pid)
            sampler.start()
            t0 = time.perf_counter()
            together = run_many(address, base, seeds, args.steps, lock, concurrent=True)
            wall = time.perf_counter() - t0
            sampler.done.set()
            sampler.join()
            time.sleep(1.0)  # let the daemon finish closing streams
            after = proc_status(proc.pid)
            bad = mismatches(tmp, solo, together) if solo else []
        finally:
            stop_daemon(proc)
    lat = [x for r in together for x in r["latencies"]]
    solo_lat = [x for r in solo for x in r["latencies"]]
    result = {
        **info,
        "sessions": args.sessions,
        "steps_per_session": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "all_finished": all(r["cloud_steps"] == args.steps for r in together),
        "weights_equal_solo": (not bad) if solo else None,
        "mismatches": bad,
        "concurrent_seconds": round(wall, 2),
        "steps_per_second": round(len(lat) / wall, 1),
        "latency_ms": {
            "p50": round(1000 * statistics.median(lat), 2),
            "p99": round(1000 * percentile(lat, 99), 2),
            "max": round(1000 * max(lat), 2),
        },
        "solo_latency_ms": {
            "p50": round(1000 * statistics.median(solo_lat), 2),
            "p99": round(1000 * percentile(solo_lat, 99), 2),
        }
        if solo_lat
        else None,
        "daemon": {
            "rss_mb_before": round(before["rss"] / 2**20, 1),
            "rss_mb_after_solo_runs": round(after_solo["rss"] / 2**20, 1),
            "rss_mb_peak": round(sampler.peak["rss"] / 2**20, 1),
            "rss_mb_after": round(after["rss"] / 2**20, 1),
            "threads_before": before["threads"],
            "threads_peak": sampler.peak["threads"],
            "threads_after": after["threads"],
        },
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2))
    print(f"written to {args.out}")
    return 0 if result["all_finished"] and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
