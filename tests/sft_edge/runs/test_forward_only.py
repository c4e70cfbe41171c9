"""`sft-edge train --forward-only` end to end through a real daemon: activations cross once, nothing comes back up.

The daemon runs in this process and records every message it is handed. A forward-only run sends
each training and dev example's first-cut activations once (``EvalStep``s: no step, label, loss or
gradient), trains its tail on the cached answers, resumes bit-identically, and generates through
the daemon as its parts do in one process.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LM_WORDS, interrupt_then_resume, write_reviews

from sft_edge import cli
from sft_edge.finished import predict
from sft_edge.finished.predict import export
from sft_edge.runs.config import Connection, ExportConfig, GenerateConfig, PredictConfig, TrainConfig

ALLOWED = {"batch", "lengths", "dtype", "shape", "data", "compression", "scale", "scales"}


def write_completion_rows(path, n: int, offset: int = 0) -> str:
    """``n`` distinct prompt/completion rows (helpers' repeat every 8: a cache would hide the count)."""
    with open(path, "w") as f:
        for k in range(offset, offset + n):
            words = [LM_WORDS[(k + j) % len(LM_WORDS)] for j in range(3)]
            row = {"prompt": f"{' '.join(words)} {k}", "completion": " ".join(reversed(words))}
            f.write(json.dumps(row) + "\n")
    return str(path)


def _leaves(msg):
    out = set()
    for field, value in msg.ListFields():
        out |= _leaves(value) if hasattr(value, "ListFields") else {field.name}
    return out


def test_forward_only_lm_sends_each_example_once_and_generates_as_in_one_process(tmp_path, recorded):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sft_common.models.base_model import load_base_model
    from sft_common.models.lora import LoraSpec
    from sft_common.storage.checkpoint import load_owned
    from sft_common.topology.ushape import UShapeSpec, lora_part
    from sft_common.topology.ushape_lm import build_ushape_lm_model
    from sft_edge.finished.generate import decode, generate, prompt_ids

    address, registry, messages = recorded
    run = str(tmp_path / "run")
    argv = [
        "train", "--problem", "causal-lm", "--train-file", write_completion_rows(tmp_path / "train.jsonl", 24),
        "--dev-file", write_completion_rows(tmp_path / "dev.jsonl", 6, 100), "--cloud", address, "--insecure",
        "--model", "random:tiny-llama", "--batch-size", "4", "--max-steps", "12", "--lr", "1e-3",
        "--forward-only", "--peft", "lora", "--wire-dtype", "fp32", "--output-dir", run,
        "--report", str(tmp_path / "r.json"), "--checkpoint-every", "3", "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == 12 and report["cloud_steps"] == 0 and report["forward_only"] is True
    assert report["mode"] == "sl" and report["adapters"] == "tail" and len(report["eval_history"]) == 3
    kinds = [m.WhichOneof("kind") for m, _ in messages]
    # one evaluation per batch of the first epoch's 24 rows and of the 6 dev rows; nothing after
    assert kinds == ["open"] + ["eval"] * (6 + 2) + ["close"], kinds
    assert messages[0][0].open.config.forward_only and not messages[0][0].open.config.lora_rank
    for msg, reply in messages[1:]:
        assert _leaves(msg) <= ALLOWED, _leaves(msg)
        assert not reply.eval.HasField("logits")
    assert len(list((tmp_path / "run" / "activation_cache").glob("*.safetensors"))) == 24 + 6
    assert json.loads((tmp_path / "run" / "sft_edge.json").read_text())["forward_only"] is True

    conn = Connection(cloud=address, insecure=True)
    out = generate(GenerateConfig(run, "red green blue", max_new_tokens=5, connection=conn))
    base = load_base_model("random:tiny-llama")
    head, middle, tail = build_ushape_lm_model(base, UShapeSpec(0, 8, 1, "sl"), seed=42)
    lora_part(tail, "tail", LoraSpec().resolved(base.config.model_type), 42)
    head.requires_grad_(False)  # frozen, as on the edge: the run saved none of it
    load_owned(torch.nn.ModuleDict({"head": head, "tail": tail}), load_file(f"{run}/edge.safetensors"))
    for part in (head, middle, tail):
        part.eval()

    def here(batch):
        with torch.no_grad():
            cut, _ = head(batch.input_ids, batch.attention_mask)
            return tail(middle(cut, batch.attention_mask)[0], batch.attention_mask)

    ids = prompt_ids(AutoTokenizer.from_pretrained(run), "red green blue", chat=False)
    assert out["tokens"] == decode(here, ids, 5, 128) and len(out["tokens"]) == 5
    assert len(registry) == 0  # every forward-only session closed
    # export needs no daemon (the head and middle are the base's); it generates the same here
    export(ExportConfig(run, str(tmp_path / "export"), Connection(cloud="127.0.0.1:1", insecure=True)))
    assert not (tmp_path / "export" / "activation_cache").exists()
    alone = generate(GenerateConfig(str(tmp_path / "export"), "red green blue", max_new_tokens=5))
    assert alone["tokens"] == out["tokens"]


def test_forward_only_classification_predicts_through_the_daemon_and_after_export(tmp_path, recorded):
    """Tiny BERT, full fine-tuning of the tail: predict through the daemon = the evaluation at the
    end of training = the export's predictions here."""
    import csv

    from sft_edge.finished.trained import load_trained

    address, _, messages = recorded
    run, dev = str(tmp_path / "run"), write_reviews(tmp_path / "dev.csv", 12, 100)
    argv = [
        "train", "--train-file", write_reviews(tmp_path / "train.csv", 40), "--dev-file", dev,
        "--text-columns", "opinion", "--label-column", "verdict", "--cloud", address, "--insecure",
        "--model", "random:tiny", "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--forward-only",
        "--tail-layers", "2", "--output-dir", run, "--report", str(tmp_path / "r.json"), "--no-progress",
        "--wire-dtype", "fp32",  # (the default, int8, is off the export's exact numbers by its rounding)
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cloud_steps"] == 0 and report["wire_dtype"] == "fp32" and report["tail_layers"] == 2
    assert "gradient" not in json.dumps(report["privacy"]["crossed"])
    conn = Connection(cloud=address, insecure=True)
    assert predict.predict(PredictConfig(run, dev, str(tmp_path / "p.csv"), conn)) == 12
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gold = [r["verdict"] for r in csv.DictReader(open(dev, newline=""))]
    accuracy = sum(r["prediction"] == g for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(report["metrics"]["accuracy"])
    export(ExportConfig(run, str(tmp_path / "export"), conn))
    here = load_trained(str(tmp_path / "export")).predict([(r["opinion"],) for r in rows])
    for h, r in zip(here, rows):
        assert h["prediction"] == r["prediction"]
        assert h["probabilities"]["good"] == pytest.approx(float(r["probability_good"]), abs=1e-5)


def test_forward_only_parallel_classification_predicts_through_the_daemon(tmp_path, recorded):
    """Tiny BERT, --adapters parallel: the side network and the task head are all the run saves, and
    predict through the daemon is the evaluation at the end of training."""
    import csv

    from safetensors.torch import load_file

    address, _, _ = recorded
    run, dev = str(tmp_path / "run"), write_reviews(tmp_path / "dev.csv", 12, 100)
    argv = [
        "train", "--train-file", write_reviews(tmp_path / "train.csv", 40), "--dev-file", dev,
        "--text-columns", "opinion", "--label-column", "verdict", "--cloud", address, "--insecure",
        "--model", "random:tiny", "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--forward-only",
        "--adapters", "parallel", "--output-dir", run, "--report", str(tmp_path / "r.json"), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cloud_steps"] == 0 and report["adapters"] == "parallel"
    heads = {k.split(".")[1] for k in load_file(f"{run}/edge.safetensors") if k.startswith("tail.")}
    assert heads == {"pooler", "classifier"}  # the task head; the tail's layers stay the base's
    conn = Connection(cloud=address, insecure=True)
    assert predict.predict(PredictConfig(run, dev, str(tmp_path / "p.csv"), conn)) == 12
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gold = [r["verdict"] for r in csv.DictReader(open(dev, newline=""))]
    accuracy = sum(r["prediction"] == g for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(report["metrics"]["accuracy"])


@pytest.mark.parametrize("adapters", ["tail", "parallel"])
def test_forward_only_resume_ends_as_an_uninterrupted_run(tmp_path, recorded, monkeypatch, adapters):
    """Ctrl-C at step 4, then --resume: the tail bit-identical to a run never stopped, and the
    resumed run sends only the examples the cut one had not cached."""
    from safetensors.torch import load_file

    from sft_edge.runs.trainer import train
    from sft_edge.sessions.forward_only import ForwardOnlySession

    address, _, messages = recorded
    values = dict(
        problem="causal-lm", train_file=write_completion_rows(tmp_path / "train.jsonl", 24),
        dev_file=write_completion_rows(tmp_path / "dev.jsonl", 6, 100), cloud=address, insecure=True,
        model="random:tiny-llama", batch_size=4, max_steps=9, lr=1e-3, forward_only=True,
        checkpoint_every=3, progress=False, adapters=adapters,
    )  # fmt: skip
    whole = train(TrainConfig(output_dir=str(tmp_path / "whole"), **values))
    sent_whole = sum(m.WhichOneof("kind") == "eval" for m, _ in messages)
    del messages[:]
    resumed = interrupt_then_resume(monkeypatch, ForwardOnlySession, values, tmp_path / "cut")
    assert resumed["eval_history"] == whole["eval_history"] and resumed["resumes"] == 1
    a, b = (load_file(str(tmp_path / n / "edge.safetensors")) for n in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(m.WhichOneof("kind") == "eval" for m, _ in messages) == sent_whole  # none sent twice


def test_forward_only_parallel_trains_a_side_network_and_generates_through_the_daemon(tmp_path, recorded):
    """--adapters parallel, tiny Llama: the run saves the side network alone (the backbone and the
    LM head stay the base's), each example crosses once with the middle's taps coming back, and
    generation through the daemon is the frozen parts with the saved side network in one process,
    recomputed or KV-cached (tests/test_parallel_generate_grpc.py compares the two further)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sft_common.models.base_model import load_base_model
    from sft_common.topology.side import SideNetwork, middle_taps, side_projection
    from sft_common.topology.ushape import UShapeSpec
    from sft_common.topology.ushape_lm import build_ushape_lm_model
    from sft_common.training import step_seed
    from sft_edge.finished.generate import decode, generate, prompt_ids

    address, registry, messages = recorded
    run = str(tmp_path / "run")
    argv = [
        "train", "--problem", "causal-lm", "--train-file", write_completion_rows(tmp_path / "train.jsonl", 24),
        "--dev-file", write_completion_rows(tmp_path / "dev.jsonl", 6, 100), "--cloud", address, "--insecure",
        "--model", "random:tiny-llama", "--batch-size", "4", "--max-steps", "12", "--lr", "1e-2",
        "--forward-only", "--adapters", "parallel", "--wire-dtype", "fp32", "--output-dir", run,
        "--report", str(tmp_path / "r.json"), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["steps"] == 12 and report["cloud_steps"] == 0 and report["adapters"] == "parallel"
    kinds = [m.WhichOneof("kind") for m, _ in messages]
    assert kinds == ["open"] + ["eval"] * (6 + 2) + ["close"], kinds
    assert messages[0][0].open.config.side_width == 32
    for msg, reply in messages[1:-1]:
        assert _leaves(msg) <= ALLOWED, _leaves(msg)
        assert reply.eval.HasField("side")
    assert (
        json.loads((tmp_path / "run" / "activation_cache" / "cache.json").read_text())["identity"][
            "side_width"
        ]
        == 32
    )
    saved = load_file(f"{run}/edge.safetensors")
    assert saved and all(k.startswith("side.") for k in saved)
    assert json.loads((tmp_path / "run" / "sft_edge.json").read_text())["adapters"] == "parallel"

    conn = Connection(cloud=address, insecure=True)
    out = generate(GenerateConfig(run, "red green blue", max_new_tokens=5, connection=conn, kv_cache=False))
    base = load_base_model("random:tiny-llama")
    head, middle, tail = build_ushape_lm_model(base, UShapeSpec(0, 8, 1, "sl"), seed=42)
    projection = side_projection(base.fingerprint, 32, 32)
    side = SideNetwork(32, len(middle.layers), projection, step_seed(42, "edge-side", 0))
    side.load_state_dict({k[len("side.") :]: v for k, v in saved.items()})
    assert side.up.weight.abs().max() > 0  # it trained
    for part in (head, middle, tail, side):
        part.eval()

    def here(batch):
        with torch.no_grad():
            cut, _ = head(batch.input_ids, batch.attention_mask)
            second, taps = middle_taps(middle, cut, batch.attention_mask, projection)
            return tail(second + side(torch.cat([cut @ projection, taps], -1)), batch.attention_mask)

    ids = prompt_ids(AutoTokenizer.from_pretrained(run), "red green blue", chat=False)
    assert out["tokens"] == decode(here, ids, 5, 128) and len(out["tokens"]) == 5
    cached = generate(GenerateConfig(run, "red green blue", max_new_tokens=5, connection=conn))
    assert cached["tokens"] == out["tokens"]
    assert len(registry) == 0  # every forward-only session closed


def test_forward_only_with_dp_noise_noises_each_example_once_and_keys_its_cache_by_the_noise(
    tmp_path, recorded
):
    """``--dp-noise``: the report names the defence on the activations and one release an example
    (two epochs, each example sent once); the cache is keyed by the noise, so a run over the same
    folder with another noise is refused before anything is sent."""
    address, _, messages = recorded
    run = str(tmp_path / "run")

    def argv(noise):
        return [
            "train", "--train-file", write_reviews(tmp_path / "train.csv", 24), "--dev-file",
            write_reviews(tmp_path / "dev.csv", 8, 100), "--text-columns", "opinion", "--label-column",
            "verdict", "--cloud", address, "--insecure", "--model", "random:tiny", "--batch-size", "8",
            "--epochs", "2", "--forward-only", "--dp-noise", noise, "--dp-clip", "5", "--output-dir", run,
            "--report", str(tmp_path / "r.json"), "--no-progress",
        ]  # fmt: skip

    assert cli.main(argv("0.5")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    defence = report["privacy"]["defence"]
    assert defence["activations"] == {"noise": 0.5, "clip": 5.0} and defence["gradient_up"] is None
    # two epochs, but each example crossed once: one Gaussian release (the U's would be two)
    from sft_edge.privacy.defence import Defence
    from sft_edge.runs.config import DPOptions

    assert defence["releases"] == 1
    assert defence["epsilon"] == pytest.approx(Defence.of(DPOptions(noise=0.5, clip=5.0)).epsilon(1, 1.0))
    assert defence["epsilon"] < Defence.of(DPOptions(noise=0.5, clip=5.0)).epsilon(2, 1.0)
    evals = [m.eval for m, _ in messages if m.WhichOneof("kind") == "eval"]
    cached = list((tmp_path / "run" / "activation_cache").glob("*.safetensors"))
    assert sum(len(e.lengths) for e in evals) == len(cached)  # each distinct example crossed once
    identity = json.loads((tmp_path / "run" / "activation_cache" / "cache.json").read_text())["identity"]
    assert identity["dp_noise"] == [0.5, 5.0, 42]
    sent = len(messages)
    assert cli.main(argv("1.0")) == 2
    assert len(messages) == sent


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--forward-only", "--mode", "sft"], "--forward-only sends the full width"),
        (["--forward-only", "--micro-batches", "2"], "does not go with --local, --micro-batches"),
        (["--forward-only", "--adapters", "side"], "--adapters must be one of tail, parallel, got 'side'"),
        (["--forward-only", "--adapters", "parallel", "--peft", "lora"], "no --peft lora"),
        (["--forward-only", "--activation-cache-mb", "-1"], "--activation-cache-mb must be >= 0"),
        (
            ["--forward-only", "--dp-grad-noise", "1", "--dp-grad-clip", "1"],
            "--forward-only sends no gradient",
        ),
    ],
)
def test_bad_forward_only_flags_are_refused_at_once(capsys, extra, message):
    assert cli.main(["train", "--task", "sst2", "--insecure", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_forward_only_run_whose_rows_are_all_cached_needs_no_daemon(tmp_path, recorded, monkeypatch, capfd):
    """The second run reads every row from the first one's activation cache: with no daemon at
    its --cloud it warns and trains, opening no stream; a row not cached would need one, and the
    link's error comes then, saying why."""
    import shutil

    from sft_edge.link import credentials

    check = credentials.check_connection
    monkeypatch.setattr(credentials, "check_connection", lambda *a, **k: check(*a, **{**k, "timeout": 1.0}))
    address, _, messages = recorded
    train, dev = (
        write_completion_rows(tmp_path / "t.jsonl", 12),
        write_completion_rows(tmp_path / "d.jsonl", 4, 50),
    )

    def argv(cloud, run, lr="1e-3", rows=train):
        return [
            "train", "--problem", "causal-lm", "--train-file", rows, "--dev-file", dev, "--cloud", cloud,
            "--insecure", "--model", "random:tiny-llama", "--batch-size", "4", "--epochs", "2", "--lr", lr,
            "--forward-only", "--output-dir", run, "--report", f"{run}.json", "--no-progress",
        ]  # fmt: skip

    assert cli.main(argv(address, str(tmp_path / "first"))) == 0
    sent = len(messages)
    shutil.copytree(tmp_path / "first" / "activation_cache", tmp_path / "second" / "activation_cache")
    capfd.readouterr()
    assert cli.main(argv("127.0.0.1:1", str(tmp_path / "second"), lr="2e-3")) == 0
    report = json.loads((tmp_path / "second.json").read_text())
    assert report["bytes_sent"] == report["bytes_received"] == 0 and len(messages) == sent
    assert report["steps"] == 6 and "going on; a stream will be opened" in capfd.readouterr().err
    other = write_completion_rows(tmp_path / "other.jsonl", 4, 200)  # rows the cache lacks
    shutil.copytree(tmp_path / "first" / "activation_cache", tmp_path / "third" / "activation_cache")
    assert cli.main(argv("127.0.0.1:1", str(tmp_path / "third"), rows=other)) == 2
    assert "no sft-cloud daemon answered at 127.0.0.1:1" in capfd.readouterr().err
