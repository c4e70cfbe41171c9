"""Where a cloud session runs and what the daemon allows it: one ``SessionHost``, shared by its sessions.

The registry builds one from the daemon's settings and hands it to every session it builds;
tests and benches build a session alone on ``DEFAULT_HOST``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

from sft_cloud.sessions.validation import check_config
from sft_common.models.base_model import BaseModel
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec


@dataclass(frozen=True)
class SessionHost:
    """The device, compute lock, limits and checkpoint folder of the sessions of one daemon."""

    device: str = "cpu"  # where net2 runs
    # The lock every session of the daemon computes under (see SessionCore.rng); None: the session's own.
    compute_lock: Optional[threading.Lock] = None
    max_batch: int = 256  # a session's max_batch_size may be at most this
    max_seq: int = 512  # and its max_seq_len at most this (and the model's positions)
    # <checkpoint_dir>/<session id>/ holds a session's checkpoints; None: none are kept.
    checkpoint_dir: Optional[str] = None

    def check(
        self,
        config: pb.SessionConfig,
        base: BaseModel,
        check_split: Callable[[pb.SessionConfig, SplitSpec, BaseModel], None],
    ) -> SplitSpec:
        """``validation.check_config`` against this host's limits: the config's (first) cut."""
        return check_config(config, base, self.max_batch, self.max_seq, check_split)


# A session built alone (tests, benches): the CPU, its own compute lock, the daemon's default
# limits, no checkpoints.
DEFAULT_HOST = SessionHost()
