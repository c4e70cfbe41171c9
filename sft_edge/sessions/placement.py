"""Where a forward-only run's trainable part sits (``--adapters``), chosen once per session.

``placement_of(adapters, base, spec)`` resolves the flag into a ``Placement``, which says what the
cloud is asked for (``side_width``), what is cached for each example (``answer``), what trains
(``attach``) and what the tail reads (``tail_input``); ``ForwardOnlySession`` asks it and never
branches on the flag. ``answer`` reads an ``EvalReply`` (training, predict) or a ``DecodeReply``
(KV-cached generation through the daemon: the new rows' answer, which carries the same fields).

- ``TailPlacement`` (``tail``): the last ``tail_layers`` layers and the head train, whole or with
  LoRA; the cloud returns the second cut alone, and the tail reads it.
- ``ParallelPlacement`` (``parallel``): the whole backbone stays frozen and a side network trains
  beside it (``sft_common.topology.side``): the cloud also returns its layers' outputs projected
  to the side width, and the tail reads h2 + the side network's output. A task head (classification)
  trains too: it is new, not the base's.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import grpc
import torch
from torch import nn

from sft_common.models.base_model import BaseModel
from sft_common.models.lora import LoraSpec, head_parameters
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.side import SideNetwork, side_projection, side_width
from sft_common.topology.ushape import UShapeSpec, lora_part
from sft_common.training import step_seed
from sft_edge.data.activation_cache import Answer
from sft_edge.link.transport import CloudError

# (tensor, what it is, shape) -> the decoded tensor: the session's wire, down
Decode = Callable[[pb.Tensor, str, Tuple[int, ...]], torch.Tensor]
Reply = Union[pb.EvalReply, pb.DecodeReply]  # the middle's answer: an evaluation's, or a decode step's


class Placement:
    """What trains on the device and what it reads of the cloud's frozen middle."""

    name = ""
    side_width = 0  # SessionConfig.side_width: 0 asks the cloud for the second cut alone

    def attach(
        self, head: nn.Module, tail: nn.Module, lora: Optional[LoraSpec], seed: int
    ) -> Dict[str, nn.Module]:
        """Make what trains trainable (the head is frozen after); the modules this placement adds, by name."""
        raise NotImplementedError

    def answer(self, first: torch.Tensor, reply: Reply, decode: Decode) -> Answer:
        """What is kept for the examples of ``reply``: ``first`` their first cut's rows (tokens, hidden)."""
        return {"rows": decode(reply.activations, "the middle's output", tuple(first.shape))}

    def tail_input(self, answer: Answer, mask: torch.Tensor) -> torch.Tensor:
        """The tail's input (batch, seq, hidden) from the padded answers (zeros at padding); or
        (tokens, hidden) from unpadded ones with ``mask`` (tokens,) of ones."""
        return answer["rows"]


class TailPlacement(Placement):
    """``--adapters tail``: the tail (its layers and head) trains, with the run's LoRA or whole."""

    name = "tail"

    def attach(self, head, tail, lora, seed):
        if lora is not None:  # adapters and the task head train; the tail's base is frozen
            lora_part(tail, "tail", lora, seed)
        return {}


class ParallelPlacement(Placement):
    """``--adapters parallel``: a side network beside the frozen backbone (and a task head) trains."""

    name = "parallel"

    def __init__(self, base: BaseModel, spec: UShapeSpec, device: str):
        self.hidden = base.hidden_size
        self.side_width = side_width(self.hidden)
        self.layers = spec.second_layer(base.num_hidden_layers) - spec.split_layer  # the middle's
        self.projection = side_projection(base.fingerprint, self.hidden, self.side_width).to(device)
        self.device = device
        self.side: Optional[SideNetwork] = None

    def attach(self, head, tail, lora, seed):
        assert lora is None, "--adapters parallel trains no LoRA (forward_kind refuses --peft)"
        tail.requires_grad_(False)
        for p in head_parameters(tail):  # a classification head is new: it trains
            p.requires_grad_(True)
        self.side = SideNetwork(self.hidden, self.layers, self.projection, step_seed(seed, "edge-side", 0))
        return {"side": self.side.to(self.device)}

    def answer(self, first, reply, decode):
        assert self.side is not None
        if not reply.HasField("side"):  # checked before anything is decoded
            raise CloudError(grpc.StatusCode.FAILED_PRECONDITION, NO_TAPS, local=True)
        answer = super().answer(first, reply, decode)
        taps = decode(reply.side, "the middle's taps", (first.shape[0], self.layers * self.side_width))
        answer["side"] = torch.cat([self.side.start(first), taps], dim=-1)
        return answer

    def tail_input(self, answer, mask):
        assert self.side is not None
        return answer["rows"] + self.side(answer["side"]) * mask[..., None].to(answer["rows"].dtype)


NO_TAPS = (
    "the daemon answered without the middle's layers' taps (its `side`), which this --adapters parallel "
    "run's side network reads: the daemon predates KV-cached generation for such runs; update it, or "
    "generate with --no-kv-cache (each token recomputes the whole sequence), or from the run's "
    "`sft-edge export` (no daemon)"
)


def placement_of(adapters: str, base: BaseModel, spec: UShapeSpec, device: str = "cpu") -> Placement:
    """The placement ``--adapters`` names (``sft_edge.runs.forward_kind.ADAPTERS``)."""
    if adapters == "parallel":
        return ParallelPlacement(base, spec, device)
    assert adapters == "tail", f"unknown --adapters {adapters!r}"
    return TailPlacement()
