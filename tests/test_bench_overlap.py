"""bench.overlap on a tiny case: two namespaces, a shaped link, whole steps against micro-batches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_bench import ROOT, _can_make_netns


@pytest.mark.skipif(not _can_make_netns(), reason="needs root, ip and tc (network namespaces)")
def test_overlap_benchmark_end_to_end(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.overlap", "--model", "random:tiny", "--kind", "fixed",
                    "--batch-size", "4", "--seq", "8", "--steps", "1", "--warmup", "0", "--rates", "100",
                    "--configs", "sft:2", "sl:3", "--micro", "1", "2", "--depths", "2", "--out-dir", str(tmp_path)],
                   check=True, cwd=ROOT)  # fmt: skip
    rows = json.loads((tmp_path / "overlap.json").read_text())["rows"]
    assert [(r["mode"], r["micro"]) for r in rows] == [("sft", 1), ("sft", 2), ("sl", 1), ("sl", 2)]
    assert all(r["step_s"] > 0 and r["bytes_per_step"] > 0 for r in rows)
    assert [r["speedup"] for r in rows if r["micro"] == 1] == [1.0, 1.0]
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "sftb-" not in names  # the namespaces were removed
