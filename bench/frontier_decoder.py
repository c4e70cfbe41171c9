"""The decoder frontier: bytes a token each way against dev perplexity, from real runs' reports (issue 34).

Each point is one `sft-edge train --problem causal-lm` run of SmolLM2 + LoRA on the paraphrase set
(bench/results/smollm2/paraphrase-commands.sh): its report gives the bytes sent and received
(counted from the real messages by the edge's transport) and the dev perplexity at step 0 and
after the budget. The tokens that crossed are recounted here from the same rows, order and steps
(the trainer's ``batch_indices``): every real token of the 80 training batches (activations and a
gradient each way) and of the two dev evaluations (activations each way). Bytes a token each way =
bytes / those tokens. Usage: python -m bench.frontier_decoder [--data /tmp/smolmrpc]
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List

from bench.common import ROOT, add_output_args, save, table
from bench.decoder_codecs import paraphrases
from sft_edge.data.glue import batch_indices
from sft_edge.data.lm import encode_lm, read_lm_rows

RESULTS = os.path.join(ROOT, "bench", "results", "smollm2")
LOCAL = "paraphrase-local-lora-m80-s42.json"
# (label, flags beyond the commands' COMMON, report file)
POINTS = [
    ("U, R=8 (the default before)", "--label-private", "paraphrase-u-lora-r8-m80-s42.json"),
    (
        "U, FFN-input R=64",
        "--label-private --factorise ffn-input --rank 64",
        "paraphrase-u-ffn-input-lora-r64-m80-s42.json",
    ),
    (
        "U, full width, fp32",
        "--label-private --factorise ffn-input --rank 576",
        "paraphrase-u-ffn-input-lora-r576-m80-s42.json",
    ),
    (
        "U, full width, int4-hadamard",
        "--label-private --mode sl --wire-dtype int4-hadamard --compression zstd",
        "paraphrase-u-sl-int4-hadamard-zstd-lora-m80-s42.json",
    ),
    (
        "U, full width, int4-6-hadamard",
        "--label-private --mode sl --wire-dtype int4-6-hadamard --compression zstd",
        "paraphrase-u-default-zstd-lora-m80-s42.json",
    ),
    (
        "U, full width, int4-6-hadamard-grad4 (the default)",
        "--label-private",
        "paraphrase-u-grad4-zstd-lora-m80-s42.json",
    ),
]


def tokens_crossed(
    data: str, steps: int = 80, batch: int = 8, seed: int = 42, max_len: int = 96
) -> Dict[str, int]:
    """Real tokens of the training batches and of one pass over the dev rows, as the runs encoded them."""
    from transformers import AutoTokenizer

    from sft_common.models.base_model import load_base_model

    tokenizer = AutoTokenizer.from_pretrained(load_base_model("smollm2-135m-instruct").tokenizer_dir)
    train_path, dev_path = os.path.join(data, "train.jsonl"), os.path.join(data, "dev.jsonl")
    train = encode_lm(read_lm_rows(train_path), tokenizer, max_len, train_path)
    dev = encode_lm(read_lm_rows(dev_path), tokenizer, max_len, dev_path)
    lengths = [len(ids) for ids in train.input_ids]
    trained = sum(lengths[i] for step in range(steps) for i in batch_indices(len(train), batch, seed, step))
    return {"train": trained, "dev": sum(len(ids) for ids in dev.input_ids)}


def main(argv=None) -> List[Dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="/tmp/smolmrpc", help="the paraphrase set (made here if missing)")
    add_output_args(p, "decoder")
    args = p.parse_args(argv)
    paraphrases(args.data)
    counted = tokens_crossed(args.data)
    crossed = counted["train"] + 2 * counted["dev"]  # two evaluations: step 0 and the last
    local = json.load(open(os.path.join(RESULTS, LOCAL)))["metrics"]["perplexity"]
    rows = [{"setting": "--local", "flags": "--local", "after 80 steps": local}]
    for label, flags, name in POINTS:
        path = os.path.join(RESULTS, name)
        if not os.path.exists(path):
            print(f"not run yet: {name}")
            continue
        report = json.load(open(path))
        rows.append(
            {
                "setting": label,
                "flags": flags,
                "bytes a token up": report["bytes_sent"] / crossed,
                "bytes a token down": report["bytes_received"] / crossed,
                "step 0": report["eval_history"][0]["perplexity"],
                "after 80 steps": report["metrics"]["perplexity"],
                "vs --local": f"{100 * (report['metrics']['perplexity'] / local - 1):+.1f}%",
                "report": f"bench/results/smollm2/{name}",
            }
        )
    fp32 = next(r for r in rows if r["setting"] == "U, full width, fp32")
    for r in rows[1:]:
        up, down = (fp32[k] / r[k] for k in ("bytes a token up", "bytes a token down"))
        r["fp32 / this, up and down"] = f"{up:.1f}x / {down:.1f}x"
    print(
        f"tokens crossed: {counted['train']} in 80 training batches, {counted['dev']} in each of 2 dev passes"
    )
    columns = ["setting", "bytes a token up", "bytes a token down", "fp32 / this, up and down", "step 0"]
    print(table(rows, columns + ["after 80 steps", "vs --local"]))
    out = args.out_dir or os.path.join(ROOT, "bench", "results", "frontier")
    print("wrote", save(args.name, {"tokens": counted, "points": rows}, out))
    return rows


if __name__ == "__main__":
    main()
