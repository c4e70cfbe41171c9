"""What the daemon admits: at most ``--max-sessions`` sessions at once, and delta mode's caches
within ``--max-delta-cache-mb`` a cut and ``--delta-cache-total-mb`` over the sessions held.

Checked when a session opens and when one is restored from a checkpoint, before it is built, so a
refused session has allocated nothing. The total counts the budgets granted (what each session's
caches may grow to: ``delta.granted_bytes``), not what they hold now, so a session admitted never
finds its room taken later; a session's share is free again once it leaves (closed, evicted,
forgotten, or taken over by another replica)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import grpc

from sft_common.proto import sft_pb2 as pb
from sft_common.wire.delta import MAX_CACHE_BYTES, config_cuts, granted_bytes
from sft_common.wire.errors import ProtocolError

MIB = 2**20


@dataclass(frozen=True)
class Admission:
    """The daemon's limits on the sessions it holds at once."""

    max_sessions: int = 64  # --max-sessions; more get RESOURCE_EXHAUSTED
    delta_per_cut: int = (
        MAX_CACHE_BYTES  # --max-delta-cache-mb in bytes: a session's budget, each cut (0: off)
    )
    delta_total: Optional[int] = None  # --delta-cache-total-mb in bytes: the granted budgets together

    @classmethod
    def of(
        cls, max_sessions: int, max_delta_cache_mb: float, delta_cache_total_mb: Optional[float]
    ) -> Admission:
        """From `sft-cloud serve`'s flags (MiB; a total of None: no bound)."""
        total = None if delta_cache_total_mb is None else int(delta_cache_total_mb * MIB)
        return cls(max_sessions, int(max_delta_cache_mb * MIB), total)

    def describe(self) -> str:
        """For the daemon's start line: "max 64 sessions, delta caches of 4096 MiB a cut"."""
        if not self.delta_per_cut:
            return f"max {self.max_sessions} sessions, delta mode off"
        total = "" if self.delta_total is None else f", {_mib(self.delta_total)} MiB in all"
        return (
            f"max {self.max_sessions} sessions, delta caches of {_mib(self.delta_per_cut)} MiB a cut{total}"
        )

    def check(self, config: pb.SessionConfig, held: Sequence[pb.SessionConfig]) -> None:
        """Raise a ProtocolError if a session of ``config`` may not join the sessions ``held`` (their
        configs): RESOURCE_EXHAUSTED when the daemon is full now (try again later), FAILED_PRECONDITION
        when it never takes such a session."""
        if len(held) >= self.max_sessions:
            raise ProtocolError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the daemon already serves {len(held)} sessions (--max-sessions "
                f"{self.max_sessions}); try again later",
            )
        asked = config.delta_cache_bytes
        if not asked:
            return
        if not self.delta_per_cut:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this daemon does not serve delta mode (sft-cloud serve --max-delta-cache-mb 0): "
                "train without --delta-cache-mb",
            )
        if asked > self.delta_per_cut:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"delta mode: this session asks for {_mib(asked)} MiB a cut (--delta-cache-mb), more than "
                f"this daemon allows (sft-cloud serve --max-delta-cache-mb {_mib(self.delta_per_cut)}); "
                f"train with --delta-cache-mb {_mib(self.delta_per_cut)} or less",
            )
        self._check_total(config, held)

    def _check_total(self, config: pb.SessionConfig, held: Sequence[pb.SessionConfig]) -> None:
        if self.delta_total is None:
            return
        granted, wanted, cuts = sum(map(granted_bytes, held)), granted_bytes(config), len(config_cuts(config))
        what = (
            f"delta mode: this session's caches may take {_mib(wanted)} MiB ({_mib(config.delta_cache_bytes)} "
            f"MiB a cut, --delta-cache-mb, at {cuts} cut{'s' if cuts > 1 else ''})"
        )
        flag = f"sft-cloud serve --delta-cache-total-mb {_mib(self.delta_total)}"
        if wanted > self.delta_total:
            raise ProtocolError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{what}, more than this daemon allows all its sessions together ({flag}); ask for at "
                f"most {_mib(self.delta_total // cuts)} MiB a cut",
            )
        if granted + wanted > self.delta_total:
            raise ProtocolError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{what}, and the sessions held have {_mib(granted)} MiB of the {_mib(self.delta_total)} "
                f"all may take ({flag}); try again later, or ask for less",
            )


def _mib(n: int) -> str:
    """Bytes as MiB, the flags' unit, without exponents: 1.5, 4096."""
    return f"{n / MIB:.2f}".rstrip("0").rstrip(".")
