"""`sft-edge export` of a `--forward-only --adapters parallel` run: the frozen U and its side network, with no daemon.

A parallel run trains a side network beside the frozen base (and a classifier's task head), so its
export is built here from the base and the run's files (``sft_edge.finished.side_parts``). Trained
through a real daemon at ``--wire-dtype fp32`` (a rounding wire would put the daemon's answers off
the export's by its rounding), the export predicts and generates with no daemon what the run does
through the daemon: the same predictions and probabilities within 1e-5 (tiny BERT), the same greedy
tokens, KV-cached or recomputed, and next-token probabilities within 1e-5 (tiny Llama). The
reference is the daemon's recomputing path (``--no-kv-cache``); its KV-cached path, the daemon
returning the middle's taps with each decoded row, is compared in tests/test_parallel_generate_grpc.py.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from helpers import write_completion_rows, write_reviews
from safetensors.torch import load_file, save_file

from sft_edge import cli
from sft_edge.data.glue import DataError
from sft_edge.finished.cached import open_cached
from sft_edge.finished.generate import generate, prompt_ids, recompute
from sft_edge.finished.parts import open_model
from sft_edge.finished.predict import export
from sft_edge.finished.record import USHAPE_SIDE, read_run
from sft_edge.runs.config import Connection, ExportConfig, GenerateConfig

PROMPT = "red green blue"
NO_DAEMON = Connection(cloud="127.0.0.1:1", insecure=True)  # nothing listens there


PARALLEL = ["--forward-only", "--adapters", "parallel", "--wire-dtype", "fp32", "--no-progress"]


def _train(tmp_path, address, data, steps=8):
    """A parallel run of ``steps`` steps through the daemon at ``address``; ``data``: its data flags."""
    run = str(tmp_path / "run")
    steps_and_rate = ["--max-steps", str(steps), "--lr", "1e-2", "--batch-size", "4"]
    argv = ["train", *data, *steps_and_rate, *PARALLEL, "--cloud", address, "--insecure", "--output-dir", run]
    assert cli.main(argv) == 0
    return run


def _lm_data(tmp_path, rows=16):
    train = write_completion_rows(tmp_path / "train.jsonl", rows)
    dev = write_completion_rows(tmp_path / "dev.jsonl", 4, 50)
    return [
        "--problem",
        "causal-lm",
        "--model",
        "random:tiny-llama",
        "--train-file",
        train,
        "--dev-file",
        dev,
    ]


def _export(run, to):
    """The run's export, made with no daemon; its record says it holds the side network."""
    export(ExportConfig(run, to, NO_DAEMON))
    record = read_run(to)
    assert (record.part, record.weight_files) == (USHAPE_SIDE, ["edge.safetensors", "cloud.safetensors"])
    assert not os.path.exists(os.path.join(to, "activation_cache"))
    assert any(k.startswith("side.") for k in load_file(os.path.join(to, "edge.safetensors")))
    return record


def test_parallel_lm_export_generates_as_through_the_daemon(tmp_path, live_server):
    """Tiny Llama: the export's greedy tokens (KV-cached and recomputed) are the daemon's, its
    next-token probabilities within 1e-5 of the daemon's, and the side network is in them."""
    from transformers import AutoTokenizer

    address, _ = live_server
    run = _train(tmp_path, address, _lm_data(tmp_path))
    conn = Connection(cloud=address, insecure=True)
    daemon = generate(GenerateConfig(run, PROMPT, max_new_tokens=6, connection=conn, kv_cache=False))
    to = str(tmp_path / "export")
    record = _export(run, to)
    for kv_cache in (True, False):
        alone = generate(
            GenerateConfig(to, PROMPT, max_new_tokens=6, connection=NO_DAEMON, kv_cache=kv_cache)
        )
        assert alone["tokens"] == daemon["tokens"] and len(daemon["tokens"]) == 6, kv_cache

    ids = prompt_ids(AutoTokenizer.from_pretrained(run), PROMPT, chat=False) + daemon["tokens"][:3]
    through = open_model(run, read_run(run), "cpu", conn)
    here = open_model(to, record)
    with torch.no_grad():
        try:
            want = recompute(through.logits)(ids)
        finally:
            through.close()
        got = recompute(here.logits)(ids)
        assert (
            float((got - want).abs().max()) <= 1e-5
        )  # the logits: a near-uniform vocabulary's p differ less
        assert float((torch.softmax(got, -1) - torch.softmax(want, -1)).abs().max()) <= 1e-5
        cached = open_cached(to, record)  # the KV-cached path: the prompt's rows, then one row a token
        cached.next_logits(ids[:-2]), cached.next_logits(ids[:-1])
        assert float((cached.next_logits(ids) - want).abs().max()) <= 1e-5
        here.module.side.up.weight.zero_(), here.module.side.up.bias.zero_()
        # without its side network the export would be another model
        assert float((recompute(here.logits)(ids) - want).abs().max()) > 1e-3


def test_parallel_classifier_export_predicts_as_through_the_daemon_and_reloads(tmp_path, live_server):
    """Tiny BERT: `sft-edge predict` from the export (no daemon) = through the daemon (labels,
    probabilities within 1e-5), and ``load_trained`` gives the same."""
    from sft_edge.finished.trained import load_trained

    address, _ = live_server
    dev = write_reviews(tmp_path / "dev.csv", 8, 100)
    train = write_reviews(tmp_path / "train.csv", 24)
    columns = ["--text-columns", "opinion", "--label-column", "verdict"]
    run = _train(
        tmp_path, address, ["--model", "random:tiny", "--train-file", train, "--dev-file", dev, *columns]
    )
    asked = ["predict", "--input", dev, "--insecure"]
    assert cli.main([*asked, "--run", run, "--output", str(tmp_path / "d.csv"), "--cloud", address]) == 0
    to = str(tmp_path / "export")
    assert cli.main(["export", "--run", run, "--to", to, "--cloud", NO_DAEMON.cloud, "--insecure"]) == 0
    assert read_run(to).part == USHAPE_SIDE
    assert (
        cli.main([*asked, "--run", to, "--output", str(tmp_path / "h.csv"), "--cloud", NO_DAEMON.cloud]) == 0
    )
    daemon, alone = (list(csv.DictReader(open(tmp_path / n, newline=""))) for n in ("d.csv", "h.csv"))
    reloaded = load_trained(to).predict([(r["opinion"],) for r in daemon])
    assert len(daemon) == len(alone) == len(reloaded) == 8
    for d, a, r in zip(daemon, alone, reloaded):
        assert d["prediction"] == a["prediction"] == r["prediction"]
        for label in ("good", "bad"):
            p = float(d[f"probability_{label}"])
            assert float(a[f"probability_{label}"]) == pytest.approx(p, abs=1e-5)
            assert r["probabilities"][label] == pytest.approx(p, abs=1e-5)
    assert len({round(float(d["probability_good"]), 6) for d in daemon}) > 1  # not one constant answer


def test_export_refuses_a_run_whose_side_network_is_incomplete(tmp_path, live_server):
    """An edge file that lacks part of the side network is refused, not filled from a fresh start."""
    address, _ = live_server
    run = _train(tmp_path, address, _lm_data(tmp_path, rows=4), steps=1)
    path = os.path.join(run, "edge.safetensors")
    saved = load_file(path)
    save_file({k: v for k, v in saved.items() if not k.startswith("side.up.")}, path)
    with pytest.raises(DataError, match="missing: \\['side.up.bias', 'side.up.weight'\\]"):
        export(ExportConfig(run, str(tmp_path / "export"), NO_DAEMON))
    assert json.loads(open(os.path.join(run, "sft_edge.json")).read())["adapters"] == "parallel"
