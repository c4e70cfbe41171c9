"""The link to the daemon for a run: credentials checked, the routing key, a factory of streams.

Imports grpc but not torch, so the CLI reports a wrong address or TLS setup before it loads
the model and the data.
"""

from __future__ import annotations

import logging
import os
import secrets
from typing import Callable, Optional, Tuple, Union

import grpc

from sft_common.storage.atomic import replaced
from sft_edge.link import credentials
from sft_edge.link.transport import CloudError, Transport, connector
from sft_edge.runs.config import Connection, TrainConfig

ROUTE_HEADER = "x-sft-route"  # an L7 proxy hashes on it to send a run's streams to one replica
ROUTE_FILE = "route-key"
log = logging.getLogger("sft_edge")


def route_key(run_dir: Optional[str]) -> str:
    """The routing key of a run: kept in its folder (the same across reconnects, ``--resume``,
    ``predict`` and ``export``), or one per process without a folder. A new key is written to
    the folder by ``keep_route_key`` once a session has opened."""
    path = os.path.join(run_dir, ROUTE_FILE) if run_dir else None
    if path is not None and os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    return secrets.token_hex(16)


def keep_route_key(run_dir: Optional[str], key: str) -> None:
    if not run_dir or os.path.isfile(os.path.join(run_dir, ROUTE_FILE)):
        return
    with replaced(os.path.join(run_dir, ROUTE_FILE)) as f:
        f.write(key + "\n")


def grpc_connector(cfg: Union[TrainConfig, Connection], route: str) -> Callable[[], Transport]:
    """Streams to the daemon named by ``cfg.cloud``: TLS unless ``--insecure``, with this
    device's bearer token when it has one, and the run's routing key on every stream."""
    creds, metadata = credentials.secure_link(
        cfg.cloud, cfg.insecure, cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.auth_token_file
    )
    metadata = [*metadata, (ROUTE_HEADER, route)]
    return connector(cfg.cloud, creds, metadata, timeout=cfg.step_timeout)


def connect_to_cloud(cfg: TrainConfig) -> Tuple[Optional[Callable[[], Transport]], str]:
    """For a split run: a factory of streams to the daemon (checked to answer, so a wrong
    address or TLS setup is reported before the data and the model are read) and the run's
    routing key. ``--local``: no link. A ``--forward-only`` run may need no daemon (every row
    in its activation cache: later runs over the folder, ``--resume``): for it a daemon that
    does not answer is a warning, and the check is made again when a stream is first asked for."""
    route = route_key(cfg.output_dir)
    if cfg.local:
        return None, route
    try:
        return grpc_connector(cfg, route), route
    except CloudError as exc:
        if not cfg.forward_only or exc.code != grpc.StatusCode.UNAVAILABLE:
            raise
        log.warning("%s: going on; a stream will be opened if a row is not in the activation cache", exc)
        return when_first_needed(cfg, route), route


def when_first_needed(cfg: TrainConfig, route: str) -> Callable[[], Transport]:
    """``grpc_connector(cfg, route)``'s streams, its check made when the first is asked for."""
    made: list = []

    def connect() -> Transport:
        if not made:
            made.append(grpc_connector(cfg, route))
        return made[0]()

    return connect
