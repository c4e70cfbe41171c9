"""`sft-cloud serve` and `sft-edge train` as two real processes, with GLUE data from ../shared."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from daemon import ROOT, start_daemon, stop_daemon


@pytest.fixture(scope="module")
def daemon():
    proc, port = start_daemon(["--insecure", "--device", "cpu"])
    yield proc, port
    if proc.poll() is None:
        stop_daemon(proc)


def edge(port, *args, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "sft_edge.cli",
        "train",
        "--cloud",
        f"127.0.0.1:{port}",
        "--insecure",
        "--no-progress",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("task, metric", [("sst2", "accuracy"), ("mrpc", "f1"), ("rte", "accuracy")])
def test_two_processes_train_and_report(daemon, glue_dir, tmp_path, task, metric):
    _, port = daemon
    report_path = tmp_path / "r.json"
    out = edge(
        port,
        "--task",
        task,
        "--data-dir",
        glue_dir,
        "--model",
        "random:tiny",
        "--max-steps",
        "6",
        "--max-train-examples",
        "96",
        "--max-eval-examples",
        "64",
        "--batch-size",
        "16",
        "--report",
        str(report_path),
        "--output-dir",
        str(tmp_path / "out"),
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(report_path.read_text())
    assert report["task"] == task and report["mode"] == "sft" and report["steps"] == 6
    assert report["cloud_steps"] == 6 and report["resumes"] == 0
    assert report["split_layer"] == 3 and report["rank"] == 8  # defaults: last layer, R = 8
    assert report["wire_dtype"] == "fp32" and report["compression"] == "none"
    assert 0.0 <= report["metrics"][metric] <= 1.0 and report["dev_examples"] == 64
    # 6 steps of 16 examples x tokens x 8 x 4 bytes go up; the same come back as gradients.
    assert report["bytes_sent"] > 6 * 16 * 8 * 4 and report["bytes_received"] > 6 * 16 * 8 * 4
    assert (tmp_path / "out" / "edge.safetensors").is_file()
    meta = json.loads((tmp_path / "out" / "sft_edge.json").read_text())
    assert meta["part"] == "edge" and meta["steps"] == 6


def test_local_baseline_and_plain_split(daemon, glue_dir, tmp_path):
    _, port = daemon
    common = [
        "--task",
        "sst2",
        "--data-dir",
        glue_dir,
        "--model",
        "random:tiny",
        "--max-steps",
        "3",
        "--max-train-examples",
        "48",
        "--max-eval-examples",
        "32",
        "--batch-size",
        "16",
    ]
    local = edge(port, *common, "--local", "--report", str(tmp_path / "local.json"))
    assert local.returncode == 0, local.stderr
    sl = edge(port, *common, "--mode", "sl", "--report", str(tmp_path / "sl.json"))
    assert sl.returncode == 0, sl.stderr
    edge(port, *common, "--report", str(tmp_path / "sft.json"))
    r_local, r_sl, r_sft = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "sl", "sft"))
    assert r_local["mode"] == "local" and r_local["bytes_sent"] == 0
    # hidden 32 vs rank 8: plain split learning sends about 4x the activation bytes.
    assert 3.0 < r_sl["bytes_sent"] / r_sft["bytes_sent"] < 4.2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "sst9"], "unknown task 'sst9'"),
        (["--task", "sst2", "--split-layer", "7"], "split layer 7 is out of range"),
        (["--task", "sst2", "--data-dir", "/nonexistent"], "/nonexistent/SST-2/train.tsv does not exist"),
        (["--task", "sst2", "--model", "/nonexistent-model"], "neither a local folder nor a built-in name"),
        (["--task", "sst2", "--micro-batches", "0"], "--micro-batches and --pipeline-depth must be >= 1"),
        (["--task", "sst2", "--micro-batches", "64"], "--micro-batches 64 is more than --batch-size 32"),
        (["--task", "sst2", "--local", "--micro-batches", "2"], "--local has no link"),
        (["--task", "sst2", "--mode", "sl", "--factor-lr", "1e-4"], "--factor-lr needs --mode sft"),
        (["--task", "sst2", "--local", "--factor-lr", "1e-4"], "--factor-lr needs --mode sft"),
        (
            ["--task", "sst2", "--factor-lr", "0"],
            "--factor-lr needs --mode sft (the SVD factors exist only there) and a value > 0",
        ),
        (
            ["--task", "sst2", "--split-layer", "1", "--cls-only"],
            "--cls-only needs the cut at the last layer",
        ),
    ],
)
def test_bad_input_is_a_clear_error(daemon, glue_dir, args, message):
    _, port = daemon
    if "--data-dir" not in args:
        args = args + ["--data-dir", glue_dir]
    if "--model" not in args:
        args = args + ["--model", "random:tiny"]
    out = edge(port, *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_cloud_is_a_clear_error(glue_dir):
    out = edge(
        1,
        "--task",
        "sst2",
        "--data-dir",
        glue_dir,
        "--model",
        "random:tiny",
        "--max-steps",
        "1",
        "--max-train-examples",
        "8",
    )
    assert out.returncode == 2 and "no sft-cloud daemon answered at 127.0.0.1:1" in out.stderr


def test_sigterm_stops_the_daemon_gracefully():
    proc, _ = start_daemon(["--insecure"])
    out = stop_daemon(proc)
    assert proc.returncode == 0 and "sft-cloud: stopped" in out


def test_daemon_refuses_to_start_without_tls_material():
    out = subprocess.run(
        [sys.executable, "-m", "sft_cloud.cli", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and "--insecure" in out.stderr


def test_console_scripts_are_installed():
    for name in ("sft-cloud", "sft-edge"):
        path = shutil.which(name)
        assert path, f"{name} is not on PATH: run `make install`"
        assert subprocess.run([path, "--help"], capture_output=True, timeout=120).returncode == 0
