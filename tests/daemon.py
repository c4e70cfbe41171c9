"""Start `sft-cloud serve` as a real separate process on a free port, and stop it."""

from __future__ import annotations

import os
import subprocess
from typing import List, Optional, Tuple

from sft_cloud.daemon import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_daemon(extra: Optional[List[str]] = None, timeout: float = 120.0) -> Tuple[subprocess.Popen, int]:
    """Launch the daemon on 127.0.0.1 (port 0 unless ``extra`` names one); (process, port)."""
    extra = list(extra or [])
    port = 0
    if "--port" in extra:
        i = extra.index("--port")
        port = int(extra[i + 1])
        del extra[i : i + 2]
    return launch.start_daemon(extra, port=port, timeout=timeout, cwd=ROOT)


def stop_daemon(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    return launch.stop_daemon(proc, timeout)
