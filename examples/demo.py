"""The offline demo: fine-tune the packaged MiniLM on a labelled CSV through a real sft-cloud daemon.

Starts `sft-cloud serve` as a separate process on a free localhost port, runs `sft-edge train`
against it for a short budget, prints the dev accuracy and the traffic, and stops the daemon.
The data is the repository's own `examples/data/sst2_train.csv` (3,000 SST-2 sentences, string
labels) and `sst2_dev.csv` (SST-2's 872 dev sentences), read as any user's file would be.
Usage: python examples/demo.py [--steps 200] [--eval-examples N]; with --task sst2 --data-dir ../shared/data/glue,
the GLUE preset instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from sft_cloud.daemon.launch import start_daemon, stop_daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--train-file", default=os.path.join(here, "data", "sst2_train.csv"))
    parser.add_argument("--dev-file", default=os.path.join(here, "data", "sst2_dev.csv"))
    parser.add_argument("--steps", type=int, default=200, help="training steps (batch 32)")
    parser.add_argument(
        "--eval-examples", type=int, help="evaluate on the first N dev examples (default: all)"
    )
    parser.add_argument("--task", help="a GLUE task instead of the CSV files (needs --data-dir)")
    parser.add_argument("--data-dir", default="../shared/data/glue", help="GLUE TSV folder, with --task")
    args = parser.parse_args()
    if args.task:
        data = ["--task", args.task, "--data-dir", args.data_dir]
    else:
        data = ["--train-file", args.train_file, "--dev-file", args.dev_file]
        data += ["--text-columns", "review", "--label-column", "sentiment"]
    if args.eval_examples:
        data += ["--max-eval-examples", str(args.eval_examples)]

    daemon, port = start_daemon(["--insecure"])
    try:
        print(
            f"demo: sft-cloud daemon on 127.0.0.1:{port}; training MiniLM-L6 (split at the last layer, R=8)"
        )
        with tempfile.TemporaryDirectory() as tmp:
            report_path = os.path.join(tmp, "report.json")
            rc = subprocess.call(
                [
                    sys.executable,
                    "-m",
                    "sft_edge.cli",
                    "train",
                    *data,
                    "--cloud",
                    f"127.0.0.1:{port}",
                    "--insecure",
                    "--max-steps",
                    str(args.steps),
                    "--report",
                    report_path,
                ]
            )
            if rc != 0:
                return rc
            with open(report_path) as f:
                report = json.load(f)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items())
        print(
            f"demo: {args.task or 'sst2_dev.csv'} dev {metrics} after {report['steps']} steps in {report['seconds']:.0f}s; "
            f"sent {report['bytes_sent'] / 1e6:.1f} MB, received {report['bytes_received'] / 1e6:.1f} MB"
        )
        return 0
    finally:
        stop_daemon(daemon)


if __name__ == "__main__":
    sys.exit(main())
