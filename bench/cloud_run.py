"""`sft-cloud serve`, unchanged, with each training step's time logged (for the link benchmark's floor).

Wraps ``CloudSession.train`` (decode, net2 forward and backward, optimizer, encode) with a timer
and appends ``{"session": id, "step": k, "s": seconds}`` to ``--timings`` (JSON lines), then
runs the real command line: ``python -m bench.cloud_run --timings FILE serve --insecure ...``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] != "--timings":
        print(
            "usage: python -m bench.cloud_run --timings FILE serve [sft-cloud serve flags]", file=sys.stderr
        )
        return 2
    path, rest = argv[1], argv[2:]
    from sft_cloud import cli
    from sft_cloud.session import CloudSession

    original = CloudSession.train
    lock = threading.Lock()

    def timed_train(session: Any, msg: Any) -> Any:
        t0 = time.perf_counter()
        reply = original(session, msg)
        dt = time.perf_counter() - t0
        with lock, open(path, "a") as f:
            f.write(json.dumps({"session": session.session_id, "step": msg.step, "s": dt}) + "\n")
        return reply

    CloudSession.train = timed_train  # type: ignore[method-assign, assignment]
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
