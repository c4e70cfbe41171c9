"""A TCP proxy for tests: forwards a local port to the daemon and can break the link on cue.

``cut_after(direction, nbytes)`` drops every connection (RST) as soon as more than ``nbytes``
have flowed in ``direction`` ("up": edge to cloud, "down": cloud to edge), without forwarding
the chunk that crossed the line: a step sent but its answer lost, or a step lost on the way.
``freeze_after`` instead stops forwarding on the live connections and keeps them open: a link
that goes silent without a reset. New connections are always forwarded normally.
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
        self.trip: Optional[Tuple[str, int, str]] = None  # (direction, threshold, "cut" | "freeze")
        self.tripped = threading.Event()
        self._conns: List[Tuple[socket.socket, socket.socket]] = []
        self._frozen: set = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut_after(self, direction: str, nbytes: int) -> None:
        with self._lock:
            self.trip = (direction, self.bytes[direction] + nbytes, "cut")

    def freeze_after(self, direction: str, nbytes: int) -> None:
        with self._lock:
            self.trip = (direction, self.bytes[direction] + nbytes, "freeze")

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
                if id(pair) in self._frozen:
                    continue  # swallow: the link is silent
                trip = self.trip
                if trip and trip[0] == direction and self.bytes[direction] + len(data) > trip[1]:
                    self.trip = None
                    self.tripped.set()
                    if trip[2] == "cut":
                        self._cut_all()
                        return
                    self._frozen.update(id(p) for p in self._conns)
                    continue
                self.bytes[direction] += len(data)
            try:
                dst.sendall(data)
            except OSError:
                return

    def _cut_all(self) -> None:
        for pair in self._conns:
            for sock in pair:
                try:  # linger 0: close with RST, as a dropped NAT entry or a reset link would
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                except OSError:
                    pass
        self._conns = []

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            self._cut_all()
