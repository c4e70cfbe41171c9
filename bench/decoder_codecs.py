"""Step 0 of a decoder's U through each wire: the seconds-long first filter for a cut and codec (issue 34).

A codec is worth a training run only if the split model, before any training, predicts the dev
set as the unsplit model does (dev perplexity within 1 %). For each (cut, wire) this builds the
U's three parts in one process (``build_ushape_lm_model``: the real cuts), sends what crosses
each cut through the real codec (``Wire``: encode, serialise, decode) and measures:

- the dev perplexity at step 0 (``evaluate_lm``, as ``sft-edge train`` reports step 0), against
  the unsplit model's (``build_causal_lm``);
- bytes a token each way, from the serialised messages (activations, then gradients);
- on ``--grad-batches`` training batches, how well the gradient sent up at the second cut survives
  its codec: relative error and cosine against the exact gradient, and the relative error of the
  mean over 16 re-encodings of slightly different copies (a biased rounding keeps its error; an
  unbiased one averages it away, as steps do).

python -m bench.decoder_codecs --model smollm2-135m-instruct --data DIR  (DIR: the paraphrase set,
made there if missing from ../shared/data/glue/MRPC). Ablations of int4-hadamard (no rotation, no
outlier rows) patch ``wire.hadamard`` on both sides at once, here in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from bench.common import add_output_args, save, table
from sft_common.models.base_model import load_base_model
from sft_common.topology.ushape import UShapeSpec
from sft_common.topology.ushape_lm import build_causal_lm, build_ushape_lm_model
from sft_common.wire import codec, hadamard
from sft_common.wire.codecs import Wire
from sft_edge.data.lm import collate_lm, encode_lm, lm_loss, read_lm_rows
from sft_edge.privacy.defence import Gaussian
from sft_edge.runs.problems import evaluate_lm
from sft_edge.runs.start_check import UnsplitLM

GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
# (label, cut mode, rank, wire, ablation)
CONFIGS = [
    ("U, full width, fp32", "sl", 0, "fp32", None),
    ("U, full width, fp16", "sl", 0, "fp16", None),
    ("U, full width, int8", "sl", 0, "int8", None),
    ("U, full width, int4 (a scale a token)", "sl", 0, "int4", None),
    ("U, full width, int4-hadamard", "sl", 0, "int4-hadamard", None),
    ("U, full width, int6-hadamard", "sl", 0, "int6-hadamard", None),
    ("U, full width, int4-6-hadamard (the default)", "sl", 0, "int4-6-hadamard", None),
    ("U, full width, int4-hadamard without rotation", "sl", 0, "int4-hadamard", "no-rotation"),
    ("U, full width, int4-hadamard without outlier rows", "sl", 0, "int4-hadamard", "no-outliers"),
    ("U, FFN-output R=8 (the default before), fp32", "sft", 8, "fp32", None),
]
COLUMNS = ["setting", "wire", "dev perplexity", "vs unsplit", "bytes a token, activations", "seconds"]
GRAD_CODECS = {
    "fp16": (codec.pb.FLOAT16, False),
    "int8 nearest": (codec.pb.INT8, False),
    "int8 stochastic": (codec.pb.INT8, True),
    "int4 stochastic (a scale a token)": (codec.pb.INT4, True),
    "int4-hadamard": (codec.pb.INT4_HADAMARD, False),
    "int6-hadamard stochastic (-grad6)": (codec.pb.INT6_HADAMARD, True),
    "int4-hadamard stochastic (-grad4)": (codec.pb.INT4_HADAMARD, True),
}


def paraphrases(out_dir: str, dev_rows: int = 200, glue_dir: str = GLUE) -> None:
    """MRPC's paraphrase pairs as {"prompt": "Paraphrase: <s1>\\n", "completion": "<s2>"} rows
    (train.jsonl, dev.jsonl: the first ``dev_rows`` of dev.tsv), as docs/accuracy.md's runs use;
    kept if ``out_dir`` holds them already."""
    if os.path.exists(os.path.join(out_dir, "dev.jsonl")):
        return
    os.makedirs(out_dir, exist_ok=True)
    for split, limit in (("train", None), ("dev", dev_rows)):
        with open(os.path.join(glue_dir, "MRPC", f"{split}.tsv"), encoding="utf-8-sig") as f:
            rows = [
                r for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r["Quality"] == "1"
            ]
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as out:
            for r in rows[:limit]:
                out.write(
                    json.dumps({"prompt": f"Paraphrase: {r['#1 String']}\n", "completion": r["#2 String"]})
                    + "\n"
                )


@contextlib.contextmanager
def ablation(name: Optional[str]) -> Iterator[None]:
    """int4-hadamard without its rotation or without its outlier rows, on both sides (one process)."""
    saved = hadamard.rotate, hadamard.unrotate, hadamard.OUTLIER_FACTOR
    if name == "no-rotation":
        hadamard.rotate = hadamard.unrotate = lambda x, group: x  # type: ignore[assignment]
    elif name == "no-outliers":
        hadamard.OUTLIER_FACTOR = math.inf
    try:
        yield
    finally:
        hadamard.rotate, hadamard.unrotate, hadamard.OUTLIER_FACTOR = saved


class CodecU:
    """The U's parts in one process with each cut's activations through ``wire`` (a session's
    ``predict``, for ``evaluate_lm``); counts the bytes and tokens that crossed. ``defence``
    (``sft_edge.privacy.defence``): the first cut's rows clipped and noised before its codec, as
    ``--dp-noise`` does, the noise seeded by the batch's index."""

    def __init__(self, parts, wire: Wire, defence: Optional[Gaussian] = None):
        self.head, self.middle, self.tail = parts
        self.wire = wire
        self.defence = defence
        self.bytes = self.tokens = 0

    def cross(self, x: torch.Tensor, mask: torch.Tensor, down: bool = False) -> torch.Tensor:
        """``x``'s real rows as the receiver decodes them (``down``: the U's second cut's codec)."""
        rows = x[mask]
        msg = self.wire.encode_activations(rows, down=down)
        self.bytes += len(msg.SerializeToString())
        self.tokens += rows.shape[0]
        out = x.new_zeros(x.shape)
        out[mask] = self.wire.decode_activations(msg, "cut", tuple(rows.shape), down=down, max_bytes=1 << 34)
        return out

    @torch.no_grad()
    def predict(self, batch, index: int = 0) -> torch.Tensor:
        mask = batch.attention_mask.bool()
        first, _ = self.head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        if self.defence is not None:
            rows = self.defence.apply(first[mask], mask.sum(1).tolist(), torch.Generator().manual_seed(index))
            first = first.new_zeros(first.shape).index_put((mask,), rows)
        second, _ = self.middle(self.cross(first, mask), batch.attention_mask)
        return self.tail(self.cross(second, mask, down=True), batch.attention_mask)


def gradient_fidelity(parts, batches) -> List[Dict]:
    """The exact gradient at the second cut of each batch against each codec's decoding of it."""
    head, middle, tail = parts
    grads = []
    for batch in batches:
        mask = batch.attention_mask.bool()
        with torch.no_grad():
            second, _ = middle(
                head(batch.input_ids, batch.attention_mask, batch.token_type_ids)[0], batch.attention_mask
            )
        second.requires_grad_(True)
        lm_loss(tail(second, batch.attention_mask), batch.labels).backward()
        grads.append(second.grad[mask])
    rows = []
    for name, (dtype, stochastic) in GRAD_CODECS.items():
        err, cos, mean_err, nbytes, zbytes, tokens = [], [], [], 0, 0, 0
        for g in grads:
            msg = codec.encode(g, dtype, stochastic=stochastic, whole_rows=not stochastic)
            y = codec.decode(msg, name="g")
            nbytes, tokens = nbytes + len(msg.SerializeToString()), tokens + g.shape[0]
            zipped = codec.encode(g, dtype, codec.pb.ZSTD, stochastic=stochastic, whole_rows=not stochastic)
            zbytes += len(zipped.SerializeToString())
            err.append(float((y - g).norm() / g.norm()))
            cos.append(float(torch.nn.functional.cosine_similarity(y.flatten(), g.flatten(), dim=0)))
            copies = [
                codec.decode(
                    codec.encode(g * (1 + k * 1e-6), dtype, stochastic=stochastic, whole_rows=not stochastic),
                    name="g",
                )
                for k in range(16)
            ]
            mean_err.append(float((torch.stack(copies).mean(0) - g).norm() / g.norm()))
        rows.append(
            {
                "gradient codec": name,
                "relative error": sum(err) / len(err),
                "cosine": sum(cos) / len(cos),
                "error of a 16-mean": sum(mean_err) / len(mean_err),
                "bytes a token": nbytes / tokens,
                "with zstd": zbytes / tokens,
            }
        )
    return rows


def compression_table(parts, batches) -> List[Dict]:
    """Bytes a token of each wire's activations at the first cut under each compression, and the
    encode + decode time a token, on ``batches``."""
    head = parts[0]
    with torch.no_grad():
        cuts = [
            head(b.input_ids, b.attention_mask, b.token_type_ids)[0][b.attention_mask.bool()] for b in batches
        ]
    tokens = sum(c.shape[0] for c in cuts)
    rows = []
    for wire_name in ("fp32", "fp16", "int8", "int4-hadamard"):
        for compression in ("none", "lz4", "zstd"):
            wire = Wire.named(wire_name, compression)
            t0, nbytes = time.perf_counter(), 0
            for c in cuts:
                msg = wire.encode_activations(c)
                nbytes += len(msg.SerializeToString())
                wire.decode_activations(msg, "cut", tuple(c.shape), max_bytes=1 << 34)
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "wire": wire_name,
                    "compression": compression,
                    "bytes a token": nbytes / tokens,
                    "encode+decode us a token": 1e6 * seconds / tokens,
                }
            )
    return rows


def step0_rows(args, base, dev) -> Tuple[List[Dict], Dict[tuple, tuple]]:
    """The unsplit model's dev perplexity, then each of ``CONFIGS``' (the parts built, by cut)."""
    t0 = time.perf_counter()
    unsplit = evaluate_lm(UnsplitLM(build_causal_lm(base, 42).eval()), dev, args.batch_size, "cpu")
    rows = [
        {
            "setting": "unsplit model",
            "dev perplexity": unsplit["perplexity"],
            "vs unsplit": "0.0%",
            "seconds": time.perf_counter() - t0,
        }
    ]
    built: Dict[tuple, tuple] = {}
    for label, mode, rank, wire_name, abl in CONFIGS:
        if args.only and label not in args.only:
            continue
        spec = UShapeSpec(
            split_layer=args.split_layer, rank=rank or 8, tail_layers=args.tail_layers, mode=mode
        )
        if (mode, rank) not in built:
            built[(mode, rank)] = tuple(part.eval() for part in build_ushape_lm_model(base, spec, 42))
        t0 = time.perf_counter()
        u = CodecU(built[(mode, rank)], Wire.named(wire_name))
        with ablation(abl):
            ppl = evaluate_lm(u, dev, args.batch_size, "cpu")["perplexity"]
        rows.append(
            {
                "setting": label,
                "wire": wire_name,
                "dev perplexity": ppl,
                "vs unsplit": f"{100 * (ppl / unsplit['perplexity'] - 1):+.1f}%",
                "bytes a token, activations": u.bytes / u.tokens,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(table(rows[-1:], COLUMNS), flush=True)
    return rows, built


def main(argv: Optional[List[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="/tmp/smolmrpc", help="the paraphrase set (made here if missing)")
    p.add_argument("--dev-rows", type=int, default=200)
    p.add_argument("--max-seq-len", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--split-layer", type=int, default=0)
    p.add_argument("--tail-layers", type=int, default=1)
    p.add_argument("--grad-batches", type=int, default=4)
    p.add_argument("--only", nargs="*", help="the labels of CONFIGS to run (default: all)")
    p.add_argument("--no-step0", action="store_true", help="bytes and gradients only (no dev perplexity)")
    add_output_args(p, "decoder_codecs")
    args = p.parse_args(argv)
    paraphrases(args.data)
    from transformers import AutoTokenizer

    base = load_base_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    dev_path, train_path = os.path.join(args.data, "dev.jsonl"), os.path.join(args.data, "train.jsonl")
    dev = encode_lm(read_lm_rows(dev_path)[: args.dev_rows], tokenizer, args.max_seq_len, dev_path)
    train = encode_lm(
        read_lm_rows(train_path)[: 8 * args.grad_batches], tokenizer, args.max_seq_len, train_path
    )
    rows, built = step0_rows(args, base, dev) if not args.no_step0 else ([], {})
    sl = UShapeSpec(split_layer=args.split_layer, tail_layers=args.tail_layers, mode="sl")
    parts = built.get(("sl", 0)) or tuple(part.eval() for part in build_ushape_lm_model(base, sl, 42))
    batches = [collate_lm(train, range(8 * k, 8 * k + 8)) for k in range(args.grad_batches)]
    grad_rows = gradient_fidelity(parts, batches)
    byte_rows = compression_table(parts, batches)
    print(table(rows, COLUMNS))
    print(
        table(
            grad_rows,
            [
                "gradient codec",
                "relative error",
                "cosine",
                "error of a 16-mean",
                "bytes a token",
                "with zstd",
            ],
        )
    )
    print(table(byte_rows, ["wire", "compression", "bytes a token", "encode+decode us a token"]))
    result = {
        "model": args.model,
        "dev_rows": len(dev),
        "split_layer": args.split_layer,
        "tail_layers": args.tail_layers,
        "step0": rows,
        "gradients": grad_rows,
        "compression": byte_rows,
    }
    print("wrote", save(args.name, result, args.out_dir))
    return result


if __name__ == "__main__":
    main()
