"""The daemon's memory per added session: the two-part split and the U, full fine-tuning and LoRA, and forward-only.

For each kind, a fresh ``sft-cloud serve --insecure`` process; sessions are opened one after
another (each open, one training step so that AdamW's state exists, then the stream dropped: the
daemon keeps the session for the edge to re-attach), and the daemon's resident set (VmRSS, read
from /proc as issue 33's numbers were) is read after each. Usage:
python -m bench.session_memory --model random:smollm2 --sessions 3 [--split-layer 0] [--kinds u-lora]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from bench.common import add_output_args, daemon, proc_status, save, table
from bench.harness import random_step, session_config
from sft_common.models.base_model import BaseModel, load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.wire import codec
from sft_edge.link.transport import GrpcTransport, open_channel

KINDS = ("two-part-full", "two-part-lora", "u-full", "u-lora", "forward-only")
RANK, TOKENS = 8, [16, 16]  # the cut's width; a step of two 16-token rows


def open_request(base: BaseModel, kind: str, layer: int) -> pb.OpenSession:
    """A new session of ``kind`` at ``layer`` (rank 8; the U with one tail layer), as an edge opens it."""
    forward = kind == "forward-only"  # the U's middle frozen at full width, evaluations only
    u, lora = kind.startswith("u-") or forward, kind.endswith("-lora")
    config = session_config(base, layer, lr=2e-5, total_steps=100_000, seed=42, task="session-memory")
    config.label_private, config.tail_layers, config.num_labels = u, int(u), 0 if u else 2
    config.forward_only = forward
    config.mode = pb.SL if forward else pb.SFT
    adapters = None
    if lora:
        config.lora_rank, config.lora_alpha = 8, 16.0
        adapters = LoraSpec(8, 16.0).resolved(base.config.model_type).as_dict()
    spec = SplitSpec(split_layer=layer, rank=RANK, mode="sl" if forward else "sft")
    fingerprint = session_fingerprint(base.fingerprint, spec, config.num_labels, adapters, 1 if u else None)
    return pb.OpenSession(config=config, fingerprint=fingerprint)


def one_step(t: GrpcTransport, u: bool, width: int = RANK) -> None:
    """Step 0 with random activations: the two-part ``train``, or the U's two phases; a
    forward-only session (``width`` the hidden size) one evaluation."""
    if width != RANK:
        acts = codec.encode(torch.randn(sum(TOKENS), width))
        assert t.call(pb.EdgeMessage(eval=pb.EvalStep(activations=acts, lengths=TOKENS))).HasField("eval")
        return
    if not u:
        assert t.call(pb.EdgeMessage(train=random_step(0, TOKENS))).train.step == 0
        return
    acts = codec.encode(torch.randn(sum(TOKENS), RANK))
    up = pb.ForwardUp(step=0, activations=acts, lengths=TOKENS)
    down = t.call(pb.EdgeMessage(forward_up=up)).forward_down
    grad = codec.encode(torch.randn(tuple(codec.decode(down.activations, name="â2").shape)))
    assert t.call(pb.EdgeMessage(gradient_up=pb.GradientUp(step=0, grad=grad))).gradient_down.step == 0


def measure(base: BaseModel, kind: str, layer: int, sessions: int) -> Dict:
    """One daemon: its VmRSS (KiB) at start and after each session opened and stepped."""
    with daemon(["--device", "cpu", "--max-sessions", str(sessions)]) as (proc, port):
        rss = [proc_status(proc.pid)["VmRSS"]]
        seconds = []
        for _ in range(sessions):
            t0 = time.perf_counter()
            t = GrpcTransport(open_channel(f"127.0.0.1:{port}"), owns_channel=True, timeout=600)
            t.call(pb.EdgeMessage(open=open_request(base, kind, layer)))
            one_step(t, kind.startswith("u-"), base.hidden_size if kind == "forward-only" else RANK)
            t.close()  # dropped, not closed: the daemon holds the session
            seconds.append(round(time.perf_counter() - t0, 1))
            time.sleep(1.0)  # the stream's end handled
            rss.append(proc_status(proc.pid)["VmRSS"])
    per = [(b - a) / 1024 for a, b in zip(rss, rss[1:])]
    return {
        "kind": kind,
        "first (MiB, base model loaded)": round(per[0], 1),
        "each later (MiB)": ", ".join(f"{x:.1f}" for x in per[1:]),
        "most added (MiB)": round(max(per[1:], default=0.0), 1),
        "open + step (s)": ", ".join(str(s) for s in seconds),
        "rss_kib": rss,
    }


def run(args: argparse.Namespace) -> Dict:
    base = load_base_model(args.model)
    layer = args.split_layer
    rows = [measure(base, kind, layer, args.sessions) for kind in args.kinds]
    return {"model": args.model, "split_layer": layer, "rank": RANK, "sessions": args.sessions, "rows": rows}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:smollm2")
    p.add_argument("--sessions", type=int, default=3, help="opened one after another, per kind")
    p.add_argument("--split-layer", type=int, default=0, help="the (first) cut (the U's default: 0)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    add_output_args(p, "session_memory")
    args = p.parse_args(argv)
    out = run(args)
    rows: List[Dict] = out["rows"]
    print(f"{args.model}, split layer {out['split_layer']}: the daemon's VmRSS added per session")
    print(table(rows, [k for k in rows[0] if k != "rss_kib"]))
    print("wrote", save(args.name, out, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
