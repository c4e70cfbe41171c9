"""A model to use when training ends: predict through the daemon, export, load_trained, forget."""

from __future__ import annotations

import csv
import json
import os

import grpc
import pytest
from helpers import write_reviews

from sft_cloud.daemon.server import ServeConfig, create_server
from sft_cloud.sessions.registry import SessionRegistry
from sft_edge.data.glue import DataError
from sft_edge.finished import predict
from sft_edge.finished.parts import open_finished
from sft_edge.finished.record import read_run
from sft_edge.finished.trained import load_trained
from sft_edge.link.transport import CloudError
from sft_edge.runs.config import Connection, ExportConfig, PredictConfig
from sft_edge.runs.trainer import TrainConfig, train


@pytest.fixture
def daemon(tmp_path):
    """A daemon that keeps finished sessions (a checkpoint dir)."""
    registry = SessionRegistry(checkpoint_dir=str(tmp_path / "cloud"))
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    yield f"127.0.0.1:{port}", registry
    server.stop(0).wait()


def _train(tmp_path, cloud, **kw):
    values = dict(
        train_file=write_reviews(tmp_path / "train.csv", 40), dev_file=write_reviews(tmp_path / "dev.csv", 12, 100),
        text_columns="opinion", label_column="verdict", cloud=cloud, insecure=True, model="random:tiny",
        batch_size=8, max_steps=6, lr=1e-3, output_dir=str(tmp_path / "run"), progress=False,
    )  # fmt: skip
    values.update(kw)
    return train(TrainConfig(**values))


def _read(path):
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f]
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_through_the_daemon_and_after_export_agree_with_training(tmp_path, daemon):
    address, registry = daemon
    report = _train(tmp_path, address)
    conn = Connection(cloud=address, insecure=True)
    dev, run = str(tmp_path / "dev.csv"), str(tmp_path / "run")

    assert predict.predict(PredictConfig(run, dev, str(tmp_path / "remote.csv"), conn)) == 12
    remote = _read(str(tmp_path / "remote.csv"))
    assert list(remote[0]) == ["opinion", "prediction", "probability_bad", "probability_good"]
    gold = [row["verdict"] for row in _read(dev)]
    accuracy = sum(r["prediction"] == g for r, g in zip(remote, gold)) / len(gold)
    assert accuracy == pytest.approx(report["metrics"]["accuracy"])  # the evaluation at the end of training

    predict.export(ExportConfig(run, str(tmp_path / "export"), conn))
    assert sorted(os.listdir(tmp_path / "export")) >= ["cloud.safetensors", "config.json", "edge.safetensors"]
    local = load_trained(str(tmp_path / "export")).predict([r["opinion"] for r in remote])
    assert [r["prediction"] for r in local] == [r["prediction"] for r in remote]
    for a, b in zip(local, remote):
        assert a["probabilities"]["good"] == pytest.approx(float(b["probability_good"]), abs=1e-5)
    # the exported folder predicts with no daemon at all, through the CLI's path too
    predict.predict(PredictConfig(str(tmp_path / "export"), dev, str(tmp_path / "here.jsonl"), Connection()))
    here = _read(str(tmp_path / "here.jsonl"))
    assert [r["prediction"] for r in here] == [r["prediction"] for r in remote]
    assert len(registry) == 0  # nothing left open


def test_a_jsonl_regression_run_predicts_values(tmp_path, daemon):
    address, _ = daemon
    path = tmp_path / "scores.jsonl"
    with open(path, "w") as f:
        for k in range(30):
            f.write(json.dumps({"review": f"item {k} " + "good " * (k % 4), "stars": 1.0 + (k % 4)}) + "\n")
    _train(
        tmp_path, address, train_file=str(path), dev_file=None, text_columns="review", label_column="stars"
    )
    (tmp_path / "in.txt").write_text("good good good\nitem\n")
    conn = Connection(cloud=address, insecure=True)
    predict.predict(
        PredictConfig(str(tmp_path / "run"), str(tmp_path / "in.txt"), str(tmp_path / "out.jsonl"), conn)
    )
    remote = _read(str(tmp_path / "out.jsonl"))
    assert [set(r) for r in remote] == [{"review", "prediction"}] * 2
    predict.export(ExportConfig(str(tmp_path / "run"), str(tmp_path / "export"), conn))
    local = load_trained(str(tmp_path / "export")).predict(["good good good", "item"])
    assert [r["prediction"] for r in local] == pytest.approx([r["prediction"] for r in remote], abs=1e-5)


def test_a_local_run_folder_loads_and_predicts_as_it_evaluated(tmp_path):
    report = _train(tmp_path, "unused:1", local=True)
    model = load_trained(str(tmp_path / "run"))
    rows = _read(str(tmp_path / "dev.csv"))
    preds = model.predict([r["opinion"] for r in rows])
    accuracy = sum(p["prediction"] == r["verdict"] for p, r in zip(preds, rows)) / len(rows)
    assert accuracy == pytest.approx(report["metrics"]["accuracy"])


def test_a_run_that_says_plain_init_loads_and_one_that_says_another_is_refused(tmp_path):
    """Runs written before the calibrated initialisations left say ``"svd_init": "plain"``: they
    load as before; a run that started its factors another way can no longer be used, and says why."""
    _train(tmp_path, "unused:1", local=True)
    path = tmp_path / "run" / "sft_edge.json"
    info = json.loads(path.read_text())
    assert "svd_init" not in info  # no longer written
    path.write_text(json.dumps({**info, "svd_init": "plain"}))
    assert read_run(str(tmp_path / "run")).as_dict() == info
    assert len(load_trained(str(tmp_path / "run")).predict(["a fine film"])) == 1
    path.write_text(json.dumps({**info, "svd_init": "activation-aware"}))
    with pytest.raises(DataError, match="--svd-init activation-aware, which was removed"):
        load_trained(str(tmp_path / "run"))


def test_forget_deletes_the_session_and_then_nothing_can_reopen_it(tmp_path, daemon):
    address, registry = daemon
    report = _train(tmp_path, address)
    folder = tmp_path / "cloud" / report["session_id"]
    assert (folder / "final.safetensors").is_file()
    conn = Connection(cloud=address, insecure=True)
    assert predict.forget(str(tmp_path / "run"), conn) == report["session_id"]
    assert not folder.exists()
    with pytest.raises(CloudError) as caught:
        predict.predict(
            PredictConfig(str(tmp_path / "run"), str(tmp_path / "dev.csv"), str(tmp_path / "o.csv"), conn)
        )
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_a_reopened_session_refuses_training_steps(tmp_path, daemon):
    address, _ = daemon
    report = _train(tmp_path, address)
    record = read_run(str(tmp_path / "run"))
    session = open_finished(str(tmp_path / "run"), record, Connection(cloud=address, insecure=True), "cpu")
    from helpers import random_batch

    with pytest.raises(CloudError, match="inference only") as caught:
        session.train_step(report["steps"], random_batch(batch=4, seq=8))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


def _frozen_names(module):
    return {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def test_a_lora_run_keeps_only_what_it_owns_and_predicts_everywhere(tmp_path, daemon):
    """--peft lora: the edge's checkpoints, its weights, the cloud's final weights and the export
    hold the adapters, the factors and the head, no tensor of the frozen base; predict through
    the daemon, after export (the base rebuilt by name) and from a --local LoRA run all agree
    with the evaluation at the end of training."""
    from safetensors import safe_open

    from sft_common.models.base_model import load_base_model
    from sft_common.models.lora import LoraSpec, apply_lora, head_parameters
    from sft_common.topology.spec import SplitSpec
    from sft_common.topology.two_part import build_split_model, factor_parameters

    address, _ = daemon
    report = _train(tmp_path, address, peft="lora", lora_rank=4, checkpoint_every=3)
    run, dev, conn = tmp_path / "run", str(tmp_path / "dev.csv"), Connection(cloud=address, insecure=True)
    info = json.loads((run / "sft_edge.json").read_text())
    assert info["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["query", "value"]}

    base = load_base_model("random:tiny")
    edge, cloud = build_split_model(base, SplitSpec(split_layer=info["split_layer"], rank=8), 2, 0)
    lora = LoraSpec.from_dict(info["lora"])
    apply_lora(edge, lora, 0, "edge", keep=factor_parameters(edge))
    apply_lora(cloud, lora, 0, "cloud", keep=factor_parameters(cloud) + head_parameters(cloud))

    def keys(path, prefix=""):
        with safe_open(str(path), framework="pt") as f:
            return {k[len(prefix) :] for k in f.keys() if k.startswith(prefix)}

    final = tmp_path / "cloud" / report["session_id"] / "final.safetensors"
    checkpoints = sorted((run / "checkpoints").glob("step-*.safetensors"))
    assert checkpoints, "the edge wrote no checkpoint"
    for path, module, prefix in [
        (run / "edge.safetensors", edge, ""),
        (checkpoints[-1], edge, "model/"),
        (final, cloud, ""),
    ]:
        saved = keys(path, prefix)
        assert saved and not saved & _frozen_names(module), path  # no frozen base tensor
        assert saved == set(module.state_dict()) - _frozen_names(module), path
        assert any("lora_A" in k for k in saved) or module is cloud

    assert predict.predict(PredictConfig(str(run), dev, str(tmp_path / "remote.csv"), conn)) == 12
    remote = _read(str(tmp_path / "remote.csv"))
    gold = [row["verdict"] for row in _read(dev)]
    assert sum(r["prediction"] == g for r, g in zip(remote, gold)) / 12 == pytest.approx(
        report["metrics"]["accuracy"]
    )
    predict.export(ExportConfig(str(run), str(tmp_path / "export"), conn))
    assert keys(tmp_path / "export" / "cloud.safetensors") == keys(final)
    local = load_trained(str(tmp_path / "export")).predict([r["opinion"] for r in remote])
    for a, b in zip(local, remote):
        assert a["prediction"] == b["prediction"]
        assert a["probabilities"]["good"] == pytest.approx(float(b["probability_good"]), abs=1e-5)

    local_report = _train(
        tmp_path, "unused:1", local=True, peft="lora", lora_rank=4, output_dir=str(tmp_path / "lrun")
    )
    preds = load_trained(str(tmp_path / "lrun")).predict([r["opinion"] for r in remote])
    accuracy = sum(p["prediction"] == g for p, g in zip(preds, gold)) / 12
    assert accuracy == pytest.approx(local_report["metrics"]["accuracy"])
    saved = keys(tmp_path / "lrun" / "model.safetensors")
    assert saved and all("lora_" in k or k.startswith(("bert.pooler.", "classifier.")) for k in saved), saved
