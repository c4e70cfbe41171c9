"""`sft-edge train --label-private` end to end through a real daemon: no label crosses the link.

The daemon runs in this process on a free port and records every message it is handed (after
gRPC parsed it: what the cloud sees). The command line is `sft-edge train` itself (``cli.main``).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import interrupt_then_resume, write_reviews

from sft_common.proto import sft_pb2 as pb
from sft_edge import cli
from sft_edge.finished import predict
from sft_edge.finished.trained import load_trained
from sft_edge.runs.config import Connection, ExportConfig, PredictConfig, TrainConfig


def test_train_label_private_end_to_end_sends_no_label(tmp_path, recorded, capsys):
    address, registry, messages = recorded
    run, dev = str(tmp_path / "run"), write_reviews(tmp_path / "dev.csv", 12, 100)
    argv = [
        "train", "--train-file", write_reviews(tmp_path / "train.csv", 40), "--dev-file", dev,
        "--text-columns", "opinion", "--label-column", "verdict", "--cloud", address, "--insecure",
        "--model", "random:tiny", "--batch-size", "8", "--max-steps", "6", "--lr", "1e-3",
        "--label-private", "--tail-layers", "2", "--output-dir", run, "--report", str(tmp_path / "r.json"),
        "--checkpoint-every", "3", "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == report["cloud_steps"] == 6
    assert report["label_private"] is True and report["tail_layers"] == 2 and report["split_layer"] == 0

    kinds = [m.WhichOneof("kind") for m, _ in messages]
    assert kinds.count("forward_up") == kinds.count("gradient_up") == 6 and "train" not in kinds
    opened = messages[0][0].open.config
    assert opened.label_private and opened.tail_layers == 2 and opened.num_labels == 0
    for msg, reply in messages:  # what the cloud saw, field by field
        kind = msg.WhichOneof("kind")
        if kind == "forward_up":
            assert {f.name for f, _ in msg.forward_up.ListFields()} <= {"step", "activations", "lengths"}
        elif kind == "gradient_up":
            assert {f.name for f, _ in msg.gradient_up.ListFields()} <= {"step", "grad"}  # (step 0: unset)
        elif kind == "eval":
            assert not reply.eval.HasField("logits")  # the cloud computes no logits either
        else:
            assert kind in ("open", "checkpoint", "close")
        assert not msg.train.labels and not msg.train.targets  # no TrainStep, so no label field set
    assert all(not r.train.loss for _, r in messages)  # and no loss came back

    # predict through the daemon: the evaluation at the end of training
    conn = Connection(cloud=address, insecure=True)
    assert predict.predict(PredictConfig(run, dev, str(tmp_path / "p.csv"), conn)) == 12
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gold = [r["verdict"] for r in csv.DictReader(open(dev, newline=""))]
    accuracy = sum(r["prediction"] == g for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(report["metrics"]["accuracy"])
    # export: the daemon's middle fetched once; the three parts then predict here, as evaluated
    predict.export(ExportConfig(run, str(tmp_path / "export"), conn))
    here = load_trained(str(tmp_path / "export")).predict([(r["opinion"],) for r in rows])
    assert [h["prediction"] for h in here] == [r["prediction"] for r in rows]
    for h, r in zip(here, rows):
        assert h["probabilities"]["good"] == pytest.approx(float(r["probability_good"]), abs=1e-5)
    assert len(registry) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tail-layers", "2"], "--tail-layers goes with --label-private"),
        (["--label-private", "--tail-layers", "0"], "--tail-layers must be >= 1"),
        (["--label-private", "--local"], "--label-private is a split with the cloud"),
        (["--label-private", "--micro-batches", "2"], "does not go with --local, --micro-batches"),
    ],
)
def test_bad_label_private_flags_are_refused_at_once(tmp_path, capsys, extra, message):
    argv = ["train", "--task", "sst2", "--insecure", *extra]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_u_that_leaves_the_cloud_no_layer_is_refused_before_training(tmp_path):
    from sft_edge.runs.setup import prepare

    cfg = TrainConfig(
        train_file=write_reviews(tmp_path / "t.csv", 20), text_columns="opinion", label_column="verdict",
        model="random:tiny", label_private=True, split_layer=1, tail_layers=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="leave the cloud no layer"):
        prepare(cfg)
    assert pb.SessionConfig(label_private=True).num_labels == 0


def test_an_edge_restart_with_resume_ends_as_an_uninterrupted_run(tmp_path, recorded, monkeypatch):
    """Ctrl-C at step 4, then --resume from the checkpoint after 3 steps: the cloud answers step 3's
    phases from its cache, and both sides end bit-identical to a run that was never stopped."""
    from safetensors.torch import load_file

    from sft_edge.runs.trainer import train
    from sft_edge.sessions.ushape import UShapeSession

    address, registry, _ = recorded
    values = dict(
        train_file=write_reviews(tmp_path / "train.csv", 40), dev_file=write_reviews(tmp_path / "dev.csv", 12, 100),
        text_columns="opinion", label_column="verdict", cloud=address, insecure=True, model="random:tiny",
        batch_size=8, max_steps=6, lr=1e-3, label_private=True, checkpoint_every=3, progress=False,
    )  # fmt: skip
    whole = train(TrainConfig(output_dir=str(tmp_path / "whole"), **values))
    resumed = interrupt_then_resume(monkeypatch, UShapeSession, values, tmp_path / "cut")
    assert resumed["eval_history"] == whole["eval_history"] and resumed["resumes"] == 1
    for name in ("whole", "cut"):
        assert (tmp_path / name / "edge.safetensors").is_file()
    edge_a, edge_b = (load_file(str(tmp_path / n / "edge.safetensors")) for n in ("whole", "cut"))
    assert edge_a.keys() == edge_b.keys() and all(k.startswith(("head.", "tail.")) for k in edge_a)
    assert all(torch.equal(edge_a[k], edge_b[k]) for k in edge_a)
    cloud_a, cloud_b = (
        load_file(f"{registry.checkpoint_dir}/{r['session_id']}/final.safetensors") for r in (whole, resumed)
    )
    assert cloud_a.keys() == cloud_b.keys() and all(torch.equal(cloud_a[k], cloud_b[k]) for k in cloud_a)
