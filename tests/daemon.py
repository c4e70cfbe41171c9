"""Start `sft-cloud serve` as a real separate process on a free port, and stop it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_daemon(extra: Optional[List[str]] = None, timeout: float = 120.0) -> Tuple[subprocess.Popen, int]:
    """Launch the daemon on 127.0.0.1 with port 0 and return (process, the port it bound)."""
    cmd = [sys.executable, "-m", "sft_cloud.cli", "serve", "--host", "127.0.0.1", "--port", "0"] + (
        extra or []
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on [\d.]+:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    raise RuntimeError("daemon did not start:\n" + "".join(lines))


def stop_daemon(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """SIGTERM, wait, and return what the daemon printed after its start line."""
    proc.terminate()
    out, _ = proc.communicate(timeout=timeout)
    return out
