"""bench.batched_steps runs on a tiny decoder and writes its table (the numbers are docs/benchmarks.md's)."""

from __future__ import annotations

import json


def test_batched_steps_benchmark_runs_on_a_tiny_decoder(tmp_path, capsys):
    from bench import batched_steps

    argv = ["--models", "random:tiny-llama", "--sessions", "1", "3", "--steps", "2", "--window-ms", "50"]
    assert batched_steps.main(argv + ["--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "batched_steps.json").read_text())
    rows = result["rows"]
    assert [r["sessions"] for r in rows] == [1, 3]
    assert result["conditions"]["rows"] == 4 and result["conditions"]["seq"] == 64
    for row in rows:
        assert row["alone_steps_per_s"] > 0 and row["batched_steps_per_s"] > 0
        assert row["speedup"] == row["batched_steps_per_s"] / row["alone_steps_per_s"]
        assert row["compute_alone_s"] > 0 and row["compute_batched_s"] > 0
    assert rows[0]["mean_batch"] == 1.0  # one session alone is never batched
    assert rows[1]["mean_batch"] > 1.0  # three sessions stepping together are
    assert "batched_steps_per_s" in capsys.readouterr().out


def test_batched_evaluations_benchmark_runs_on_a_tiny_decoder(tmp_path, capsys):
    """--phase eval: forward-only sessions' evaluations, in results/batched_evals.json."""
    from bench import batched_steps

    argv = ["--phase", "eval", "--models", "random:tiny-llama", "--sessions", "1", "3", "--steps", "2"]
    assert batched_steps.main(argv + ["--window-ms", "50", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "batched_evals.json").read_text())
    rows = result["rows"]
    assert [r["sessions"] for r in rows] == [1, 3] and result["conditions"]["phase"] == "eval"
    for row in rows:
        assert row["speedup"] == row["batched_evals_per_s"] / row["alone_evals_per_s"]
        assert row["alone_eval_s"] > 0 and row["compute_batched_s"] > 0
    assert rows[0]["mean_batch"] == 1.0
    assert rows[1]["mean_batch"] > 1.0
    assert "batched_evals_per_s" in capsys.readouterr().out
