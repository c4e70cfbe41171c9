"""A new user's mistakes: one `sft-edge: error:` / `sft-cloud: error:` line, exit code 2, no
traceback, and --help without torch. Each case runs the real command in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from daemon import ROOT, start_daemon, stop_daemon


def run(module, *args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def assert_one_line_error(out, prog, words):
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "module, args", [("sft_edge.cli", ["train"]), ("sft_cloud.cli", ["serve"]), ("sft_edge.cli", ["predict"])]
)
def test_help_imports_neither_torch_nor_grpc(module, args):
    code = (
        f"import sys; from {module} import main\n"
        f"try: main({args + ['--help']!r})\nexcept SystemExit: pass\n"
        "print(__import__('json').dumps(sorted(m for m in ('torch', 'grpc', 'transformers', 'datasets') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


EDGE_MISTAKES = {
    "unknown task": (["--task", "sst9"], "unknown task 'sst9'"),
    "rank 0": (["--task", "sst2", "--rank", "0", "--model", "random:tiny"], "rank 0 is out of range"),
    "missing data folder": (
        ["--task", "sst2", "--data-dir", "/nonexistent"],
        "/nonexistent/SST-2/train.tsv does not exist",
    ),
    "missing TLS flag": (["--task", "sst2", "--model", "random:tiny"], "--insecure"),
    "model folder that does not exist": (
        ["--task", "sst2", "--model", "./nonexistent-folder"],
        "no such folder",
    ),
    "unresolvable cloud": (
        ["--task", "sst2", "--cloud", "cloudhost.invalid:50051", "--insecure"],
        "cannot resolve",
    ),
    "own file that does not exist": (
        ["--train-file", "nope.csv", "--text-columns", "a", "--label-column", "b"],
        "--train-file nope.csv: no such file",
    ),
    "text columns missing": (["--train-file", "README.md"], "--train-file needs --text-columns"),
    "task and file": (["--task", "sst2", "--train-file", "x.csv"], "either --task"),
}


@pytest.mark.parametrize("case", sorted(EDGE_MISTAKES))
def test_edge_mistakes_are_one_line(case, glue_dir):
    args, words = EDGE_MISTAKES[case]
    if "--data-dir" not in args and "--task" in args:
        args = [*args, "--data-dir", glue_dir]
    assert_one_line_error(
        run("sft_edge.cli", "train", "--no-progress", *args, timeout=180), "sft-edge", words
    )


def test_a_port_in_use_names_the_port_and_the_flag():
    proc, port = start_daemon(["--insecure"])
    try:
        out = run("sft_cloud.cli", "serve", "--insecure", "--host", "127.0.0.1", "--port", str(port))
    finally:
        stop_daemon(proc)
    assert_one_line_error(out, "sft-cloud", f"127.0.0.1:{port}")
    assert "--port" in out.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "--insecure"),
        (["--insecure", "--tls-cert", "c.pem"], "exclude each other"),
        (["--tls-cert", "nope.pem", "--tls-key", "nope.key"], "--tls-cert nope.pem: no such file"),
        (["--insecure", "--max-sessions", "0"], "--max-sessions must be >= 1"),
    ],
)
def test_cloud_mistakes_are_one_line(args, words):
    assert_one_line_error(run("sft_cloud.cli", "serve", "--port", "0", *args), "sft-cloud", words)


def test_the_daemon_logs_each_session_event(tmp_path, glue_dir):
    proc, port = start_daemon(["--insecure", "--checkpoint-dir", str(tmp_path / "cloud")])
    try:
        out = run(
            "sft_edge.cli", "train", "--task", "sst2", "--data-dir", glue_dir, "--model", "random:tiny",
            "--cloud", f"127.0.0.1:{port}", "--insecure", "--no-progress", "--max-steps", "4", "--batch-size", "8",
            "--max-train-examples", "32", "--max-eval-examples", "16", "--output-dir", str(tmp_path / "run"),
            "--checkpoint-every", "2", timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
    finally:
        log = stop_daemon(proc)
    sid = json.loads((tmp_path / "run" / "sft_edge.json").read_text())["session_id"][:8]
    for event in (
        "opened: random:tiny, sft at layer 3, rank 8",
        "checkpointed at step 2",
        "closed after 4 steps",
    ):
        assert f"session {sid}: {event}" in log, log
    assert "[peer anonymous]" in log
