"""How a training step runs: split across a transport (SFT or SL), or the whole model locally.

Both backends expose the same three calls, so one trainer loop drives them:
``train_step(step, batch) -> loss``, ``predict(batch) -> logits``, ``state_dict()``.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import torch

from sft_common import codec
from sft_common.spec import SplitSpec, session_fingerprint
from sft_common.models import BaseModel
from sft_common.proto import sft_pb2 as pb
from sft_common.split import EdgeHalf, build_edge_half, build_full_model, factor_parameters, task_loss
from sft_common.training import make_optimizer, make_schedule, step_seed
from sft_edge.client import CloudError, Transport
from sft_edge.data import Batch


@dataclass
class OptimConfig:
    lr: float = 2e-5  # AdamW learning rate (GLUE recipe)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    total_steps: int = 1  # for the linear decay
    seed: int = 42  # head init, dropout seeds, data order
    factor_lr: Optional[float] = None  # SFT: learning rate of u, Σ, v (both sides); None: lr


def check_pipeline(micro_batches: int, pipeline_depth: int) -> None:
    if micro_batches < 1 or pipeline_depth < 1:
        raise ValueError("--micro-batches and --pipeline-depth must be >= 1")


def check_factor_lr(mode: str, factor_lr: Optional[float]) -> None:
    """``--factor-lr`` only where there are SVD factors (``mode`` "sft", not "sl" or "local")."""
    if factor_lr is not None and (mode != "sft" or not factor_lr > 0):
        raise ValueError("--factor-lr needs --mode sft (the SVD factors exist only there) and a value > 0")


def _autocast(device: str) -> contextlib.AbstractContextManager:
    """Mixed precision where it helps: bf16 autocast on GPUs that have it, else full precision."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _seeded(seed: int, side: str, step: int, micro: int = 0) -> Iterator[None]:
    torch.manual_seed(step_seed(seed, side, step, micro))
    yield


class SplitBackend:
    """net1 here; net2 in a cloud session reached through ``transport``.

    With ``micro_batches`` > 1 a step's batch goes out as that many micro-batches, up to
    ``pipeline_depth`` of them in flight: the edge computes micro-batch k+1 while micro-batch k
    crosses the link and the cloud works on it, and runs k's backward pass while the cloud works
    on k+1. Both sides accumulate gradients and step their optimizers once per step, so the
    update is the whole batch's (up to float summation order and per-micro-batch dropout).
    """

    def __init__(
        self,
        base: BaseModel,
        spec: SplitSpec,
        num_labels: int,
        transport: Transport,
        optim: OptimConfig,
        batch_size: int,
        max_seq_len: int,
        wire_dtype: str = "fp32",
        compression: str = "none",
        task: str = "",
        device: str = "cpu",
        session_id: str = "",
        resume_steps: Sequence[int] = (),
        micro_batches: int = 1,
        pipeline_depth: int = 2,
        cls_only: bool = False,
    ):
        """Open a new cloud session, or re-attach to ``session_id`` at one of ``resume_steps``.

        ``cls_only`` (a cut at the last layer only): send each example's first ([CLS]) row alone.
        Above the last layer the cloud runs only per-token operations and the pooler, which reads
        that row, so the other rows cannot change the loss and their gradients are exactly zero.
        """
        check_pipeline(micro_batches, pipeline_depth)
        check_factor_lr(spec.mode, optim.factor_lr)
        if cls_only and spec.split_layer != base.config.num_hidden_layers - 1:
            raise ValueError(
                f"--cls-only needs the cut at the last layer ({base.config.num_hidden_layers - 1}), "
                f"not {spec.split_layer}: the layers above the cut read every token"
            )
        self.cls_only = cls_only
        self.spec = spec
        self.transport = transport
        self.micro_batches = micro_batches
        self.pipeline_depth = pipeline_depth
        self.optim_cfg = optim
        self.device = device
        self.wire_dtype = codec.WIRE_DTYPES[wire_dtype]
        self.compression = codec.COMPRESSIONS[compression]
        self.num_labels = num_labels
        self.fingerprint = session_fingerprint(base.fingerprint, spec, num_labels)
        config = pb.SessionConfig(
            model=base.name, mode=pb.SFT if spec.mode == "sft" else pb.SL, split_layer=spec.split_layer,
            rank=spec.rank, num_labels=num_labels, wire_dtype=self.wire_dtype, compression=self.compression,
            lr=optim.lr, weight_decay=optim.weight_decay, warmup_steps=optim.warmup_steps,
            total_steps=optim.total_steps, seed=optim.seed, max_batch_size=batch_size,
            max_seq_len=max_seq_len, task=task, factor_lr=optim.factor_lr or 0.0,
        )  # fmt: skip
        request = pb.OpenSession(
            config=config,
            fingerprint=self.fingerprint,
            session_id=session_id,
            resume_steps=list(resume_steps),
        )
        self.session = transport.call(pb.EdgeMessage(open=request)).opened
        self.start_step = self.session.next_step  # where the loop continues
        if self.session.fingerprint != self.fingerprint:
            raise CloudError(
                grpc.StatusCode.FAILED_PRECONDITION, "the cloud answered with another fingerprint"
            )
        u = None
        if spec.mode == "sft":
            cfg = base.config
            u = codec.decode(
                self.session.edge_factor, name="edge factor", dtype=pb.FLOAT32,
                shape=(cfg.intermediate_size, spec.rank),
            )  # fmt: skip
        self.net1: EdgeHalf = build_edge_half(base, spec, u, device=device)
        self.optimizer = make_optimizer(
            self.net1.parameters(), optim.lr, optim.weight_decay,
            factors=factor_parameters(self.net1), factor_lr=optim.factor_lr,
        )  # fmt: skip
        self.schedule = make_schedule(self.optimizer, optim.warmup_steps, optim.total_steps)
        self.width = spec.cut_width(base.config.hidden_size)

    def _cut(self, batch: Batch) -> Tuple[torch.Tensor, List[int]]:
        """net1's activations for the real tokens only, (tokens, width), and the lengths that
        say which example each row belongs to (with ``cls_only``: one row per example)."""
        with _autocast(self.device):
            a, _ = self.net1(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        if self.cls_only:
            return a[:, 0].float(), [1] * len(batch.lengths)
        return a.float()[batch.attention_mask.bool()], batch.lengths

    def train_step(self, step: int, batch: Batch) -> float:
        """One step: net1 forward, the cut across the link, the gradient back, net1 backward and
        update. Returns the step's mean loss as the cloud computed it."""
        self.net1.train()
        self.optimizer.zero_grad(set_to_none=True)  # nothing left over from an interrupted step
        parts = batch.split(self.micro_batches)
        examples = len(batch.lengths)
        in_flight: Deque[Tuple[int, torch.Tensor, int]] = collections.deque()
        loss = 0.0
        for micro, part in enumerate(parts):
            with _seeded(self.optim_cfg.seed, "edge", step, micro):
                packed, lengths = self._cut(part)
            msg = self._train_message(step, packed, lengths, part.labels)
            if len(parts) > 1:
                msg.micro, msg.micro_count, msg.step_examples = micro, len(parts), examples
            self.transport.submit(pb.EdgeMessage(train=msg))
            in_flight.append((micro, packed, len(part.lengths)))
            if len(in_flight) >= self.pipeline_depth:
                loss += self._backward(step, *in_flight.popleft(), examples)
        while in_flight:
            loss += self._backward(step, *in_flight.popleft(), examples)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _train_message(
        self, step: int, packed: torch.Tensor, lengths: List[int], labels: torch.Tensor
    ) -> pb.TrainStep:
        """The ``TrainStep`` carrying the cut ``packed`` of one batch (or micro-batch)."""
        msg = pb.TrainStep(
            step=step,
            activations=codec.encode(packed.detach(), self.wire_dtype, self.compression),
            lengths=lengths,
        )
        if self.num_labels == 1:
            msg.targets.extend(labels.float().tolist())
        else:
            msg.labels.extend(labels.tolist())
        return msg

    def _gradient(self, reply: pb.TrainReply, packed: torch.Tensor) -> torch.Tensor:
        """The cloud's d loss / d ``packed``, decoded and checked against ``packed``'s shape."""
        return codec.decode(
            reply.grad, name="gradient", dtype=self.wire_dtype, shape=tuple(packed.shape),
            compression=self.compression, device=self.device,
        )  # fmt: skip

    def _backward(self, step: int, micro: int, packed: torch.Tensor, n: int, examples: int) -> float:
        """Wait for one micro-batch's gradient and run net1's backward pass with it (gradients
        accumulate); returns its loss weighted by its share of the step's examples."""
        reply = self.transport.result().train
        if reply.step != step or reply.micro != micro:
            raise CloudError(
                grpc.StatusCode.INTERNAL,
                f"expected the answer to step {step} micro-batch {micro}, got step {reply.step} "
                f"micro-batch {reply.micro}",
            )
        packed.backward(self._gradient(reply, packed))
        return reply.loss * (n / examples)

    @torch.no_grad()
    def predict(self, batch: Batch, index: int = 0) -> torch.Tensor:
        self.net1.eval()
        packed, lengths = self._cut(batch)
        msg = pb.EvalStep(
            batch=index,
            activations=codec.encode(packed, self.wire_dtype, self.compression),
            lengths=lengths,
        )
        reply = self.transport.call(pb.EdgeMessage(eval=msg)).eval
        return codec.decode(
            reply.logits, name="logits", dtype=pb.FLOAT32, shape=(len(batch.lengths), self.num_labels)
        )

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.net1.state_dict()

    @property
    def module(self) -> torch.nn.Module:
        return self.net1

    def checkpoint(self, step: int) -> None:
        """Ask the cloud to checkpoint after ``step`` steps (it answers once its file is written)."""
        reply = self.transport.call(pb.EdgeMessage(checkpoint=pb.Checkpoint(step=step)))
        if reply.checkpointed.step != step:
            raise CloudError(grpc.StatusCode.INTERNAL, f"asked for a checkpoint at {step}, got {reply}")

    def close(self) -> int:
        """Close the cloud session; returns the number of steps the cloud applied."""
        reply = self.transport.call(pb.EdgeMessage(close=pb.CloseSession()))
        self.transport.close()
        return reply.closed.steps


class LocalBackend:
    """The whole unsplit model in this process: the baseline (``--local``)."""

    def __init__(self, base: BaseModel, num_labels: int, optim: OptimConfig, device: str = "cpu"):
        self.optim_cfg = optim
        self.device = device
        self.start_step = 0
        self.model = build_full_model(base, num_labels, optim.seed, device=device)
        self.optimizer = make_optimizer(self.model.parameters(), optim.lr, optim.weight_decay)
        self.schedule = make_schedule(self.optimizer, optim.warmup_steps, optim.total_steps)

    def _logits(self, batch: Batch) -> torch.Tensor:
        with _autocast(self.device):
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                token_type_ids=batch.token_type_ids,
            )
        return out.logits.float()

    def train_step(self, step: int, batch: Batch) -> float:
        self.model.train()
        with _seeded(self.optim_cfg.seed, "local", step):
            loss = task_loss(self._logits(batch), batch.labels)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, batch: Batch, index: int = 0) -> torch.Tensor:
        self.model.eval()
        return self._logits(batch)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.model.state_dict()

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def checkpoint(self, step: int) -> None:
        """Nothing to agree on: the whole model is here."""

    def close(self) -> Optional[int]:
        return None
