"""bench/generate_speed.py runs on a tiny model: both variants' tokens equal, the cached one's bytes
a token do not grow with the length (one row each way), the recomputing one's do."""

from __future__ import annotations

import json

from bench import generate_speed


def test_generate_speed_runs_and_the_cached_bytes_stay_flat(tmp_path):
    argv = ["--models", "random:tiny-llama", "--lengths", "4", "12", "--prompt-tokens", "6"]
    assert generate_speed.main(argv + ["--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "generate_speed.json").read_text())["rows"]
    by = {(r["variant"], r["new_tokens"]): r for r in rows}
    assert set(by) == {("cached", 4), ("cached", 12), ("recompute", 4), ("recompute", 12)}
    # after the prompt, a token's DecodeStep and its answer are the same size at any length
    assert by["cached", 12]["bytes_per_token"] < by["cached", 4]["bytes_per_token"]
    assert by["recompute", 12]["bytes_per_token"] > by["recompute", 4]["bytes_per_token"]
    assert by["cached", 12]["bytes_ratio"] > 5 and by["recompute", 12]["speedup"] == 1
