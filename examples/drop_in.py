"""An ordinary Hugging Face fine-tuning loop turned into split training by three added lines.

    sft-cloud serve --port 50051 --insecure &
    python examples/drop_in.py --cloud localhost:50051 --insecure [--steps 20]

Trains on the repository's examples/data/sst2_train.csv and evaluates on sst2_dev.csv (with
``--data-dir ../shared/data/glue``: GLUE's SST-2 TSV files instead). The lines marked ``# +++ SFT``
are the only difference from the unsplit script; remove them and the same loop fine-tunes the
whole model in this process. The session is closed however the loop ends, so the daemon holds
nothing open for it (with ``--checkpoint-dir`` it keeps net2's final weights, as for any run).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from typing import List, Optional, Tuple

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import sft_edge.api as sft  # +++ SFT
from sft_common.models.base_model import packaged_minilm_dir

HERE = os.path.dirname(os.path.abspath(__file__))


def sst2(data_dir: Optional[str], split: str, limit: int) -> List[Tuple[str, int]]:
    """(sentence, label) pairs: the repository's CSV files, or GLUE's SST-2 TSVs under ``data_dir``."""
    if data_dir is None:
        with open(os.path.join(HERE, "data", f"sst2_{split}.csv"), newline="") as f:
            rows = list(csv.DictReader(f))[:limit]
        return [(r["review"], int(r["sentiment"] == "positive")) for r in rows]
    with open(os.path.join(data_dir, "SST-2", f"{split}.tsv"), newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [(r["sentence"], int(r["label"])) for r in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cloud", default="localhost:50051")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--tls-ca")
    p.add_argument("--auth-token-file")
    p.add_argument("--data-dir", help="GLUE's folder (SST-2/train.tsv); default: examples/data's CSV files")
    p.add_argument("--model", default=str(packaged_minilm_dir()), help="a BERT checkpoint folder or hub name")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-5)
    args = p.parse_args()
    torch.manual_seed(0)

    train_rows = sst2(args.data_dir, "train", args.steps * args.batch_size)
    dev_rows = sst2(args.data_dir, "dev", args.eval_examples)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = sft.wrap(  # +++ SFT
        model,
        optimizer,
        cloud=args.cloud,
        total_steps=args.steps,
        insecure=args.insecure,
        tls_ca=args.tls_ca,
        auth_token_file=args.auth_token_file,
        max_batch_size=args.batch_size,
    )

    def collate(examples):
        enc = tokenizer(
            [t for t, _ in examples], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        return dict(enc), torch.tensor([y for _, y in examples])

    try:  # +++ SFT
        train = DataLoader(train_rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
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
            for batch, y in DataLoader(dev_rows, batch_size=args.batch_size, collate_fn=collate):
                correct += int((model(**batch).logits.argmax(-1) == y).sum())
                total += len(y)
    finally:  # +++ SFT
        model.close()  # +++ SFT
    result = {"steps": len(losses), "loss_first": losses[0], "loss_last": losses[-1]}
    print(json.dumps({**result, "dev_accuracy": correct / total, "dev_examples": total}))


if __name__ == "__main__":
    main()
