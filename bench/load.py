"""A daemon process (`sft-cloud serve`) under many concurrent sessions, or 1,000 re-attachments of one.

    python -m bench.load --sessions 32 --steps 20       # make bench-load: bench/results/load.json
    python -m bench.load --reconnects 1000              # make bench-reconnects: reconnects.json

Load runs every session alone (the reference), then all at once, and checks that each ends with
its solo run's weights, edge and cloud, bit for bit; it records the step latency the edges see
(p50/p99 of a train step's round trip) and the daemon's RSS and threads before, at peak and
after. The edges are threads of this process; dropout draws from the process-wide RNG, so each
edge computes under one lock that it lets go of while it waits for the cloud (``Watched``): 32
threads then draw the masks 32 devices would (the cloud does the same, see SessionCore.rng).
Reconnects re-attaches to one session over and over, clean and abrupt, in the ``WAYS`` of
``Reconnector.once``; every ``--every`` it records the daemon's RSS and threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file (python bench/load.py): the repository root is the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
import torch  # noqa: E402

from bench.common import daemon, median, percentile, proc_status, save  # noqa: E402
from bench.harness import Watched, random_step, session_config  # noqa: E402
from sft_common.models.base_model import BaseModel, load_base_model  # noqa: E402
from sft_common.proto import sft_pb2 as pb  # noqa: E402
from sft_common.proto import sft_pb2_grpc as pb_grpc  # noqa: E402
from sft_common.topology.spec import SplitSpec, session_fingerprint  # noqa: E402
from sft_edge.data.glue import Batch  # noqa: E402
from sft_edge.link.transport import GrpcTransport, open_channel  # noqa: E402
from sft_edge.runs.config import OptimConfig  # noqa: E402
from sft_edge.sessions.two_part import EdgeSession  # noqa: E402

WAYS = ("clean+step", "clean", "abrupt+step", "abrupt+retry")


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
    """One edge session of ``steps`` train steps (tiny SFT split at layer 3, rank 8), then close."""
    if start is not None:
        start.wait()
    stream = GrpcTransport(open_channel(address), timeout=600, owns_channel=True)
    with lock:
        transport = Watched(stream, lock)
        optim = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, total_steps=steps, seed=seed)
        session = EdgeSession(base, SplitSpec(split_layer=3, rank=8), 2, transport, optim, batch, seq)
        for step in range(steps):
            session.train_step(step, batch_for(seed, step, batch, seq))
        cloud_steps = session.close()
        edge = {k: v.detach().clone() for k, v in session.state_dict().items()}
    return {
        "session_id": session.session_id,
        "edge": edge,
        "cloud_steps": cloud_steps,
        "latencies": transport.waits,
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


def mismatches(checkpoint_dir: str, solo: List[Dict], together: List[Dict]) -> List[str]:
    """Sessions whose concurrent run differs (edge or cloud, any bit) from their solo run."""
    from safetensors.torch import load_file

    def same(x: Dict[str, torch.Tensor], y: Dict[str, torch.Tensor]) -> bool:
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    bad = []
    for i, (a, b) in enumerate(zip(solo, together)):
        ca, cb = (
            load_file(os.path.join(checkpoint_dir, r["session_id"], "final.safetensors")) for r in (a, b)
        )
        same_edge, same_cloud = same(a["edge"], b["edge"]), same(ca, cb)
        if not (same_edge and same_cloud and a["cloud_steps"] == b["cloud_steps"]):
            say = {True: "same", False: "DIFFERS"}
            bad.append(f"session {i}: edge {say[same_edge]}, cloud {say[same_cloud]}")
    return bad


class Sampler(threading.Thread):
    """Samples a process's RSS and threads every 0.2 s until ``done``; keeps the peaks."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, proc_status(pid), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            s = proc_status(self.pid)
            self.peak = {k: max(v, s[k]) for k, v in self.peak.items()}


def mb(kib: float) -> float:
    return round(kib / 1024, 1)


def ms(xs: Sequence[float], *qs: int) -> Dict[str, float]:
    """Percentiles in milliseconds; p50 is the median (the mean of the middle two of an even count)."""
    return {f"p{q}": round(1000 * (median(xs) if q == 50 else percentile(xs, q)), 2) for q in qs}


def load(args: argparse.Namespace) -> Dict:
    base = load_base_model("random:tiny")
    seeds = [1000 + i for i in range(args.sessions)]
    lock = threading.Lock()
    out: Dict = {
        "sessions": args.sessions,
        "steps_per_session": args.steps,
        "batch": args.batch,
        "seq": args.seq,
    }
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--device", "cpu", "--checkpoint-dir", tmp, "--max-sessions", str(max(64, args.sessions))]
        with daemon(extra) as (proc, port):
            address = f"127.0.0.1:{port}"
            before = proc_status(proc.pid)
            solo: List[Dict] = []
            if not args.no_solo:
                t0 = time.perf_counter()
                solo = run_many(address, base, seeds, args.steps, lock, concurrent=False)
                out["solo_seconds"] = round(time.perf_counter() - t0, 2)
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
    lat = [x for r in together for x in r["latencies"]]
    solo_lat = [x for r in solo for x in r["latencies"]]
    return {
        **out,
        "all_finished": all(r["cloud_steps"] == args.steps for r in together),
        "weights_equal_solo": (not bad) if solo else None,
        "mismatches": bad,
        "concurrent_seconds": round(wall, 2),
        "steps_per_second": round(len(lat) / wall, 1),
        "latency_ms": {**ms(lat, 50, 99), "max": round(1000 * max(lat), 2)},
        "solo_latency_ms": ms(solo_lat, 50, 99) if solo_lat else None,
        "daemon": {
            "rss_mb_before": mb(before["VmRSS"]),
            "rss_mb_after_solo_runs": mb(after_solo["VmRSS"]),
            "rss_mb_peak": mb(sampler.peak["VmRSS"]),
            "rss_mb_after": mb(after["VmRSS"]),
            "threads_before": before["Threads"],
            "threads_peak": sampler.peak["Threads"],
            "threads_after": after["Threads"],
        },
    }


# -- reconnects ---------------------------------------------------------------------------------


def open_request(base: BaseModel) -> pb.OpenSession:
    """A new tiny SFT session (split layer 3, rank 8) with room for many steps."""
    fields = dict(lr=1e-3, weight_decay=0.01, total_steps=100_000, seed=1, task="reconnects")
    config = session_config(base, 3, **fields)
    fp = session_fingerprint(base.fingerprint, SplitSpec(split_layer=3, rank=8), 2)
    return pb.OpenSession(config=config, fingerprint=fp)


def train_step(step: int) -> pb.EdgeMessage:
    return pb.EdgeMessage(train=random_step(step, [5, 3]))


class Reconnector:
    """Re-attaches to one session, cycling through the four ways; tracks the step it is at."""

    def __init__(self, address: str, base: BaseModel, new_channel_every: int = 1):
        """``new_channel_every``: 1 opens a new connection for every reconnect, as the edge does
        after a broken link; N > 1 reuses one for N reconnects (a gRPC channel takes ~0.2 s to
        close, which is the client's cost, not the daemon's: the fast test uses 10)."""
        self.address = address
        self.new_channel_every = new_channel_every
        self._channel: Optional[grpc.Channel] = None
        self.request = open_request(base)
        t = GrpcTransport(open_channel(address), owns_channel=True)
        self.request.session_id = t.call(pb.EdgeMessage(open=self.request)).opened.session_id
        t.call(train_step(0))
        t.close()
        self.next_step = 1
        self.count = 0

    def _attach(self, resume: int) -> pb.EdgeMessage:
        msg = pb.EdgeMessage(open=self.request)
        msg.open.resume_steps[:] = [resume]
        return msg

    def _channel_now(self) -> grpc.Channel:
        if self._channel is None or self.count % self.new_channel_every == 0:
            if self._channel is not None:
                self._channel.close()
            self._channel = open_channel(self.address)
        return self._channel

    def once(self) -> str:
        way = WAYS[self.count % len(WAYS)]
        n = self.next_step
        channel = self._channel_now()
        if way.startswith("clean"):
            msgs = [self._attach(n)] + ([train_step(n)] if way == "clean+step" else [])
            replies = list(pb_grpc.SplitTrainerStub(channel).Train(iter(msgs)))  # half-close, read all
            assert replies[0].opened.next_step == n and len(replies) == len(msgs), replies
            if way == "clean+step":
                assert replies[1].train.step == n
                self.next_step += 1
        else:
            t = GrpcTransport(channel, timeout=60)
            retry = n - 1 if way == "abrupt+retry" else n  # a retried step: from the cloud's cache
            assert t.call(self._attach(retry)).opened.next_step == retry
            assert t.call(train_step(retry)).train.step == retry
            t.close()  # cancelled mid-stream: no close message, no half-close
            self.next_step = retry + 1
        self.count += 1
        return way

    def close(self) -> int:
        """Close the session for good (and the channel); returns the steps the cloud applied."""
        if self._channel is not None:
            self._channel.close()
        t = GrpcTransport(open_channel(self.address), owns_channel=True)
        t.call(self._attach(self.next_step))
        steps = t.call(pb.EdgeMessage(close=pb.CloseSession())).closed.steps
        t.close()
        return steps


def reconnects(args: argparse.Namespace) -> Dict:
    rows: List[Dict] = []
    with daemon(["--device", "cpu"]) as (proc, port):
        before = proc_status(proc.pid)
        r = Reconnector(f"127.0.0.1:{port}", load_base_model("random:tiny"))
        t0 = time.perf_counter()
        for i in range(args.reconnects + 1):
            if i:
                try:
                    r.once()
                except grpc.RpcError as exc:  # a refusal would be a bug worth seeing whole
                    raise RuntimeError(f"reconnect {i}: {exc.code()}: {exc.details()}") from None
            if i % args.every == 0:
                time.sleep(0.5)  # let the daemon finish tearing down the last stream
                s = proc_status(proc.pid)
                rows.append(
                    {
                        "reconnects": i,
                        "rss_mb": mb(s["VmRSS"]),
                        "threads": s["Threads"],
                        "steps": r.next_step,
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
                print("  ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
        cloud_steps = r.close()
    print(f"cloud applied {cloud_steps} steps")
    return {
        "reconnects": args.reconnects,
        "ways": list(WAYS),
        "cloud_steps": cloud_steps,
        "daemon_before_session": {"rss_mb": mb(before["VmRSS"]), "threads": before["Threads"]},
        "rows": rows,
        "rss_mb_growth_after_first_row": round(rows[-1]["rss_mb"] - rows[1]["rss_mb"], 1)
        if len(rows) > 2
        else None,
        "threads_spread": max(x["threads"] for x in rows) - min(x["threads"] for x in rows),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="train steps per session")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16, help="longest sequence (lengths are drawn in 2..seq)")
    p.add_argument("--no-solo", action="store_true", help="skip the solo runs and the weight check")
    p.add_argument("--reconnects", type=int, help="re-attach this many times instead (no load)")
    p.add_argument("--every", type=int, default=100, help="reconnects: a row every this many")
    p.add_argument("--name", help="results/<name>.json (default load or reconnects)")
    p.add_argument("--out-dir")
    args = p.parse_args(argv)
    result = reconnects(args) if args.reconnects else load(args)
    path = save(args.name or ("reconnects" if args.reconnects else "load"), result, args.out_dir)
    if not args.reconnects:
        print("\n".join(f"{k}: {v}" for k, v in result.items()))
    print(f"written to {path}")
    return 0 if args.reconnects or (result["all_finished"] and not result["mismatches"]) else 1


if __name__ == "__main__":
    sys.exit(main())
