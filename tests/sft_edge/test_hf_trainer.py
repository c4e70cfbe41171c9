"""The drop-in API under transformers.Trainer: train() and evaluate() against a real daemon,
and the optimizer refusing what split training cannot do, saying what to change."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import sft_edge.api as sft
from sft_common.models.base_model import load_base_model


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = {
        "input_ids": [],
        "attention_mask": [],
        "label": [],
        "text": [],
    }  # "text": a column Trainer removes
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        label = int(torch.randint(0, 2, (1,), generator=g))
        ids = (torch.randint(1000, 2000, (length,), generator=g) + 1000 * label).tolist()
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["label"].append(label)
        rows["text"].append("unused")
    return Dataset.from_dict(rows)


def _trainer(tmp_path, address, steps=4, **args):
    base = load_base_model("random:tiny")
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = sft.wrap(
        "random:tiny", optimizer, cloud=address, total_steps=steps, split_layer=2, rank=4, max_batch_size=4,
        max_seq_len=16, insecure=True,
    )  # fmt: skip

    class Pad:
        pad_token_id = 0
        model_input_names = ["input_ids", "attention_mask"]

        def pad(self, features, **kw):
            width = max(len(f["input_ids"]) for f in features)
            out = {
                k: torch.tensor([f[k] + [0] * (width - len(f[k])) for f in features])
                for k in ("input_ids", "attention_mask")
            }
            out["labels"] = torch.tensor([f["label"] for f in features])
            return out

    values = dict(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, per_device_eval_batch_size=4,
        learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, logging_steps=1, max_grad_norm=0.0,
    )  # fmt: skip
    values.update(args)
    trainer = Trainer(
        model=model, args=TrainingArguments(**values), train_dataset=_data(16, 0), eval_dataset=_data(8, 1),
        data_collator=Pad().pad, optimizers=(optimizer, None),
        compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())},
    )  # fmt: skip
    del base
    return trainer, model


def test_trainer_train_and_evaluate_through_a_real_daemon(tmp_path, live_server):
    address, registry = live_server
    trainer, model = _trainer(tmp_path, address)
    start = [p.detach().clone() for p in model.net1.parameters()]
    result = trainer.train()
    assert result.global_step == 4 and registry.get(model.session.session_id).next_step == 4
    assert any(not torch.equal(a, p) for a, p in zip(start, model.net1.parameters()))  # net1 trained
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy"} <= set(metrics) and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert model.close() == 4


def test_a_schedule_the_cloud_cannot_follow_is_refused(tmp_path, live_server):
    address, _ = live_server
    trainer, model = _trainer(tmp_path, address, lr_scheduler_type="cosine")
    with pytest.raises(ValueError, match="lr_scheduler_type='linear'"):
        trainer.train()
    model.close()


def test_gradient_accumulation_is_refused(tmp_path, live_server):
    address, _ = live_server
    trainer, model = _trainer(tmp_path, address, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        trainer.train()
    model.close()
