"""Delta mode survives crashes of real processes: `kill -9` of the daemon mid-epoch 2 (then a
restart), or of the edge (then `--resume`), end with both sides' weights and the metrics bitwise
equal to an uninterrupted delta run. Tiny Llama + LoRA, the U (both cuts in delta mode), 3 epochs
of 6 steps: each side's caches are in its checkpoints, so both roll back to the same rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from daemon import ROOT, start_daemon, stop_daemon
from safetensors.torch import load_file
from test_crash_resume import _wait_for

STEPS, EVERY = 18, 4  # 6 steps an epoch: the checkpoint after step 8 is mid-epoch 2


def _edge_cmd(port, glue_dir, out, *extra):
    return [
        sys.executable, "-m", "sft_edge.cli", "train", "--task", "sst2", "--data-dir", glue_dir,
        "--cloud", f"127.0.0.1:{port}", "--insecure", "--no-progress", "--model", "random:tiny-llama",
        "--label-private", "--mode", "sl", "--peft", "lora", "--delta-cache-mb", "4",
        "--max-train-examples", "48", "--max-eval-examples", "16", "--batch-size", "8", "--epochs", "3",
        "--checkpoint-every", str(EVERY), "--lr", "1e-3", "--output-dir", str(out),
        "--report", str(out / "report.json"), "--reconnect-timeout", "120", *extra,
    ]  # fmt: skip


def _run(cmd, timeout=300):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]


def _same_run(ckpt_dir, ref_dir, run_dir):
    ref = json.loads((ref_dir / "report.json").read_text())
    run = json.loads((run_dir / "report.json").read_text())
    assert run["steps"] == ref["steps"] == STEPS and run["resumes"] >= 1 and ref["resumes"] == 0
    assert run["delta_cache_bytes"] == ref["delta_cache_bytes"] > 0
    assert run["metrics"] == ref["metrics"] and run["eval_history"] == ref["eval_history"]
    assert run["train_loss_last"] == ref["train_loss_last"]
    for a, b in (
        (ref_dir / "edge.safetensors", run_dir / "edge.safetensors"),
        (os.path.join(ckpt_dir, ref["session_id"], "final.safetensors"),
         os.path.join(ckpt_dir, run["session_id"], "final.safetensors")),
    ):  # fmt: skip
        x, y = load_file(a), load_file(b)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    return run


def test_delta_cloud_killed_mid_epoch_2_and_restarted(glue_dir, tmp_path):
    ckpt = str(tmp_path / "cloud")
    proc, port = start_daemon(["--insecure", "--checkpoint-dir", ckpt])
    try:
        _run(_edge_cmd(port, glue_dir, tmp_path / "ref"))
        before = set(os.listdir(ckpt))
        edge = subprocess.Popen(_edge_cmd(port, glue_dir, tmp_path / "run"), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        found = _wait_for(os.path.join(ckpt, "*", f"step-{2 * EVERY:09d}.safetensors"), 300)
        assert {p.split(os.sep)[-2] for p in found} - before
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc, _ = start_daemon(["--insecure", "--checkpoint-dir", ckpt, "--port", str(port)])
        output, _ = edge.communicate(timeout=300)
        assert edge.returncode == 0, output[-3000:]
        assert "re-attached to session" in output
        _same_run(ckpt, tmp_path / "ref", tmp_path / "run")
    finally:
        stop_daemon(proc)


@pytest.mark.slow
def test_delta_edge_killed_mid_epoch_2_and_resumed(glue_dir, tmp_path):
    ckpt = str(tmp_path / "cloud")
    proc, port = start_daemon(["--insecure", "--checkpoint-dir", ckpt])
    try:
        _run(_edge_cmd(port, glue_dir, tmp_path / "ref"))
        edge = subprocess.Popen(_edge_cmd(port, glue_dir, tmp_path / "run"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for(str(tmp_path / "run" / "checkpoints" / f"step-{2 * EVERY:09d}.safetensors"), 300)
        edge.send_signal(signal.SIGKILL)
        edge.wait()
        _run(_edge_cmd(port, glue_dir, tmp_path / "run", "--resume"))
        assert _same_run(ckpt, tmp_path / "ref", tmp_path / "run")["resumes"] == 1
    finally:
        stop_daemon(proc)
