"""Encode / decode time of the wire codec, against the copy-heavier code it replaced (9d618d0^).

Sizes: the SFT R=8 cut and the SL cut of one BERT-base step (4096 tokens x 8 / x 768). ``before``
is the previous tensor path, kept here verbatim for the comparison: ``t * scale`` then a cast
then ``.numpy().tobytes()`` on the way out; ``bytearray(data)``, a cast, ``out / scale`` and
``isfinite().all()`` on the way in. Medians of ``--reps`` runs, all variants called round-robin. Usage: python -m bench.codec_speed
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import partial
from typing import Any, Callable, Dict, List

import torch

from bench.common import median, save, table
from sft_common import codec
from sft_common.proto import sft_pb2 as pb


def before_encode(tensor: torch.Tensor, wire_dtype: Any) -> pb.Tensor:
    t = tensor.detach()
    scale = 0.0
    if wire_dtype == pb.FLOAT16 and t.numel():
        amax = float(t.abs().max())
        if amax > 0 and math.isfinite(amax):
            scale = 2.0 ** math.floor(math.log2(codec.FP16_TARGET_AMAX / amax))
            t = t * scale
    t = t.to(device="cpu", dtype=codec.TORCH_DTYPES[wire_dtype]).contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return pb.Tensor(dtype=wire_dtype, shape=list(t.shape), data=data, scale=scale)


def before_decode(msg: pb.Tensor) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(msg.data), dtype=codec.TORCH_DTYPES[msg.dtype]).reshape(list(msg.shape))
    out = raw.to(dtype=torch.float32)
    if msg.scale:
        out = out / msg.scale
    if not bool(torch.isfinite(out).all()):
        raise ValueError("NaN")
    return out


def timed(fns: Dict[str, Callable[[], object]], reps: int) -> Dict[str, float]:
    """Median seconds of each function, called round-robin so that load changes hit all alike."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32 * 128)
    p.add_argument("--widths", nargs="+", type=int, default=[8, 768])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out-dir")
    args = p.parse_args()
    rows: List[Dict] = []
    for width in args.widths:
        x = torch.randn(args.tokens, width)
        for name in ("fp32", "fp16", "bf16", "int8"):
            w = codec.WIRE_DTYPES[name]
            msg = codec.encode(x, w)
            row: Dict = {"width": width, "wire": name, "payload_bytes": len(msg.data)}
            fns: Dict[str, Callable[[], object]] = {
                "encode_ms": partial(codec.encode, x, w),
                "decode_ms": partial(codec.decode, msg, name="x"),
            }
            if name != "int8":
                old = before_encode(x, w)
                fns["before_encode_ms"] = partial(before_encode, x, w)
                fns["before_decode_ms"] = partial(before_decode, old)
            row.update({k: v * 1e3 for k, v in timed(fns, args.reps).items()})
            rows.append(row)
            print(rows[-1], file=sys.stderr, flush=True)
    cols = [
        "width",
        "wire",
        "payload_bytes",
        "before_encode_ms",
        "encode_ms",
        "before_decode_ms",
        "decode_ms",
    ]
    print(table(rows, cols))
    print(f"wrote {save('codec_speed', {'rows': rows, 'args': vars(args)}, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
