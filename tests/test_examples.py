"""Every example runs on a fresh clone: each examples/*.py, and the README's commands (each one parsed
by the real CLI, the main path run end to end), against `sft-cloud serve` in its own process, on the
repository's examples/data with small budgets."""

from __future__ import annotations

import csv
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from sft_cloud.daemon.launch import start_daemon, stop_daemon

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
TESTED = {"demo.py", "drop_in.py", "hf_trainer.py"}  # each has its test below


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """An insecure daemon keeping finished sessions: (address, checkpoint dir)."""
    keep = tmp_path_factory.mktemp("daemon")
    proc, port = start_daemon(["--insecure", "--checkpoint-dir", str(keep)])
    yield f"127.0.0.1:{port}", keep
    stop_daemon(proc)


def run(argv: List[str], cwd: Path = ROOT, timeout: float = 600) -> str:
    """Run a command to completion; fail with its output unless it exits 0."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert out.returncode == 0, f"{argv}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def finals(keep: Path) -> List[Path]:
    return sorted(keep.glob("*/final.safetensors"))


def test_every_example_has_a_test():
    assert set(EXAMPLES) == TESTED, "an example without a test here, or a test of a removed example"


def test_demo_trains_on_the_repositorys_csv():
    out = run([sys.executable, "examples/demo.py", "--steps", "2", "--eval-examples", "32"])
    line = re.search(r"demo: sst2_dev.csv dev accuracy (\S+), macro_f1 \S+ after 2 steps", out)
    assert line and 0.0 <= float(line.group(1)) <= 1.0, out


def test_drop_in_runs_on_examples_data_and_closes_its_session(daemon):
    address, keep = daemon
    before = finals(keep)
    argv = [sys.executable, "examples/drop_in.py", "--cloud", address, "--insecure"]
    out = run(argv + ["--steps", "2", "--batch-size", "8", "--eval-examples", "16"])
    result = json.loads(out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["dev_examples"] == 16 and result["loss_first"] > 0
    assert len(finals(keep)) == len(before) + 1  # closed: the daemon wrote net2's final weights


def test_hf_trainer_example(daemon, tmp_path):
    address, keep = daemon
    before = finals(keep)
    argv = [sys.executable, "examples/hf_trainer.py", "--cloud", address, "--insecure", "--steps", "2"]
    out = run(argv + ["--batch-size", "8", "--eval-examples", "16", "--output-dir", str(tmp_path / "hf")])
    assert "'eval_accuracy'" in out and "'eval_loss'" in out
    assert len(finals(keep)) == len(before) + 1


def readme_commands() -> List[List[str]]:
    """The `sft-edge` / `sft-cloud` command lines of the README's bash blocks, continuations joined."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" #")[0], comments=True)
            if words and words[0] in ("sft-edge", "sft-cloud"):
                commands.append(words)
    return commands


def test_readme_commands_parse_with_the_real_cli():
    from sft_cloud.cli import build_parser as cloud_parser
    from sft_edge.cli import build_parser as edge_parser

    commands = readme_commands()
    assert len(commands) >= 8 and {c[1] for c in commands} >= {
        "serve",
        "train",
        "predict",
        "export",
        "generate",
    }
    for words in commands:
        parser = edge_parser() if words[0] == "sft-edge" else cloud_parser()
        try:
            parser.parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"README: {' '.join(words)} is refused by {words[0]}")


def test_readme_own_data_train_predict_export_forget(daemon, tmp_path):
    """The README's main path on its own data: train, predict through the daemon, export, predict
    here, load_trained, forget."""
    address, keep = daemon
    edge = [sys.executable, "-m", "sft_edge.cli"]
    link = ["--cloud", address, "--insecure"]
    run_dir, model_dir = tmp_path / "reviews", tmp_path / "model"
    data = ["--train-file", str(DATA / "sst2_train.csv"), "--dev-file", str(DATA / "sst2_dev.csv")]
    data += ["--text-columns", "review", "--label-column", "sentiment"]
    small = [
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--max-train-examples",
        "64",
        "--max-eval-examples",
        "16",
    ]
    run(edge + ["train", *data, *link, *small, "--output-dir", str(run_dir), "--no-progress"])

    new = tmp_path / "new.txt"
    new.write_text("a gripping, beautifully shot film\ndull and far too long\n")
    run(
        edge
        + ["predict", "--run", str(run_dir), "--input", str(new), "--output", str(tmp_path / "p.csv"), *link]
    )
    with open(tmp_path / "p.csv", newline="") as f:
        through_daemon = list(csv.DictReader(f))
    assert [r["prediction"] in ("negative", "positive") for r in through_daemon] == [True, True]

    run(edge + ["export", "--run", str(run_dir), "--to", str(model_dir), *link])
    run(
        edge
        + ["predict", "--run", str(model_dir), "--input", str(new), "--output", str(tmp_path / "p.jsonl")]
    )
    here = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in here] == [r["prediction"] for r in through_daemon]

    code = (
        "import json, sys; from sft_edge.finished.trained import load_trained; "
        "print(json.dumps(load_trained(sys.argv[1]).predict(['a gripping, beautifully shot film'])))"
    )
    loaded = json.loads(run([sys.executable, "-c", code, str(model_dir)]).strip().splitlines()[-1])
    assert loaded[0]["prediction"] == here[0]["prediction"]

    session = json.loads((run_dir / "sft_edge.json").read_text())["session_id"]
    assert (keep / session / "final.safetensors").is_file()
    run(edge + ["forget", "--run", str(run_dir), *link])
    assert not (keep / session).exists()
