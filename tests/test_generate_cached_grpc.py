"""`sft-edge generate` with KV caches through a real gRPC daemon and after export: today's tokens.

A U causal-LM run trained through a daemon on a free localhost port, then generated from four ways:
through the daemon with the caches (the middle's kept by the daemon for the stream) and without
(each token recomputing the whole sequence: EvalStep), and from its export with and without. The
greedy tokens are the same; through the daemon, after the prompt each token sends one row of the
first cut and gets one row of the second; the plain CLI prints the text as it comes.
"""

from __future__ import annotations

import json

import pytest
from helpers import write_completion_rows

from sft_edge import cli
from sft_edge.finished import predict
from sft_edge.finished.generate import generate
from sft_edge.runs.config import Connection, ExportConfig, GenerateConfig

PROMPT = "red green blue"
NEW = 10


def _train(tmp_path, address, model, mode):
    run = str(tmp_path / "run")
    argv = [
        "train", "--problem", "causal-lm", "--train-file", write_completion_rows(tmp_path / "train.jsonl", 8),
        "--dev-file", write_completion_rows(tmp_path / "dev.jsonl", 4, 100), "--model", model,
        "--batch-size", "4", "--max-steps", "2", "--lr", "1e-3", "--no-progress", "--output-dir", run,
        "--report", str(tmp_path / "r.json"), "--label-private", "--cloud", address, "--insecure",
        "--mode", mode, "--wire-dtype", "fp32",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return run, json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize(
    "model, mode, width",
    [("random:tiny-llama", "sft", 8), ("random:tiny-gpt2", "sft", 8), ("random:tiny-llama", "sl", 32)],
)
def test_cached_generation_through_the_daemon_and_after_export_gives_todays_tokens(
    tmp_path, recorded, capsys, model, mode, width
):
    """fp32 on the wire: each row crosses as it is, so both paths feed the parts the same values
    (a wire whose encoding of a row depends on the rows sent with it, int4-hadamard's outlier rows,
    can change a token)."""
    address, _, messages = recorded
    run, report = _train(tmp_path, address, model, mode)
    conn = Connection(cloud=address, insecure=True)
    del messages[:]
    pieces: list = []
    cached = generate(GenerateConfig(run, PROMPT, NEW, connection=conn), on_text=pieces.append)
    decodes = [m.decode for m, _ in messages if m.WhichOneof("kind") == "decode"]
    assert not any(r.decoded.HasField("side") for _, r in messages if r.WhichOneof("kind") == "decoded")
    recomputed = generate(GenerateConfig(run, PROMPT, NEW, connection=conn, kv_cache=False))
    assert cached["tokens"] == recomputed["tokens"] and len(cached["tokens"]) == NEW
    assert cached["completion"] == recomputed["completion"] == "".join(pieces)
    prompt = cached["prompt_tokens"]
    assert [list(d.activations.shape) for d in decodes] == [[prompt, width]] + [[1, width]] * (NEW - 1)
    evals = [m.eval for m, _ in messages if m.WhichOneof("kind") == "eval"]
    assert [e.lengths[0] for e in evals] == list(range(prompt, prompt + NEW))  # the recomputing path

    capsys.readouterr()
    argv = ["generate", "--run", run, "--prompt", PROMPT, "--max-new-tokens", str(NEW)]
    assert cli.main(argv + ["--cloud", address, "--insecure"]) == 0
    assert capsys.readouterr().out == cached["completion"] + "\n"

    out = str(tmp_path / "export")
    predict.export(ExportConfig(run, out, conn))
    here = generate(GenerateConfig(out, PROMPT, NEW))  # no daemon
    here_recomputed = generate(GenerateConfig(out, PROMPT, NEW, kv_cache=False))
    assert here["tokens"] == here_recomputed["tokens"] == cached["tokens"]
