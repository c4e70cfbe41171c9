"""What the model still reads through a noised first cut: the split model's dev perplexity at step 0 under ``--dp-noise`` (issue 30).

``--dp-noise S --dp-clip C`` clips each example's first-cut rows to L2 norm C (over its tokens and
width) and adds N(0, (S C)^2) to every value (``sft_edge.privacy.defence.Gaussian``, the defence
of the U and of forward-only). A noise that hides the tokens from an attacker reading the cut
(``bench.inversion --dp-noise``) hides them from the cloud's frozen middle too, which must read
them to be of use. This measures the cheap half, in seconds a setting: the U's three parts of
the model in one process (first cut at ``--split-layer``, ``--tail-layers`` on the device, full
width), the first cut's rows clipped, noised (seeded by the example's index) and sent through the
wire's codec, the second cut through the codec too, and the dev perplexity on the paraphrase set
against the unsplit model's. It prints the examples' first-cut norms, to choose C from, and one
release's epsilon (dp-accounting, as a forward-only run reports it).

    OMP_NUM_THREADS=1 python -m bench.noised_cut --model smollm2-135m-instruct --noises 0 0.001 0.01 0.1
"""

from __future__ import annotations

import argparse
import os
from typing import Dict, List, Optional, Sequence

import torch

from bench.common import add_output_args, save, table
from bench.decoder_codecs import CodecU, paraphrases
from sft_common.models.base_model import load_base_model
from sft_common.topology.ushape import UShapeSpec
from sft_common.topology.ushape_lm import build_causal_lm, build_ushape_lm_model
from sft_common.wire.codecs import Wire
from sft_edge.data.lm import collate_lm, encode_lm, read_lm_rows
from sft_edge.privacy.defence import Defence, Gaussian
from sft_edge.runs.config import DPOptions
from sft_edge.runs.problems import evaluate_lm
from sft_edge.runs.start_check import UnsplitLM

BATCH = 8


def first_cut_norms(head, batches) -> List[float]:
    """Each dev example's first-cut rows' L2 norm (over its tokens and width)."""
    norms: List[float] = []
    with torch.no_grad():
        for batch in batches:
            cut, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            mask = batch.attention_mask.bool()
            norms += [float(cut[i][mask[i]].norm()) for i in range(cut.shape[0])]
    return norms


def one_release_epsilon(noise: float, delta: float) -> Optional[float]:
    """One Gaussian release's epsilon at ``delta`` (what a forward-only run reports), or None (no noise)."""
    if noise <= 0:
        return None
    return Defence.of(DPOptions(noise=noise, clip=1.0, delta=delta)).epsilon(1, 1.0, gradient=False)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default="/tmp/smolmrpc", help="the paraphrase set (made here if missing)")
    p.add_argument("--dev-rows", type=int, default=64)
    p.add_argument("--split-layer", type=int, default=0)
    p.add_argument("--tail-layers", type=int, default=8)
    p.add_argument("--wire", default="int4-hadamard", help="a --wire-dtype (default: forward-only's)")
    p.add_argument("--clip", type=float, help="--dp-clip (default: the dev examples' median first-cut norm)")
    p.add_argument("--noises", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1])
    p.add_argument("--delta", type=float, default=1e-5)
    add_output_args(p, "noised_cut")
    args = p.parse_args(argv)
    paraphrases(args.data)
    from transformers import AutoTokenizer

    base = load_base_model(args.model)
    path = os.path.join(args.data, "dev.jsonl")
    tok = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    dev = encode_lm(read_lm_rows(path)[: args.dev_rows], tok, 96, path)
    batches = [collate_lm(dev, range(k, min(k + BATCH, len(dev)))) for k in range(0, len(dev), BATCH)]
    spec = UShapeSpec(split_layer=args.split_layer, tail_layers=args.tail_layers, mode="sl")
    parts = tuple(part.eval() for part in build_ushape_lm_model(base, spec, 42))
    norms = sorted(first_cut_norms(parts[0], batches))
    clip = args.clip or norms[len(norms) // 2]
    unsplit = evaluate_lm(UnsplitLM(build_causal_lm(base, 42).eval()), dev, BATCH, "cpu")["perplexity"]
    wire = Wire.named(args.wire)
    rows = []
    for noise in args.noises:
        defence = Gaussian(noise, clip) if noise > 0 else None
        ppl = evaluate_lm(CodecU(parts, wire, defence), dev, BATCH, "cpu")["perplexity"]
        eps = one_release_epsilon(noise, args.delta)
        rows.append(
            {
                "--dp-noise": noise,
                "--dp-clip": clip if noise > 0 else None,
                "epsilon (one release)": eps,
                "dev perplexity, step 0": ppl,
                "vs unsplit": f"{100 * (ppl / unsplit - 1):+.1f}%",
            }
        )
        print(table(rows[-1:], list(rows[0])), flush=True)
    median = norms[len(norms) // 2]
    print(
        f"unsplit {unsplit:.4g}; first-cut norms: min {norms[0]:.4g}, median {median:.4g}, max {norms[-1]:.4g}"
    )
    print(table(rows, list(rows[0])))
    result = {
        "model": args.model,
        "dev_rows": len(dev),
        "split_layer": args.split_layer,
        "tail_layers": args.tail_layers,
        "wire": args.wire,
        "unsplit": unsplit,
        "norms": {"min": norms[0], "median": norms[len(norms) // 2], "max": norms[-1]},
        "rows": rows,
    }
    print("wrote", save(args.name, result, args.out_dir))
    return result


if __name__ == "__main__":
    main()
