"""A TCP proxy for tests: forwards a local port to the daemon and can break the link on cue.

``cut_after(direction, nbytes)`` drops every connection (RST) as soon as more than ``nbytes``
have flowed in ``direction`` ("up": edge to cloud, "down": cloud to edge), without forwarding
the chunk that crossed the line: a step sent but its answer lost, or a step lost on the way.
With ``grace`` seconds, ``direction`` goes silent at once but the other direction keeps flowing
for that long before the reset: what the edge sends meanwhile reaches the cloud and is applied,
and its answer is lost. (The chunk that crosses the line may hold only HTTP/2 control frames;
the grace makes sure that answers to applied work are lost all the same.)
``freeze_after`` instead silences ``direction`` on the live connections and keeps them open,
the other direction flowing: a link that goes silent without a reset. New connections are
always forwarded normally.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import List, Optional, Tuple


class TcpProxy:
    def __init__(self, target: Tuple[str, int]):
        self.target = target
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.bytes = {"up": 0, "down": 0}
        self.trip: Optional[Tuple[str, int, str, float]] = None  # (direction, threshold, action, grace)
        self.tripped = threading.Event()
        self._conns: List[Tuple[socket.socket, socket.socket]] = []
        self._silent: set = set()  # (id(pair), direction) no longer forwarded
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut_after(self, direction: str, nbytes: int, grace: float = 0.0) -> None:
        with self._lock:
            self.trip = (direction, self.bytes[direction] + nbytes, "cut", grace)

    def freeze_after(self, direction: str, nbytes: int) -> None:
        with self._lock:
            self.trip = (direction, self.bytes[direction] + nbytes, "freeze", 0.0)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            pair = (client, upstream)
            with self._lock:
                self._conns.append(pair)
            threading.Thread(target=self._pump, args=(client, upstream, "up", pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down", pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, pair) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                if (id(pair), direction) in self._silent:
                    continue  # swallow: this direction of the link is silent
                trip = self.trip
                if trip and trip[0] == direction and self.bytes[direction] + len(data) > trip[1]:
                    self.trip = None
                    self.tripped.set()
                    action, grace = trip[2], trip[3]
                    if action == "cut" and grace <= 0:
                        self._cut(self._conns)
                        return
                    self._silent.update((id(p), direction) for p in self._conns)
                    if action == "cut":
                        threading.Timer(grace, self._cut_later, args=(list(self._conns),)).start()
                    continue
                self.bytes[direction] += len(data)
            try:
                dst.sendall(data)
            except OSError:
                return

    def _cut_later(self, pairs) -> None:
        with self._lock:
            self._cut(pairs)

    def _cut(self, pairs) -> None:
        """Reset ``pairs`` (not connections opened since: the edge's reconnect must get through)."""
        for pair in pairs:
            for sock in pair:
                try:  # linger 0: close with RST, as a dropped NAT entry or a reset link would
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                except OSError:
                    pass
        self._conns = [p for p in self._conns if p not in pairs]

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            self._cut(list(self._conns))
