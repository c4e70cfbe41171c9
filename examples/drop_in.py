"""An ordinary Hugging Face fine-tuning loop turned into split training by three added lines.

    python examples/drop_in.py --cloud localhost:50051 --insecure --data-dir ../shared/data/glue

The lines marked ``# +++ SFT`` are the only difference from the unsplit script; remove them
and the same loop fine-tunes the whole model in this process.
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import sft_edge.api as sft  # +++ SFT
from sft_common.models.base_model import packaged_minilm_dir


def sst2(data_dir: str, split: str, limit: int):
    with open(os.path.join(data_dir, "SST-2", f"{split}.tsv"), newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [(r["sentence"], int(r["label"])) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cloud", default="localhost:50051")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--tls-ca")
    p.add_argument("--auth-token-file")
    p.add_argument("--data-dir", default="../shared/data/glue")
    p.add_argument("--model", default=str(packaged_minilm_dir()), help="a BERT checkpoint folder or hub name")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-5)
    args = p.parse_args()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = sft.wrap(model, optimizer, cloud=args.cloud, total_steps=args.steps, insecure=args.insecure, tls_ca=args.tls_ca, auth_token_file=args.auth_token_file, max_batch_size=args.batch_size)  # +++ SFT  # fmt: skip

    def collate(examples):
        enc = tokenizer(
            [t for t, _ in examples], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        return dict(enc), torch.tensor([y for _, y in examples])

    train = DataLoader(sst2(args.data_dir, "train", args.steps * args.batch_size), batch_size=args.batch_size, shuffle=True, collate_fn=collate)  # fmt: skip
    model.train()
    losses = []
    for batch, y in train:
        loss = model(**batch, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())

    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch, y in DataLoader(sst2(args.data_dir, "dev", args.eval_examples), batch_size=args.batch_size, collate_fn=collate):  # fmt: skip
            correct += int((model(**batch).logits.argmax(-1) == y).sum())
            total += len(y)
    model.close()  # +++ SFT
    print(json.dumps({"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1], "dev_accuracy": correct / total, "dev_examples": total}))  # fmt: skip


if __name__ == "__main__":
    main()
