"""The offline demo: fine-tune the packaged MiniLM on SST-2 through a real sft-cloud daemon.

Starts `sft-cloud serve` as a separate process on a free localhost port, runs `sft-edge train`
against it for a short budget, prints the dev accuracy and the traffic, and stops the daemon.
Usage: python examples/demo.py --data-dir ../shared/data/glue [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from sft_cloud.launch import start_daemon, stop_daemon


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/glue", help="GLUE TSV folder")
    parser.add_argument("--steps", type=int, default=200, help="training steps (batch 32)")
    parser.add_argument("--task", default="sst2")
    args = parser.parse_args()

    daemon, port = start_daemon(["--insecure"])
    try:
        print(
            f"demo: sft-cloud daemon on 127.0.0.1:{port}; training MiniLM-L6 (split at the last layer, R=8)"
        )
        with tempfile.TemporaryDirectory() as tmp:
            report_path = os.path.join(tmp, "report.json")
            rc = subprocess.call([
                sys.executable, "-m", "sft_edge.cli", "train", "--task", args.task, "--data-dir", args.data_dir,
                "--cloud", f"127.0.0.1:{port}", "--insecure", "--max-steps", str(args.steps),
                "--report", report_path,
            ])  # fmt: skip
            if rc != 0:
                return rc
            with open(report_path) as f:
                report = json.load(f)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in report["metrics"].items())
        print(
            f"demo: {report['task']} dev {metrics} after {report['steps']} steps in {report['seconds']:.0f}s; "
            f"sent {report['bytes_sent'] / 1e6:.1f} MB, received {report['bytes_received'] / 1e6:.1f} MB"
        )
        return 0
    finally:
        stop_daemon(daemon)


if __name__ == "__main__":
    sys.exit(main())
