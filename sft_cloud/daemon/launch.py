"""Run `sft-cloud serve` as a child process on a free port (the demo, benchmarks and tests)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from typing import IO, Dict, List, Optional, Sequence, Tuple

_LISTENING = re.compile(r"listening on [\w.:\[\]-]+:(\d+)")
_OUTPUT: Dict[int, Tuple[threading.Thread, List[str]]] = {}  # pid -> (reader, lines printed)


def _drain(stream: IO[str], into: List[str]) -> None:
    for line in iter(stream.readline, ""):
        into.append(line)


def start_daemon(
    args: Sequence[str] = ("--insecure",),
    host: Optional[str] = "127.0.0.1",
    port: int = 0,
    timeout: float = 180.0,
    prefix: Sequence[str] = (),
    cwd: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    module: Sequence[str] = ("sft_cloud.cli",),
) -> Tuple[subprocess.Popen, int]:
    """Start the daemon and wait for its "listening on" line; returns (process, bound port).

    ``host`` None passes no --host (the daemon's own default). ``prefix`` wraps the command (e.g. ``ip netns exec NAME``); ``module`` is what ``python -m``
    runs, with its own arguments before ``serve`` (a wrapper around ``sft_cloud.cli``, say). Raises RuntimeError with what
    the daemon printed if it does not come up within ``timeout`` seconds.
    """
    where = ["--port", str(port)] if host is None else ["--host", host, "--port", str(port)]
    cmd = list(prefix) + [sys.executable, "-m", *module, "serve", *where]
    proc = subprocess.Popen(
        cmd + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env
    )
    assert proc.stdout is not None
    deadline = time.time() + timeout
    seen: List[str] = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = _LISTENING.search(line)
        if match:
            # Keep reading what the daemon prints, so a full pipe never blocks it.
            output: List[str] = []
            reader = threading.Thread(target=_drain, args=(proc.stdout, output), daemon=True)
            reader.start()
            _OUTPUT[proc.pid] = (reader, output)
            return proc, int(match.group(1))
    proc.kill()
    proc.wait()
    raise RuntimeError("sft-cloud did not start:\n" + "".join(seen))


def stop_daemon(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """SIGTERM (a graceful stop), wait, and return what the daemon printed since its start line."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader, output = _OUTPUT.pop(proc.pid, (None, []))
    if reader is not None:
        reader.join(timeout=5)
    return "".join(output)
