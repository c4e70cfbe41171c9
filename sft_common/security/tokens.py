"""Bearer tokens: the file format both sides read, and the ``authorization`` metadata they share.

A token file holds one token per line (the cloud's: one per device; the edge's: exactly one).
Blank lines and lines starting with ``#`` are ignored. A token is 16 to 512 visible ASCII
characters without spaces, so that it is valid gRPC metadata and not trivially guessable.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Tuple

AUTH_KEY = "authorization"  # gRPC metadata keys are lower case
_SCHEME = "bearer "
_TOKEN = re.compile(r"^[\x21-\x7e]{16,512}$")


class TokenError(ValueError):
    """A token file that cannot be used; the message names the file and what is wrong."""


def read_token_file(path: str) -> List[str]:
    """The tokens in ``path``, in order; refuses an empty file, malformed lines and repeats."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"cannot read token file {path}: {exc}") from None
    tokens: List[str] = []
    for number, line in enumerate(lines, 1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.match(token):
            # Never echo the line: it may be a real token with a typo.
            raise TokenError(
                f"{path}:{number}: a token must be 16 to 512 visible ASCII characters without spaces"
            )
        if token in tokens:
            # Two devices with one token would share one identity, and so each other's sessions.
            raise TokenError(f"{path}:{number}: the same token appears twice; give each device its own")
        tokens.append(token)
    if not tokens:
        raise TokenError(f"token file {path} holds no token")
    return tokens


def bearer_metadata(token: str) -> Tuple[str, str]:
    """The metadata pair the edge sends on every stream."""
    return (AUTH_KEY, "Bearer " + token)


def bearer_token(metadata: Optional[Iterable[Tuple[str, object]]]) -> Optional[str]:
    """The token of ``authorization: Bearer <token>`` in ``metadata``, or None if absent;
    an ``authorization`` entry in another form gives the empty string (present but unusable)."""
    for key, value in metadata or ():
        if key != AUTH_KEY:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if text[: len(_SCHEME)].lower() != _SCHEME:
            return ""
        return text[len(_SCHEME) :].strip()
    return None
