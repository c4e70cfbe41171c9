"""bench.forward_only on a tiny decoder: it runs each setting through its own daemon and reports what it measured."""

from __future__ import annotations

import json

from bench import forward_only


def test_forward_only_bench_measures_bytes_and_cloud_compute(tmp_path, glue_dir):
    settings = ["U (backprop), fp32", "forward-only, fp32"]
    argv = [
        "--model", "random:tiny-llama", "--data", str(tmp_path / "data"), "--rows", "8", "--dev-rows", "4",
        "--epochs", "2", "--work", str(tmp_path / "work"), "--out-dir", str(tmp_path), "--only", *settings,
    ]  # fmt: skip
    assert forward_only.main(argv) == 0
    rows = {r["setting"]: r for r in json.loads((tmp_path / "forward_only.json").read_text())["rows"]}
    u, forward = rows["U (backprop), fp32"], rows["forward-only, fp32"]
    # over two epochs the U sends activations and gradients every step; forward-only sends each
    # training and dev row's activations once
    assert 0 < forward["bytes_sent"] < u["bytes_sent"] / 3
    assert 0 < forward["cloud_s_per_epoch"] and 0 < u["cloud_s_per_epoch"]
    assert forward["edge_peak_mib"] > 0 and forward["step0_perplexity"] == u["step0_perplexity"]
