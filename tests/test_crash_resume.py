"""Crashes of real processes: `kill -9` of the daemon (then a restart) or of the edge (then
`--resume`) end with weights and metrics bit-identical to an uninterrupted run, for the two-part
split and for the U-shape (`--label-private`: the edge's head and tail, the daemon's middle)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from daemon import ROOT, start_daemon, stop_daemon
from safetensors.torch import load_file

STEPS, EVERY = 60, 10
# The split under test: extra `sft-edge train` flags. The U's daemon dies in whichever of the four
# phases the step is in. Its edge's kill -9 is slow (`make test-all`): the U's `--resume` is in the
# default suite in process (tests/sft_edge/runs/test_label_private.py), its daemon's kill -9 here.
U = ("--label-private",)
SHAPES = [pytest.param((), id="two-part"), pytest.param(U, id="ushape")]
SHAPES_U_SLOW = [SHAPES[0], pytest.param(U, id="ushape", marks=pytest.mark.slow)]


def _edge_cmd(port, glue_dir, out, *extra):
    return [
        sys.executable, "-m", "sft_edge.cli", "train", "--task", "sst2", "--data-dir", glue_dir,
        "--cloud", f"127.0.0.1:{port}", "--insecure", "--no-progress", "--model", "random:tiny",
        "--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--batch-size", "8",
        "--max-train-examples", "160", "--max-eval-examples", "48", "--lr", "1e-3",
        "--output-dir", str(out), "--report", str(out / "report.json"), "--reconnect-timeout", "90", *extra,
    ]  # fmt: skip


def _run(cmd, timeout=240):
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]


def _wait_for(pattern, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = glob.glob(pattern)
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"nothing matched {pattern} within {timeout}s")


def _compare(ckpt_dir, ref_dir, run_dir, shape):
    ref = json.loads((ref_dir / "report.json").read_text())
    run = json.loads((run_dir / "report.json").read_text())
    assert run["steps"] == ref["steps"] == STEPS and run["resumes"] >= 1 and ref["resumes"] == 0
    assert run["label_private"] is ref["label_private"] is ("--label-private" in shape)
    assert run["metrics"] == ref["metrics"] and run["eval_history"] == ref["eval_history"]
    for name in ("edge.safetensors",):
        a, b = load_file(ref_dir / name), load_file(run_dir / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(os.path.join(ckpt_dir, ref["session_id"], "final.safetensors"))
    b = load_file(os.path.join(ckpt_dir, run["session_id"], "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return run


@pytest.mark.parametrize("shape", SHAPES)
def test_cloud_killed_and_restarted(glue_dir, tmp_path, shape):
    ckpt = str(tmp_path / "cloud")
    proc, port = start_daemon(["--insecure", "--checkpoint-dir", ckpt])
    try:
        _run(_edge_cmd(port, glue_dir, tmp_path / "ref", *shape))
        before = set(os.listdir(ckpt))
        edge = subprocess.Popen(_edge_cmd(port, glue_dir, tmp_path / "run", *shape), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        # Kill the daemon once this session has its first checkpoint, mid-run.
        found = _wait_for(os.path.join(ckpt, "*", f"step-{EVERY:09d}.safetensors"))
        assert {p.split(os.sep)[-2] for p in found} - before
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc, _ = start_daemon(["--insecure", "--checkpoint-dir", ckpt, "--port", str(port)])
        output, _ = edge.communicate(timeout=240)
        assert edge.returncode == 0, output[-3000:]
        assert "re-attached to session" in output
        _compare(ckpt, tmp_path / "ref", tmp_path / "run", shape)
    finally:
        stop_daemon(proc)


@pytest.mark.parametrize("shape", SHAPES_U_SLOW)
def test_edge_killed_and_resumed(glue_dir, tmp_path, shape):
    ckpt = str(tmp_path / "cloud")
    proc, port = start_daemon(["--insecure", "--checkpoint-dir", ckpt])
    try:
        _run(_edge_cmd(port, glue_dir, tmp_path / "ref", *shape))
        edge = subprocess.Popen(_edge_cmd(port, glue_dir, tmp_path / "run", *shape), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _wait_for(str(tmp_path / "run" / "checkpoints" / f"step-{2 * EVERY:09d}.safetensors"))
        edge.send_signal(signal.SIGKILL)
        edge.wait()
        _run(_edge_cmd(port, glue_dir, tmp_path / "run", *shape, "--resume"))
        run = _compare(ckpt, tmp_path / "ref", tmp_path / "run", shape)
        assert run["resumes"] == 1
    finally:
        stop_daemon(proc)


def test_resume_without_a_checkpoint_is_a_clear_error(glue_dir, tmp_path):
    out = subprocess.run(_edge_cmd(1, glue_dir, tmp_path / "none", "--resume"), capture_output=True, text=True,
                         cwd=ROOT, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "--resume: no checkpoint in" in out.stderr
