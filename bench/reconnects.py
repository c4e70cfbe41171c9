"""Reconnects: the daemon's threads and memory stay flat across 1,000 re-attachments of one session.

    python -m bench.reconnects --reconnects 1000       # or: make bench-reconnects

One session is opened, then re-attached over and over from a new channel, each time in one of
four ways: a clean stream (re-attach, one step, half-close), a clean stream with no step, an
abrupt drop after one step (``GrpcTransport.close()``: the call is cancelled, no close message),
and an abrupt drop after a retried step (re-attach at the previous step, re-send it, get the
cached reply). Every 100 reconnects it prints the daemon's RSS and thread count; results go to
bench/results/reconnects.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import torch  # noqa: E402

from bench.load import RESULTS, machine, proc_status, start_daemon, stop_daemon  # noqa: E402
from sft_common import codec  # noqa: E402
from sft_common.spec import SplitSpec, session_fingerprint  # noqa: E402
from sft_common.models import BaseModel, load_base_model  # noqa: E402
from sft_common.proto import sft_pb2 as pb  # noqa: E402
from sft_common.proto import sft_pb2_grpc as pb_grpc  # noqa: E402
from sft_edge.client import GrpcTransport, open_channel  # noqa: E402

WAYS = ("clean+step", "clean", "abrupt+step", "abrupt+retry")


def open_request(base: BaseModel) -> pb.OpenSession:
    """A new tiny SFT session (split layer 3, rank 8) with room for many steps."""
    config = pb.SessionConfig(
        model=base.name, mode=pb.SFT, split_layer=3, rank=8, num_labels=2, wire_dtype=pb.FLOAT32,
        lr=1e-3, weight_decay=0.01, warmup_steps=0, total_steps=100_000, seed=1, max_batch_size=8,
        max_seq_len=64, task="reconnects",
    )  # fmt: skip
    fp = session_fingerprint(base.fingerprint, SplitSpec(split_layer=3, rank=8), 2)
    return pb.OpenSession(config=config, fingerprint=fp)


def train_step(step: int) -> pb.EdgeMessage:
    acts = codec.encode(torch.randn(8, 8))
    return pb.EdgeMessage(train=pb.TrainStep(step=step, activations=acts, lengths=[5, 3], labels=[0, 1]))


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
            retry = n - 1 if way == "abrupt+retry" else n
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reconnects", type=int, default=1000)
    p.add_argument("--every", type=int, default=100, help="print a row every this many reconnects")
    p.add_argument("--out", default=os.path.join(RESULTS, "reconnects.json"))
    args = p.parse_args(argv)

    info = {
        "command": " ".join(["python", "-m", "bench.reconnects", *(argv or sys.argv[1:])]),
        "machine": machine(),
    }
    base = load_base_model("random:tiny")
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_daemon(["--device", "cpu"], os.path.join(tmp, "daemon.log"))
        try:
            before = proc_status(proc.pid)
            r = Reconnector(f"127.0.0.1:{port}", base)
            t0 = time.perf_counter()

            def row(n: int) -> None:
                time.sleep(0.5)  # let the daemon finish tearing down the last stream
                s = proc_status(proc.pid)
                rows.append(
                    {"reconnects": n, "rss_mb": round(s["rss"] / 2**20, 1), "threads": s["threads"],
                     "steps": r.next_step, "seconds": round(time.perf_counter() - t0, 1)}
                )  # fmt: skip
                print(
                    f"{n:5d} reconnects  rss {rows[-1]['rss_mb']:7.1f} MB  threads {s['threads']:3d}  "
                    f"steps {r.next_step:4d}  {rows[-1]['seconds']:6.1f} s",
                    flush=True,
                )

            row(0)
            for i in range(1, args.reconnects + 1):
                try:
                    r.once()
                except grpc.RpcError as exc:  # a refusal would be a bug worth seeing whole
                    raise RuntimeError(f"reconnect {i}: {exc.code()}: {exc.details()}") from None
                if i % args.every == 0:
                    row(i)
            cloud_steps = r.close()
        finally:
            stop_daemon(proc)
    result = {
        **info,
        "reconnects": args.reconnects,
        "ways": list(WAYS),
        "cloud_steps": cloud_steps,
        "daemon_before_session": {"rss_mb": round(before["rss"] / 2**20, 1), "threads": before["threads"]},
        "rows": rows,
        "rss_mb_growth_after_first_row": round(rows[-1]["rss_mb"] - rows[1]["rss_mb"], 1)
        if len(rows) > 2
        else None,
        "threads_spread": max(x["threads"] for x in rows) - min(x["threads"] for x in rows),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"cloud applied {cloud_steps} steps; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
