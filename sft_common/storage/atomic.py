"""Files that appear whole or not at all: written beside their path, then renamed over it.

No torch here, so the edge's link module (imported before torch loads) can use it too.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import IO, Any, Iterator, Optional


@contextlib.contextmanager
def replaced(path: str, newline: Optional[str] = None) -> Iterator[IO[str]]:
    """A text file to write to; it replaces ``path`` when the block ends without an error
    (readers never see half of it; a failed write leaves ``path`` as it was)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys, atomically."""
    with replaced(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
