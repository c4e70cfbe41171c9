"""The drop-in API: an unchanged training loop trains exactly as the CLI's split session does."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from daemon import ROOT, start_daemon, stop_daemon
from helpers import max_diff, params, random_batch

import sft_edge.api as sft
from sft_common.models.base_model import load_base_model
from sft_common.topology.spec import SplitSpec
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import OptimConfig
from sft_edge.sessions.two_part import EdgeSession


def _batches(n):
    return [random_batch(batch=4, seq=10, seed=k) for k in range(n)]


def _unchanged_loop(model, optimizer, batches):
    """The user's training loop, as the drop-in API leaves it; returns the losses."""
    model.train()
    losses = []
    for b in batches:
        loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("factor_lr", [None, 1e-2])
def test_wrapped_loop_matches_the_split_session(live_server, factor_lr):
    """Three steps of `loss = model(...).loss; loss.backward(); optimizer.step()` give net1 the
    same weights and the same losses as EdgeSession.train_step, against a real gRPC daemon."""
    address, registry = live_server
    base = load_base_model("random:tiny")
    optim = OptimConfig(
        lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=3, seed=7, factor_lr=factor_lr
    )
    batches = _batches(3)

    ref = EdgeSession(
        base, SplitSpec(split_layer=2, rank=4), 2, GrpcTransport(open_channel(address)), optim,
        batch_size=4, max_seq_len=16,
    )  # fmt: skip
    ref_losses = [ref.train_step(k, b) for k, b in enumerate(batches)]
    ref.close()

    model = torch.nn.Linear(1, 1)  # stands for the user's model; only its optimizer's lr / wd are read
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model, optimizer = sft.wrap(
        "random:tiny", optimizer, cloud=address, total_steps=3, warmup_steps=1, seed=7, split_layer=2,
        rank=4, max_batch_size=4, max_seq_len=16, insecure=True, factor_lr=factor_lr,
    )  # fmt: skip
    assert len(optimizer.session.optimizer.param_groups) == (1 if factor_lr is None else 2)
    losses = _unchanged_loop(model, optimizer, batches)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert max_diff(params(model.net1), params(ref.net1)) < 1e-6
    assert model.bytes_sent > 0 and model.bytes_received > 0

    model.eval()
    b = batches[0]
    out = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels)
    assert out.logits.shape == (4, 2) and torch.isfinite(out.loss)
    assert model.close() == 3


@pytest.mark.parametrize("name", ["random:tiny", "random:tiny-llama"])
def test_a_peft_lora_model_trains_as_the_lora_session(live_server, name):
    """A model wrapped by PEFT's get_peft_model(LoraConfig) trains LoRA on both halves: three
    steps of the unchanged loop equal EdgeSession.train_step with the same LoraSpec, an encoder
    and a decoder family alike."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from sft_common.models.lora import LoraSpec

    address, _ = live_server
    base = load_base_model(name)
    targets = ["query", "value"] if base.config.model_type == "bert" else ["q_proj", "v_proj"]
    optim = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0, total_steps=3, seed=7)
    batches = _batches(3)
    ref = EdgeSession(
        base, SplitSpec(split_layer=2, rank=4), 2, GrpcTransport(open_channel(address)), optim,
        batch_size=4, max_seq_len=16, lora=LoraSpec(4, 8.0, tuple(sorted(targets))),
    )  # fmt: skip
    ref_losses = [ref.train_step(k, b) for k, b in enumerate(batches)]
    ref.close()

    hf = AutoModelForSequenceClassification.from_config(base.config)
    hf.config._name_or_path = name  # what from_pretrained(name) records: the name the cloud resolves
    peft_model = get_peft_model(
        hf, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_CLS")
    )
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=1e-3, weight_decay=0.0)
    model, optimizer = sft.wrap(
        peft_model, optimizer, cloud=address, total_steps=3, seed=7, split_layer=2, rank=4,
        max_batch_size=4, max_seq_len=16, insecure=True,
    )  # fmt: skip
    assert any("lora_A" in n for n, p in model.net1.named_parameters() if p.requires_grad)
    losses = _unchanged_loop(model, optimizer, batches)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert max_diff(params(model.net1), params(ref.net1)) < 1e-6
    model.close()

    dora = get_peft_model(
        AutoModelForSequenceClassification.from_config(base.config),
        LoraConfig(r=4, target_modules=targets, use_dora=True, lora_dropout=0.1),
    )
    with pytest.raises(ValueError, match="not lora_dropout, use_dora"):
        sft.wrap(dora, None, cloud=address, total_steps=1, insecure=True)


def test_factor_lr_without_factors_is_refused(live_server):
    address, _ = live_server
    with pytest.raises(ValueError, match="--factor-lr needs --mode sft"):
        sft.wrap("random:tiny", None, cloud=address, total_steps=1, mode="sl", factor_lr=1e-3, insecure=True)


def test_left_padding_is_refused(live_server):
    address, _ = live_server
    model, _ = sft.wrap(
        "random:tiny", None, cloud=address, total_steps=1, split_layer=1, max_batch_size=4, insecure=True
    )
    ids = torch.ones(2, 4, dtype=torch.long)
    left_padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=left_padded, labels=torch.tensor([0, 1]))
    model.close()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small BERT checkpoint folder, as `save_pretrained` writes it, with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from sft_common.models.base_model import packaged_minilm_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=128, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_minilm_dir() / name, folder / name)
    return str(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_example(glue_dir: str, extra) -> dict:
    """examples/drop_in.py (an HF loop plus three lines) against `sft-cloud serve` in its own
    process; the daemon's Prometheus endpoint and JSON logs are read on the way."""
    metrics_port = _free_port()
    proc, port = start_daemon(["--insecure", "--metrics-port", str(metrics_port), "--log-format", "json"])
    try:
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "drop_in.py"), "--cloud", f"127.0.0.1:{port}",
             "--insecure", "--data-dir", glue_dir, *extra],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )  # fmt: skip
        scrape = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        )
    finally:
        log = stop_daemon(proc)
    assert out.returncode == 0, out.stderr[-3000:] + log[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    steps = re.search(r"^sft_train_steps_total (\S+)$", scrape, re.M)
    assert steps and float(steps.group(1)) == result["steps"]
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    return result


def test_drop_in_example_trains_against_a_daemon(glue_dir, tiny_checkpoint):
    args = ["--model", tiny_checkpoint, "--steps", "3", "--batch-size", "8", "--eval-examples", "16"]
    result = run_example(glue_dir, args)
    assert result["steps"] == 3 and result["dev_examples"] == 16
    assert 0.0 <= result["dev_accuracy"] <= 1.0 and result["loss_first"] > 0


@pytest.mark.slow
def test_drop_in_example_with_minilm(glue_dir):
    result = run_example(glue_dir, ["--steps", "20", "--batch-size", "16", "--eval-examples", "128"])
    assert result["steps"] == 20 and result["dev_examples"] == 128
    assert result["loss_last"] < result["loss_first"] + 0.5
