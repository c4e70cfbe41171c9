"""Crashes of real processes in a forward-only run: `kill -9` of the daemon (then a restart) or of
the edge (then `--resume`) end with the edge's weights and metrics bit-identical to an uninterrupted
run. The daemon holds nothing of a forward-only run: after its restart the edge opens a new session
and sends the evaluation in flight again; the edge's `--resume` reads the rows it cached."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
from daemon import ROOT, start_daemon, stop_daemon
from safetensors.torch import load_file
from test_crash_resume import EVERY, STEPS, _wait_for


def edge_cmd(port, glue_dir, out, *extra):
    return [
        sys.executable, "-m", "sft_edge.cli", "train", "--task", "sst2", "--data-dir", glue_dir,
        "--cloud", f"127.0.0.1:{port}", "--insecure", "--no-progress", "--model", "random:tiny",
        "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "8",
        "--max-train-examples", "160", "--max-eval-examples", "48", "--lr", "1e-3", "--forward-only",
        "--tail-layers", "2", "--output-dir", str(out), "--report", str(out / "report.json"),
        "--reconnect-timeout", "300", *extra,
    ]  # fmt: skip


def run_edge(cmd, timeout=600):  # generous: CI machines are shared
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def assert_same_run(ref_dir, run_dir):
    ref = json.loads((ref_dir / "report.json").read_text())
    run = json.loads((run_dir / "report.json").read_text())
    assert run["steps"] == ref["steps"] == STEPS and run["cloud_steps"] == ref["cloud_steps"] == 0
    assert run["metrics"] == ref["metrics"] and run["eval_history"] == ref["eval_history"]
    a, b = load_file(ref_dir / "edge.safetensors"), load_file(run_dir / "edge.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return run


def test_forward_only_cloud_killed_and_restarted(glue_dir, tmp_path):
    proc, port = start_daemon(["--insecure"])
    try:
        run_edge(edge_cmd(port, glue_dir, tmp_path / "ref"))
        edge = subprocess.Popen(edge_cmd(port, glue_dir, tmp_path / "run"), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        # mid first epoch (20 steps an epoch): rows still cross
        _wait_for(str(tmp_path / "run" / "checkpoints" / f"step-{EVERY:09d}.safetensors"), 300)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc, _ = start_daemon(["--insecure", "--port", str(port)])
        output, _ = edge.communicate(timeout=600)
        assert edge.returncode == 0, output[-3000:]
        assert "re-attached to session" in output
        assert assert_same_run(tmp_path / "ref", tmp_path / "run")["resumes"] >= 1
    finally:
        stop_daemon(proc)


@pytest.mark.slow
def test_forward_only_edge_killed_and_resumed(glue_dir, tmp_path):
    proc, port = start_daemon(["--insecure"])
    try:
        run_edge(edge_cmd(port, glue_dir, tmp_path / "ref"))
        edge = subprocess.Popen(edge_cmd(port, glue_dir, tmp_path / "run"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for(str(tmp_path / "run" / "checkpoints" / f"step-{2 * EVERY:09d}.safetensors"))
        edge.send_signal(signal.SIGKILL)
        edge.wait()
        run_edge(edge_cmd(port, glue_dir, tmp_path / "run", "--resume"))
        assert assert_same_run(tmp_path / "ref", tmp_path / "run")["resumes"] == 1
    finally:
        stop_daemon(proc)
