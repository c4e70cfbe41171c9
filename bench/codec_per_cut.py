"""Which of the U's two cuts needs the bits: each wire at one cut at a time, dev perplexity at step 0.

The U's three parts of the model (first cut at ``--split-layer``, one tail layer, full width) in
one process, on the first ``--dev-rows`` rows of the paraphrase set; the activations of one cut go
through a wire's codec (encoded and decoded), the other cut's stay exact, or both go through
codecs. Rotated groups of other widths than the product's (5 bits), and 3 bits with 8 levels
(``int3-midrise``), are simulated with ``wire.hadamard``'s rotation and fp16 group scales (no
packing). Issue 34's choice of 4 bits up, 6 down comes from this. Usage: python -m bench.codec_per_cut [--dev-rows 32]
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Dict, List, Optional

import torch

from bench.common import add_output_args, save, table
from bench.decoder_codecs import paraphrases
from sft_common.models.base_model import load_base_model
from sft_common.topology.ushape import UShapeSpec
from sft_common.topology.ushape_lm import build_ushape_lm_model
from sft_common.wire import codec, hadamard
from sft_edge.data.lm import collate_lm, encode_lm, lm_loss_sum, read_lm_rows


def simulated(x: torch.Tensor, rounded: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``x`` (rows, n) through rotated groups (of 64 where n allows) and massive rows in bf16, each
    group (..., group) of rotated values replaced by ``rounded`` of it."""
    rows, n = x.shape
    out, keep = x.clone(), torch.ones(rows, dtype=torch.bool)
    outliers = hadamard.outlier_rows(x)
    keep[outliers] = False
    out[outliers] = x[outliers].bfloat16().float()
    group = hadamard.group_for(n)
    blocks = hadamard.rotate(x[keep], group).reshape(-1, n // group, group)
    out[keep] = hadamard.unrotate(rounded(blocks).reshape(-1, n), group)
    return out


def symmetric(top: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Codes -top..top, the step the group's largest value / top (the product's rotated groups)."""

    def rounded(blocks: torch.Tensor) -> torch.Tensor:
        scale = (blocks.abs().amax(2, keepdim=True) / top).half().float()
        codes = torch.where(scale > 0, (blocks / scale).round().clamp(-top, top), torch.zeros_like(blocks))
        return codes * scale

    return rounded


def midrise(clip: float = 0.9) -> Callable[[torch.Tensor], torch.Tensor]:
    """3 bits with all 8 levels (+-0.5 .. +-3.5 steps, no zero), the step ``clip`` times the group's
    largest value / 3.5: the values past the clip round to the outer level."""

    def rounded(blocks: torch.Tensor) -> torch.Tensor:
        scale = (clip * blocks.abs().amax(2, keepdim=True) / 3.5).half().float()
        codes = torch.where(
            scale > 0, (blocks / scale - 0.5).round().clamp(-4, 3) + 0.5, torch.zeros_like(blocks)
        )
        return codes * scale

    return rounded


SIMULATED = {"int5-groups": symmetric(15), "int3-midrise": midrise()}


def through(name: Optional[str], rows: torch.Tensor) -> torch.Tensor:
    """``rows`` as the receiver decodes them: a codec dtype by name (``codec.WIRE_DTYPES``), or
    "int5-groups" / "int3-midrise", simulated."""
    if name is None:
        return rows
    if name in SIMULATED:
        return simulated(rows, SIMULATED[name])
    dtype = codec.WIRE_DTYPES[name]
    return codec.decode(codec.encode(rows, dtype), name="cut", dtype=dtype, max_bytes=1 << 34)


def perplexity(parts, batches, first: Optional[str], second: Optional[str]) -> float:
    head, middle, tail = parts
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            mask = batch.attention_mask.bool()
            cut, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            cut[mask] = through(first, cut[mask])
            out, _ = middle(cut, batch.attention_mask)
            out[mask] = through(second, out[mask])
            summed, n = lm_loss_sum(tail(out, batch.attention_mask), batch.labels)
            total, count = total + float(summed), count + n
    return math.exp(total / count)


SETTINGS = [  # (first cut, second cut)
    ("int4-hadamard", "int4-hadamard"),
    ("int4-hadamard", None),
    (None, "int4-hadamard"),
    ("int8", "int8"),
    ("int4-hadamard", "int8"),
    ("int4-hadamard", "int5-groups"),
    ("int4-hadamard", "int6-hadamard"),
    ("int4-hadamard", "int8-hadamard"),
]


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="/tmp/smolmrpc", help="the paraphrase set (made here if missing)")
    p.add_argument("--dev-rows", type=int, default=32)
    p.add_argument("--split-layer", type=int, default=0)
    p.add_argument(
        "--tail-layers", type=int, default=1, help="the second cut's place: this many layers before the end"
    )
    p.add_argument(
        "--pairs",
        nargs="+",
        metavar="FIRST:SECOND",
        help="these (first cut, second cut) wires instead of SETTINGS ('exact' for none), e.g. int3-hadamard:exact",
    )
    add_output_args(p, "codec_per_cut")
    args = p.parse_args(argv)
    paraphrases(args.data)
    from transformers import AutoTokenizer

    base = load_base_model(args.model)
    path = os.path.join(args.data, "dev.jsonl")
    dev = encode_lm(
        read_lm_rows(path)[: args.dev_rows], AutoTokenizer.from_pretrained(base.tokenizer_dir), 96, path
    )
    batches = [collate_lm(dev, range(k, min(k + 8, len(dev)))) for k in range(0, len(dev), 8)]
    spec = UShapeSpec(split_layer=args.split_layer, tail_layers=args.tail_layers, mode="sl")
    parts = tuple(part.eval() for part in build_ushape_lm_model(base, spec, 42))
    exact = perplexity(parts, batches, None, None)
    rows = [{"first cut": "exact", "second cut": "exact", "dev perplexity": exact, "vs exact": "0.00%"}]
    pairs = [tuple(None if w == "exact" else w for w in pair.split(":")) for pair in args.pairs or []]
    for first, second in pairs or SETTINGS:
        ppl = perplexity(parts, batches, first, second)
        change = f"{100 * (ppl / exact - 1):+.2f}%"
        rows.append(
            {
                "first cut": first or "exact",
                "second cut": second or "exact",
                "dev perplexity": ppl,
                "vs exact": change,
            }
        )
        print(table(rows[-1:], list(rows[0])), flush=True)
    print(table(rows, list(rows[0])))
    result = {"model": args.model, "dev_rows": len(dev), "tail_layers": args.tail_layers, "rows": rows}
    print("wrote", save(args.name, result, args.out_dir))
    return rows


if __name__ == "__main__":
    main()
