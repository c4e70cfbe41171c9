"""bench/accuracy.py end to end on a tiny case: a real daemon, two steps, a result file, the table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from daemon import ROOT


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_accuracy", os.path.join(ROOT, "bench", "accuracy.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_accuracy"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_plan_commands_and_table():
    acc = _bench()
    quick = acc.plan_runs("quick")
    names = [r.name for r in quick]
    assert names[:4] == ["rte-local-e3-s42", "rte-sft-r8-e3-s42", "mrpc-local-e3-s42", "mrpc-sft-r8-e3-s42"]
    assert len(set(names)) == len(names) and "sst2-sft-r8-l0-m400-s42" in names
    cpu = [r.name for r in acc.plan_runs("cpu", sst2_steps=200)]
    assert cpu[:3] == ["sst2-local-m200-s42", "sst2-sft-r8-m200-s42", "sst2-sft-r8-l0-m200-s42"]
    cmd = acc.edge_command(acc.Run("sst2", "sft-r8-l2", 43, max_steps=400), "/glue", "m", 5000, "r.json")
    text = " ".join(cmd)
    assert "--mode sft --rank 8 --split-layer 2" in text and "--cloud 127.0.0.1:5000 --insecure" in text
    assert "--lr 2e-05 --batch-size 32 --max-steps 400 --max-seq-len 128 --seed 43" in text
    assert "--local" in acc.edge_command(acc.Run("rte", "local", 42), "/glue", "m", None, "r.json")

    def rec(cfg, seed, a):
        report = {"metrics": {"accuracy": a}, "eval_history": [{"step": 3, "accuracy": a}], "seconds": 10.0}
        report.update(steps=3, bytes_sent=300, bytes_received=300)
        return {"task": "rte", "config": cfg, "budget": "e3", "seed": seed, "report": report}

    rows = acc.table(
        [rec("local", 1, 0.6), rec("local", 2, 0.7), rec("sft-r8", 1, 0.55), rec("sft-r8", 2, 0.68)]
    )
    assert "| rte | local | e3 (3 steps) | 1,2 | 65.00 ± 7.07 |" in rows
    # The mean paired Δ, its 95 % confidence half-width (t with 1 degree of freedom: 12.706 · 2.12 / √2),
    # then seed by seed.
    assert "| -3.50 ± 19.06 (n=2: -5.00, -2.00) | 64.25 |" in rows
    one = acc.table([rec("local", 1, 0.6), rec("sft-r8", 1, 0.55)])
    assert "| -5.00 (n=1) | 64.25 |" in one
    # Any rank at the last layer sorts after the named configurations, the layer sweep last.
    rows = acc.table(
        [rec("sft-r8-l0", 1, 0.5), rec("sft-r384", 1, 0.6), rec("sl", 1, 0.6), rec("local", 1, 0.6)]
    )
    assert [line.split(" | ")[1] for line in rows.splitlines()[2:]] == [
        "local",
        "sl",
        "sft-r384",
        "sft-r8-l0",
    ]


def test_configurations_outside_the_plans_run_for_each_task_and_seed(tmp_path, capsys):
    acc = _bench()
    assert acc.Run("mrpc", "sft-r384", 1).mode_flags() == ["--mode", "sft", "--rank", "384"]
    assert acc.Run("mrpc", "sft-r8-l3-flr1e-3", 1).mode_flags() == [
        *("--mode", "sft", "--rank", "8", "--split-layer", "3", "--factor-lr", "1e-3")
    ]
    want = "--mode sft --rank 8 --split-layer 0 --factorise ffn-input --wire-dtype int8".split()
    assert acc.Run("mrpc", "sft-r8-l0-fin-int8", 1).mode_flags() == want
    assert acc.Run("mrpc", "sft-r16-flr1e-3-fin", 1).mode_flags()[-4:] == [
        *("--factor-lr", "1e-3", "--factorise", "ffn-input")
    ]
    assert acc.Run("sst2", "sft-r24-l0-flr2e-4-int4", 1).mode_flags()[-4:] == [
        *("--factor-lr", "2e-4", "--wire-dtype", "int4")
    ]
    with pytest.raises(ValueError, match="sft-r<R>"):
        acc.Run("mrpc", "sft-r8-flr", 1).mode_flags()
    with pytest.raises(ValueError, match=r"\[-fin\]"):
        acc.Run("mrpc", "sft-r8-int8-fin", 1).mode_flags()  # -fin comes before the wire dtype
    # The -aw and -ra initialisations left sft-edge (65983b2): their finished results stay, but no
    # such run can start, from a name or from the command line.
    for retired in ("sft-r8-l0-aw-int8", "sft-r8-fin-aw", "sft-r24-l1-flr1e-3-ra-int4"):
        with pytest.raises(ValueError, match=r"\[-fin\]\[-<wire dtype>\]"):
            acc.Run("mrpc", retired, 1).mode_flags()
    with pytest.raises(SystemExit):
        acc.main(["--configs", "sft-r8-l0-aw-int8", "--dry-run", "--results", str(tmp_path)])
    args = [
        "--tasks",
        "mrpc",
        "--configs",
        "sft-r384",
        "local",
        "--seeds",
        "7",
        "8",
        "--results",
        str(tmp_path),
    ]
    assert acc.main(args + ["--dry-run"]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["todo", "mrpc-local-e3-s7", "todo", "mrpc-local-e3-s8"] + [
        "todo",
        "mrpc-sft-r384-e3-s7",
        "todo",
        "mrpc-sft-r384-e3-s8",
    ]
    # A planned configuration asked for by name runs at every seed asked for, on the plan's tasks
    # (the cpu plan has `sl` at its first seed only, and SST-2 only).
    assert (
        acc.main(
            [
                "--plan",
                "cpu",
                "--configs",
                "sl",
                "--seeds",
                "43",
                "44",
                "--results",
                str(tmp_path),
                "--dry-run",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == ["todo", "sst2-sl-m200-s43", "todo", "sst2-sl-m200-s44"]
    assert acc.main(["--plan", "cpu", "--configs", "sft-r8", "--results", str(tmp_path), "--dry-run"]) == 0
    assert capsys.readouterr().out.split() == ["todo", "sst2-sft-r8-m200-s42", "todo", "sst2-sft-r8-m200-s43"]
    # One the plan does not hold gets the plan's budget for each task (the cpu plan's 200 SST-2
    # steps, three epochs elsewhere): the retired frontier's budgets and result names.
    args = ["--plan", "cpu", "--configs", "sft-r24-l0-fin-int4", "--results", str(tmp_path), "--dry-run"]
    assert acc.main(args + ["--tasks", "mrpc", "sst2", "rte"]) == 0
    assert capsys.readouterr().out.split() == [
        "todo",
        "mrpc-sft-r24-l0-fin-int4-e3-s42",
        "todo",
        "sst2-sft-r24-l0-fin-int4-m200-s42",
        "todo",
        "rte-sft-r24-l0-fin-int4-e3-s42",
    ]
    with pytest.raises(SystemExit):  # a name that says no configuration: refused before anything runs
        acc.main(["--configs", "sft-rank8", "--dry-run", "--results", str(tmp_path)])
    with pytest.raises(SystemExit):  # the frontier's plan is retired (git show 61e3ae0:bench/accuracy.py)
        acc.main(["--plan", "frontier", "--dry-run", "--results", str(tmp_path)])


@pytest.mark.slow
def test_accuracy_bench_runs_resumes_and_tabulates(glue_dir, tmp_path):
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        "bench/accuracy.py",
        "--tasks",
        "rte",
        "--configs",
        "local",
        "sft-r8",
        "--seeds",
        "7",
        "--model",
        "random:tiny",
        "--data-dir",
        glue_dir,
        "--results",
        str(results),
        "--nice",
        "0",
        "--extra",
        "--max-steps 2 --max-train-examples 16 --max-eval-examples 16 --batch-size 8 --max-seq-len 32",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("rte-local-e3-s7", "rte-sft-r8-e3-s7"):
        rec = json.loads((results / f"{name}.json").read_text())
        assert rec["report"]["steps"] == 2 and rec["report"]["dev_examples"] == 16
        assert rec["command"].startswith("sft-edge train --task rte")
    sft = json.loads((results / "rte-sft-r8-e3-s7.json").read_text())["report"]
    assert sft["mode"] == "sft" and sft["rank"] == 8 and sft["cloud_steps"] == 2 and sft["bytes_sent"] > 0
    table = (results / "table.md").read_text()
    assert "| rte | local |" in table and "| rte | sft-r8 |" in table
    # A second invocation finds both results and runs nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 0 and again.stdout.count("skip  ") == 2 and "run   " not in again.stdout


def test_niced_runs_go_in_a_session_of_their_own_whose_group_is_niced():
    """`nice` alone does not make a run yield to other sessions under autogroup scheduling."""
    import shutil

    if shutil.which("setsid") is None:
        pytest.skip("no setsid")
    probe = "nice; cat /proc/self/autogroup 2>/dev/null || echo none"
    out = subprocess.run(_bench().niced(7) + ["sh", "-c", probe], capture_output=True, text=True, check=True)
    niceness, group = out.stdout.strip().splitlines()
    assert int(niceness) == min(19, os.nice(0) + 7)  # nice adds to the niceness the suite runs at
    if group != "none" and os.path.exists("/proc/self/autogroup"):
        # Empty where this process is in the default group (e.g. a CI runner's service cgroup).
        mine = (open("/proc/self/autogroup").read().split() or ["default"])[0]
        assert group.split()[0] != mine  # a session, and so a scheduling group, of its own
        if os.access("/proc/self/autogroup", os.W_OK):
            assert group.endswith("nice 7")
    assert _bench().niced(0) == []


def _children(pid: int) -> list:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_terminated_bench_takes_its_edge_and_daemon_with_it(glue_dir, tmp_path):
    """The runs are niced in sessions of their own, so a SIGTERM to the bench alone must stop them."""
    import signal
    import time

    cmd = [
        sys.executable,
        "bench/accuracy.py",
        "--tasks",
        "rte",
        "--configs",
        "sft-r8",
        "--seeds",
        "7",
        "--model",
        "random:tiny",
        "--data-dir",
        glue_dir,
        "--results",
        str(tmp_path / "results"),
        "--nice",
        "1",
        "--extra",
        "--max-steps 100000 --max-train-examples 16 --max-eval-examples 16 --batch-size 8 --max-seq-len 32",
    ]
    bench = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "accuracy-logs" / "rte-sft-r8-e3-s7.log"
    deadline = time.time() + 120
    while not (log.exists() and " training " in log.read_text()):
        assert bench.poll() is None and time.time() < deadline, "the run did not start"
        time.sleep(0.2)
    kids = _children(bench.pid)
    try:
        assert len(kids) == 2  # the daemon and the edge
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while any(_alive(pid) for pid in kids) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in kids)
    finally:  # what a failure left behind
        for pid in filter(_alive, kids):
            os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "results" / "rte-sft-r8-e3-s7.json").exists()
