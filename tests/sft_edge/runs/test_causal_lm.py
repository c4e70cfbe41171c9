"""`sft-edge train --problem causal-lm --label-private` and `sft-edge generate` through a real daemon.

The daemon runs in this process on a free port and records every message it is handed (what the
cloud sees): no token id, label or text crosses, only activations, gradients, lengths and the
step bookkeeping. Generation through the daemon equals greedy decoding with the same three parts
(the run's head and LM tail, the daemon's final middle) in one process.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_completion_rows

from sft_edge import cli
from sft_edge.data.glue import DataError
from sft_edge.finished import predict
from sft_edge.runs.config import Connection, GenerateConfig, PredictConfig

# What an EdgeMessage may set (leaf fields), besides the open message's session config.
ALLOWED = {"step", "batch", "lengths", "dtype", "shape", "data", "compression", "scale", "scales"}


def _leaves(msg, prefix=""):
    """The names of every leaf field a message sets."""
    out = set()
    for field, value in msg.ListFields():
        if hasattr(value, "ListFields"):  # a message field: its own leaves
            out |= _leaves(value, prefix)
        else:
            out.add(field.name)
    return out


def _argv(tmp_path, address, *extra):
    return [
        "train", "--problem", "causal-lm", "--train-file", write_completion_rows(tmp_path / "train.jsonl", 24),
        "--cloud", address, "--insecure", "--model", "random:tiny-llama", "--batch-size", "4",
        "--max-steps", "6", "--lr", "1e-3", "--no-progress", *extra,
    ]  # fmt: skip


def test_causal_lm_trains_through_the_daemon_sends_no_token_and_generates(tmp_path, recorded, capsys):
    from safetensors.torch import load_file

    from sft_common.models.base_model import load_base_model
    from sft_common.storage.checkpoint import load_owned
    from sft_common.topology.ushape import UShapeSpec
    from sft_common.topology.ushape_lm import build_ushape_lm_model
    from sft_edge.finished.generate import decode, generate, prompt_ids

    address, registry, messages = recorded
    run, dev = str(tmp_path / "run"), write_completion_rows(tmp_path / "dev.jsonl", 6, 100)
    # The rank-8 cut in fp32 (not a decoder's default: full width through int4-6-hadamard-grad4) so that
    # generation here is the daemon's function exactly (test_lm_export covers the default).
    argv = _argv(tmp_path, address, "--dev-file", dev, "--label-private", "--mode", "sft", "--output-dir", run,
                 "--report", str(tmp_path / "r.json"), "--checkpoint-every", "3")  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == report["cloud_steps"] == 6 and report["task"] == "causal-lm"
    metrics = report["metrics"]
    assert set(metrics) == {"perplexity", "loss"} and metrics["perplexity"] == pytest.approx(
        torch.tensor(metrics["loss"]).exp().item(), rel=1e-6
    )
    info = json.loads((tmp_path / "run" / "sft_edge.json").read_text())
    assert (
        info["problem"] == "causal-lm" and info["lm_shape"] == "prompt/completion" and info["num_labels"] == 0
    )
    saved = load_file(f"{run}/edge.safetensors")
    assert "tail.lm_head.weight" in saved and not any("score" in k for k in saved)

    # (4) what the cloud saw: activations, gradients, lengths and bookkeeping; no id, label or text
    kinds = [m.WhichOneof("kind") for m, _ in messages]
    assert kinds.count("forward_up") == kinds.count("gradient_up") == 6 and "train" not in kinds
    opened = messages[0][0].open.config
    assert opened.label_private and opened.num_labels == 0 and opened.task == "causal-lm"
    for msg, reply in messages:
        kind = msg.WhichOneof("kind")
        assert kind in ("open", "forward_up", "gradient_up", "eval", "checkpoint", "close")
        if kind != "open":
            assert _leaves(msg) <= ALLOWED, (kind, _leaves(msg))
        for tensor in (msg.forward_up.activations, msg.gradient_up.grad, msg.eval.activations):
            assert tensor.dtype in (0, 1) and (not tensor.shape or tensor.shape[-1] == 8)  # fp32, rank 8
        assert not reply.train.loss and not reply.eval.HasField("logits")

    # (3) generate through the daemon = greedy decoding with the same three parts here
    conn = Connection(cloud=address, insecure=True)
    out = generate(GenerateConfig(run, "red green blue", max_new_tokens=5, connection=conn))
    assert len(out["tokens"]) == 5 and out["stopped"] == "max_new_tokens"
    base = load_base_model("random:tiny-llama")
    head, middle, tail = build_ushape_lm_model(base, UShapeSpec(0, 8, 1), seed=42)
    load_owned(torch.nn.ModuleDict({"head": head, "tail": tail}), saved)
    load_owned(middle, load_file(f"{registry.checkpoint_dir}/{report['session_id']}/final.safetensors"))
    for part in (head, middle, tail):
        part.eval()

    def here(batch):
        with torch.no_grad():
            cut, _ = head(batch.input_ids, batch.attention_mask)
            return tail(middle(cut, batch.attention_mask)[0], batch.attention_mask)

    from transformers import AutoTokenizer

    ids = prompt_ids(AutoTokenizer.from_pretrained(run), "red green blue", chat=False)
    assert out["tokens"] == decode(here, ids, 5, 128)
    assert cli.main(["generate", "--run", run, "--prompt", "red green blue", "--max-new-tokens", "5",
                     "--cloud", address, "--insecure", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == out["tokens"]
    with pytest.raises(DataError, match="causal-LM run: it generates text"):
        predict.predict(PredictConfig(run, dev, str(tmp_path / "p.csv"), conn))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--problem causal-lm needs --label-private: in the two-part split the cloud holds the head"),
        (["--label-private", "--micro-batches", "2"], "does not go with --local, --micro-batches"),
        (["--label-private", "--text-columns", "x", "--label-column", "y"], "takes no --text-columns"),
    ],
)
def test_causal_lm_flag_refusals(tmp_path, capsys, extra, message):
    assert cli.main(_argv(tmp_path, "127.0.0.1:1", *extra)) == 2
    assert message in capsys.readouterr().err


def test_causal_lm_holds_out_a_dev_share_and_refuses_an_encoder_by_name(tmp_path):
    from sft_edge.runs.config import TrainConfig
    from sft_edge.runs.setup import prepare

    cfg = TrainConfig(
        problem="causal-lm", train_file=write_completion_rows(tmp_path / "t.jsonl", 24), model="random:tiny-llama",
        label_private=True, dev_share=0.25,
    )  # fmt: skip
    run = prepare(cfg)
    assert (len(run.train_data), len(run.dev_data), run.lm_shape) == (18, 6, "prompt/completion")
    cfg.model = "random:tiny"
    with pytest.raises(ValueError, match="needs a decoder .*'random:tiny' is BERT, an encoder"):
        prepare(cfg)
