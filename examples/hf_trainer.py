"""Split training under the Hugging Face Trainer: the model and optimizer go through sft.wrap,
everything else is the Trainer as users know it.

    sft-cloud serve --port 50051 --insecure &
    python examples/hf_trainer.py --cloud localhost:50051 --insecure [--steps 60] [--eval-examples N]

Trains the packaged MiniLM on the repository's examples/data/sst2_train.csv and evaluates on
sst2_dev.csv. What the Trainer must be told: ``optimizers=(optimizer, None)`` (or a scheduler of
your own that sets the same learning rates), ``max_steps`` equal to ``total_steps``,
``warmup_steps=0``, ``gradient_accumulation_steps=1`` (each forward is one cloud step);
anything else is refused by the optimizer with a message that says what to change.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import sft_edge.api as sft
from sft_common.models.base_model import packaged_minilm_dir

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cloud", default="localhost:50051")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--tls-ca")
    p.add_argument("--auth-token-file")
    p.add_argument("--model", default=str(packaged_minilm_dir()), help="a BERT checkpoint folder or hub name")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument(
        "--eval-examples", type=int, help="evaluate on the first N dev sentences (default: all 872)"
    )
    p.add_argument("--output-dir", default="runs/hf_trainer")
    args = p.parse_args()
    torch.manual_seed(0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    files = {"train": f"{HERE}/data/sst2_train.csv", "dev": f"{HERE}/data/sst2_dev.csv"}
    data = load_dataset("csv", data_files=files)
    data = data.map(lambda b: tokenizer(b["review"], truncation=True, max_length=128), batched=True)
    data = data.map(lambda b: {"label": [int(s == "positive") for s in b["sentiment"]]}, batched=True)

    dev = data["dev"].select(range(args.eval_examples)) if args.eval_examples else data["dev"]
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = sft.wrap(
        model,
        optimizer,
        cloud=args.cloud,
        total_steps=args.steps,
        insecure=args.insecure,
        tls_ca=args.tls_ca,
        auth_token_file=args.auth_token_file,
        max_batch_size=args.batch_size,
    )
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=0,
        lr_scheduler_type="linear",
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        logging_steps=10,
    )

    def accuracy(pred) -> dict:
        return {"accuracy": float((np.argmax(pred.predictions, axis=-1) == pred.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data["train"],
        eval_dataset=dev,
        data_collator=DataCollatorWithPadding(tokenizer),
        optimizers=(optimizer, None),
        compute_metrics=accuracy,
    )
    trainer.train()
    print(trainer.evaluate())
    model.close()


if __name__ == "__main__":
    main()
