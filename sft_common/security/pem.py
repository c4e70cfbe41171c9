"""PEM files (certificates, keys, CAs) as both sides read them, with errors that name the flag."""

from __future__ import annotations


def read_pem(path: str, flag: str) -> bytes:
    """The bytes of a PEM file given as ``flag``; ValueError saying what is wrong otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag}: {path} is not a PEM file")
    return data
