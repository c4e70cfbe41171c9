"""The one exception the protocol raises: a gRPC status code and a message for the peer."""

from __future__ import annotations

import grpc


class ProtocolError(Exception):
    """A refused message. The servicer turns it into the stream's final gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"
