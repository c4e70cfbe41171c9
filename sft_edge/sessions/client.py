"""The client side of the session protocol, shared by the two-part and the U-shaped edge sessions.

``SessionClient`` opens (or re-attaches to) a cloud session through a transport and moves its
messages: every message of the step in flight is kept until the answer that ends the step, so
that after a broken link it reconnects with backoff, re-attaches offering the steps it can
continue from (the live step first, then its checkpoints) and re-sends them; the cloud answers
those it had applied from its cache. If the cloud can only continue from an earlier checkpoint
(it restarted), the session loads its own checkpoint of that step (``restore``, which the
``checkpoint`` saves) and raises ``Rollback``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import grpc
import torch

from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.wire import delta
from sft_common.wire.codecs import Wire
from sft_common.wire.delta import DeltaCaches
from sft_common.wire.errors import ProtocolError
from sft_edge.data.glue import Batch
from sft_edge.link.transport import RETRYABLE, CloudError, Transport

log = logging.getLogger("sft_edge")


class Rollback(Exception):
    """The cloud re-attached the session at an earlier step (it restarted from a checkpoint).
    The session has loaded its own checkpoint of ``step``; ``run`` is the run record saved with
    it, so the caller continues from there."""

    def __init__(self, step: int, run: Dict):
        super().__init__(f"the cloud resumed the session at step {step}")
        self.step = step
        self.run = run


class SessionClient:
    """One cloud session's messages: open, request and answer, reconnect, re-send, close."""

    checkpoints: Optional[CheckpointDir]
    fingerprint: str
    # set by the subclass: what trains its ``module`` (the state this side checkpoints)
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    device: str
    wire: Wire
    delta: Optional[DeltaCaches] = None  # delta mode's caches (wire.delta), part of the checkpoint

    def _open_session(
        self,
        connect: Union[Transport, Callable[[], Transport]],
        open_msg: pb.OpenSession,
        reconnect_timeout: float,
        backoff: Tuple[float, float],
    ) -> pb.SessionOpened:
        """Send ``open_msg`` (its fingerprint is this side's) and check the answer; sets
        ``session_id``, ``start_step`` and ``live_step``. ``connect``: a factory of fresh
        transports (``transport.connector``), so the session can reconnect; or one transport,
        which then cannot be replaced when its link fails."""
        self.reconnect_timeout, self.backoff = reconnect_timeout, backoff
        self.resumes = 0  # re-attachments after broken links
        self._connect = None if isinstance(connect, Transport) else connect
        self.transport: Transport = connect if isinstance(connect, Transport) else connect()
        self._traffic = [0, 0]  # bytes of the streams before the current one
        self._log: List[pb.EdgeMessage] = []  # messages of the step in flight
        self._answered = 0  # of those, how many answers the caller has had
        self._skip = 0  # answers to re-sent messages the caller already had
        self._open = open_msg
        self.transport.submit(pb.EdgeMessage(open=self._open))
        opened = self.transport.result().opened
        if opened.fingerprint != open_msg.fingerprint:
            raise CloudError(
                grpc.StatusCode.FAILED_PRECONDITION, "the cloud answered with another fingerprint"
            )
        asked = open_msg.config.delta_cache_bytes
        if asked and opened.delta_cache_bytes != asked:
            raise CloudError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the daemon does not run delta mode (a version from before it?): upgrade it, or train "
                "without --delta-cache-mb",
                local=True,
            )
        if open_msg.pack_stream and not opened.stream_packed:
            raise CloudError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the daemon does not pack streams (a version from before it?): upgrade it, or train "
                "with --compression zstd",
                local=True,
            )
        self._open.session_id = self.session_id = opened.session_id
        # the step in flight (or next): what a re-attachment offers first
        self.start_step = self.live_step = opened.next_step
        return opened

    @property
    def module(self) -> torch.nn.Module:
        """This side's trained module (net1; the U's two edge parts as one)."""
        raise NotImplementedError

    def current_lr(self) -> float:
        """The learning rate the next step uses (the schedule's)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def checkpoint(self, step: int, run: Dict) -> None:
        """Checkpoint after ``step`` steps: the cloud first (it answers once its file is written),
        then this side's ``module``, optimizer and schedule, with the caller's run record."""
        assert self.checkpoints is not None, "checkpoint() needs a checkpoint folder"
        reply = self.request(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=step)))
        if reply.checkpointed.step != step:
            raise CloudError(grpc.StatusCode.INTERNAL, f"asked for a checkpoint at {step}, got {reply}")
        extra = self.delta.state() if self.delta is not None else None
        self.checkpoints.save_state(step, self.module, self.optimizer, self.schedule, extra, run=run)

    def restore(self, step: int) -> Dict:
        """Load this side's checkpoint of ``step``; returns the run record saved with it."""
        if self.checkpoints is None:
            raise CloudError(
                grpc.StatusCode.DATA_LOSS,
                f"the cloud can only continue from its checkpoint at step {step}, and this run keeps "
                "no checkpoints (--output-dir with --checkpoint-every)",
            )
        self.live_step = step
        restore_delta = self.delta.load if self.delta is not None else None
        header = self.checkpoints.load_state(
            step, self.module, self.optimizer, self.schedule, self.device, extra=restore_delta
        )
        return header["run"]

    def encode_cut(self, msg: Any, rows: torch.Tensor, batch: Batch, lengths: List[int]) -> List[bytes]:
        """Set the activations of ``msg`` (a ``TrainStep`` or ``ForwardUp``) to ``rows``, (tokens,
        width) for the examples of ``batch`` with ``lengths`` rows each. In delta mode also their
        example keys (of their real tokens) and deltas, and the first cut's cache is updated with
        what the cloud will decode; returns the keys (none when off)."""
        if self.delta is None:
            msg.activations.CopyFrom(self.wire.encode_activations(rows))
            return []
        keys = self.delta.keys(batch.input_ids, batch.lengths)
        cache = self.delta["up"]
        codecs = self.delta.mode.codecs(self.wire.activations)
        base, deltas, decoded = delta.encode(codecs, cache, keys, lengths, rows, self.wire.compression)
        msg.activations.CopyFrom(base)
        msg.delta.CopyFrom(deltas)
        msg.example_keys.extend(keys)
        cache.update(keys, lengths, decoded)
        return keys

    @property
    def bytes_sent(self) -> int:
        """Serialized bytes sent over every stream of this session, re-sent ones included."""
        return self._traffic[0] + self.transport.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self._traffic[1] + self.transport.bytes_received

    def close(self) -> int:
        """Close the cloud session; returns the number of steps the cloud applied."""
        reply = self.request(pb.EdgeMessage(close=pb.CloseSession()))
        self.transport.close()
        return reply.closed.steps

    # -- messages, reconnects and re-sends ------------------------------------------------

    def request(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        """One message and its answer (reconnecting and re-sending as needed)."""
        self._submit(msg)
        return self._result()

    def _submit(self, msg: pb.EdgeMessage) -> None:
        self._log.append(msg)
        self.transport.submit(msg)

    def _result(self) -> pb.CloudMessage:
        """The answer to the oldest message in flight, reconnecting and re-sending as needed."""
        while True:
            try:
                reply = self.transport.result()
            except CloudError as exc:
                if exc.code not in RETRYABLE or self._connect is None:
                    raise
                log.warning("link to the cloud failed (%s): reconnecting", exc)
                self._reattach()
                for msg in self._log:
                    self.transport.submit(msg)  # every byte counts: re-sent ones cross the link too
                self._skip = self._answered
                continue
            if self._skip:
                self._skip -= 1
                continue
            msg = self._log[self._answered]
            self._answered += 1
            if _ends_step(msg):  # both sides are past it: nothing to re-send any more
                del self._log[: self._answered]
                self._answered = 0
            return reply

    def _reattach(self) -> None:
        assert self._connect is not None
        deadline = time.monotonic() + self.reconnect_timeout
        delay = self.backoff[0]
        while True:
            self._retire_transport()
            steps = [self.live_step] + (self.checkpoints.steps() if self.checkpoints else [])
            attach = pb.OpenSession()
            attach.CopyFrom(self._open)
            attach.resume_steps[:] = steps
            try:
                self.transport = self._connect()
                self.transport.submit(pb.EdgeMessage(open=attach))
                opened = self.transport.result().opened
            except CloudError as exc:
                if exc.code not in RETRYABLE or time.monotonic() + delay > deadline:
                    raise CloudError(exc.code, f"could not re-attach to the session: {exc.details}") from None
                log.warning(
                    "reconnecting to session %s: %s; next try in %.1fs, giving up in %.0fs (--reconnect-timeout)",
                    self.session_id[:8],
                    exc.details,
                    delay,
                    deadline - time.monotonic(),
                )
                time.sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            self.resumes += 1
            log.warning("re-attached to session %s at step %d", self.session_id[:8], opened.next_step)
            if opened.next_step != steps[0]:
                self._log, self._answered = [], 0  # the loop starts over from a checkpoint
                raise Rollback(opened.next_step, self.restore(opened.next_step))
            return

    def _retire_transport(self) -> None:
        self.transport.close()
        self._traffic[0] += self.transport.bytes_sent
        self._traffic[1] += self.transport.bytes_received
        self.transport.bytes_sent = self.transport.bytes_received = 0


@contextlib.contextmanager
def checked(what: str = "the middle's output") -> Iterator[None]:
    """Decoding ``what`` the cloud sent: a message that fails this side's checks (its codes, shapes,
    sizes or delta rows: a ``ProtocolError``) ends the run as a refused answer does, with the
    link's error and its reason, which the CLI says in one line."""
    try:
        yield
    except ProtocolError as exc:
        raise CloudError(exc.code, f"refused {what}: {exc.message}", local=True) from None


def _ends_step(msg: pb.EdgeMessage) -> bool:
    """Whether the answer to ``msg`` completes the step in flight (or it is no training step):
    a U-shaped step ends with GradientDown, so ForwardUp's answer does not."""
    kind = msg.WhichOneof("kind")
    if kind == "forward_up":
        return False
    if kind != "train":
        return True
    return msg.train.micro >= msg.train.micro_count - 1
