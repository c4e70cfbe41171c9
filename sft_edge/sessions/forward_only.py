"""The edge's side of a forward-only session: a frozen head, the cloud's frozen middle, a tail that trains here.

``ForwardOnlySession`` (``sft-edge train --forward-only``) holds the U's two edge parts
(``sft_common.topology.ushape``): the head (embeddings .. the first cut) frozen, and the tail (the
last ``tail_layers`` layers, the final norm and the task or LM head), and the one optimizer. What
trains is the run's ``Placement`` (``sft_edge.sessions.placement``, ``--adapters``): the tail, with
the run's LoRA or whole, or a side network beside the frozen backbone. The cloud runs the middle with the base's weights, frozen
(``sft_cloud.sessions.frozen``). A training example's first-cut activations go up once as an
``EvalStep`` (no step number, no label, no loss) and the middle's answer comes down; it is kept
in the run's ``ActivationCache``, so no later epoch, dev evaluation or resume sends that example
again. Nothing goes up after the first cut: no gradient crosses the link at all.

Head and middle are frozen, so they run without dropout (their answer is a function of the
example, which is what makes it cacheable); the tail runs in training mode with the U's dropout
seeds. The cloud session is opened when the first example must cross, and a re-attachment opens a
new one (the cloud holds nothing of the run): a run whose examples are all cached needs no cloud.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from sft_common.models.base_model import BaseModel
from sft_common.models.lora import LoraSpec, resolve_lora
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir, owned_state
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_common.training import autocast, make_optimizer, make_schedule, seeded
from sft_common.wire.codecs import Wire
from sft_edge.data.activation_cache import ActivationCache, Answer, example_key
from sft_edge.data.glue import Batch
from sft_edge.link.transport import CloudError, Transport
from sft_edge.privacy.defence import Defence
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.base import StateHere, open_request
from sft_edge.sessions.client import SessionClient, checked
from sft_edge.sessions.placement import placement_of
from sft_edge.sessions.tail_end import tail_end_of
from sft_edge.sessions.ushape import TAIL_SIDE

log = logging.getLogger("sft_edge")
DP_FORWARD = "dp-forward"  # the noise's seeds: an example's draw is a function of (seed, its key)


class ForwardOnlySession(StateHere, SessionClient):
    """The frozen head and the training tail here; the frozen middle in a cloud session, asked once per example.

    Arguments as ``UShapeSession``'s (``spec``: a full-width U), with ``cache`` the run's
    ``ActivationCache``, ``start_step`` the step its checkpoints resume at and ``adapters`` what
    trains (``placement_of``)."""

    def __init__(
        self,
        base: BaseModel,
        spec: UShapeSpec,
        num_labels: int,
        connect: Union[Transport, Callable[[], Transport]],
        optim: OptimConfig,
        batch_size: int,
        max_seq_len: int,
        link: LinkOptions,
        cache: ActivationCache,
        task: str = "",
        device: str = "cpu",
        checkpoints: Optional[CheckpointDir] = None,
        start_step: int = 0,
        reconnect_timeout: float = 300.0,
        lora: Optional[LoraSpec] = None,
        causal_lm: bool = False,
        adapters: str = "tail",
    ):
        link.validate()
        spec.validate(base.num_hidden_layers)
        self.spec, self.optim_cfg, self.device, self.cache = spec, optim, device, cache
        self.checkpoints = checkpoints
        self.wire = Wire.named(link.wire_dtype, link.compression)
        self.noise = Defence.of(link.dp).activations  # --dp-noise: each example's rows noised once
        first = SplitSpec(spec.split_layer, spec.rank, spec.mode, factorise=spec.factorise)
        self.width = first.cut_width(base.hidden_size)
        # The cloud is told no LoRA and no labels: its middle is the base's, frozen.
        self._open = open_request(
            base, first, 0, optim, link, batch_size, max_seq_len, task, None, "", (), False, spec.tail_layers
        )
        self._open.config.forward_only = True
        self.placement = placement_of(adapters, base, spec, device)
        self._open.config.side_width = self.placement.side_width
        self.fingerprint = self._open.fingerprint
        self._connect_to = connect
        self.reconnect_timeout = reconnect_timeout
        self.opened = False  # the cloud session is opened when an example first must cross
        self.session_id, self.start_step, self.resumes = "", start_step, 0
        self.live_step = 0  # what a re-attachment offers: a forward-only cloud session stays at step 0
        self.lora = resolve_lora(lora, base.config.model_type)
        self.end = tail_end_of(causal_lm)  # the task head and its loss, or the LM head's
        self.head, self.tail = self.end.build(base, spec, num_labels, optim.seed, None, device)
        added = self.placement.attach(self.head, self.tail, self.lora, optim.seed)
        self.head.requires_grad_(False)  # last: an LM head tied to the embeddings is frozen with them
        self.net = nn.ModuleDict({"head": self.head, "tail": self.tail, **added})  # what is saved, as one
        self.optimizer = make_optimizer(self.net.parameters(), optim.lr, optim.weight_decay)
        self.schedule = make_schedule(self.optimizer, optim.warmup_steps, optim.total_steps)

    # -- what the trainer calls ------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.net

    def train_step(self, step: int, batch: Batch) -> float:
        """The tail's forward and backward on the middle's answers (cached, or asked for once)."""
        self.tail.train()
        self.optimizer.zero_grad(set_to_none=True)
        answer = self.middle_output(batch)
        with seeded(self.optim_cfg.seed, TAIL_SIDE, step), autocast(self.device):
            second = self.placement.tail_input(answer, batch.attention_mask)
            logits = self.tail(second, batch.attention_mask)
        loss = self.end.loss(logits.float(), batch.labels)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, batch: Batch, index: int = 0) -> torch.Tensor:
        """The logits of ``batch``: (batch, num_labels), or a causal LM's (batch, seq, vocab)."""
        self.tail.eval()
        answer = self.middle_output(batch, index)
        with autocast(self.device):
            second = self.placement.tail_input(answer, batch.attention_mask)
            return self.tail(second, batch.attention_mask).float()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """What trained (the tail, or its LoRA and task head, or the side network and task head)."""
        return owned_state(self.net)

    # -- the middle's answers -------------------------------------------------------------

    def middle_output(self, batch: Batch, index: int = 0) -> Answer:
        """The middle's answers, each (batch, seq, ...) with zeros at padding (``rows``: the second
        cut): each example's from the cache, the rest from one forward of the head here and one
        ``EvalStep`` to the cloud."""
        mask = batch.attention_mask.bool()
        keys = [
            example_key(batch.input_ids[i][mask[i]], batch.token_type_ids[i][mask[i]])
            for i in range(len(mask))
        ]
        found: List[Optional[Answer]] = [self.cache.get(k, n) for k, n in zip(keys, batch.lengths)]
        first_of = {k: i for i, k in reversed(list(enumerate(keys)))}  # an example twice is asked once
        missing = [i for i, r in enumerate(found) if r is None and first_of[keys[i]] == i]
        if missing:
            wanted = [keys[i] for i in missing]
            asked = dict(zip(wanted, self._ask(batch, missing, wanted, index)))
            for key, answer in asked.items():
                self.cache.put(key, answer)
            found = [asked.get(k, r) for k, r in zip(keys, found)]
        answers = [a for a in found if a is not None]
        padded = {}
        for name, first in answers[0].items():
            full = torch.zeros(*mask.shape, first.shape[1], device=self.device)
            padded[name] = full.index_put((mask,), torch.cat([a[name].to(self.device) for a in answers]))
        return padded

    @torch.no_grad()
    def _ask(self, batch: Batch, which: Sequence[int], keys: Sequence[str], index: int) -> List[Answer]:
        """The middle's answers for the examples ``which`` of ``batch`` (``keys``: theirs), one each
        (tensors of a row a token)."""
        idx = torch.tensor(list(which), device=batch.input_ids.device)
        lengths = [batch.lengths[i] for i in which]
        seq = max(lengths)
        ids, types = batch.input_ids[idx, :seq], batch.token_type_ids[idx, :seq]
        attention = batch.attention_mask[idx, :seq]
        self.head.eval()
        with autocast(self.device):
            first, _ = self.head(ids, attention, types)
        packed = first.float()[attention.bool()]
        sent = self._noised(packed, lengths, keys)  # the side network (parallel) reads the clean rows here
        msg = pb.EvalStep(batch=index, activations=self.wire.encode_activations(sent), lengths=lengths)
        reply = self.request(pb.EdgeMessage(eval=msg)).eval
        with checked():
            answer = self.placement.answer(packed, reply, self._decode)
        split = {name: torch.split(t, lengths) for name, t in answer.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(lengths))]

    def _noised(self, rows: torch.Tensor, lengths: Sequence[int], keys: Sequence[str]) -> torch.Tensor:
        """``rows`` clipped and noised example by example (``--dp-noise``), each example's noise drawn
        from (seed, its key) alone: it is sent once, whatever batch it is in, and its answer cached."""
        parts = rows.split(list(lengths))
        return torch.cat(
            [
                self.noise.apply(
                    part,
                    [len(part)],
                    self.noise.generator(self.optim_cfg.seed, DP_FORWARD, int(key[:15], 16)),
                )
                for part, key in zip(parts, keys)
            ]
        )

    def _decode(self, tensor: pb.Tensor, what: str, shape: Tuple[int, ...]) -> torch.Tensor:
        return self.wire.decode_activations(tensor, what, shape, down=True, device=self.device)

    @torch.no_grad()
    def decoded(self, first: torch.Tensor, reply: pb.DecodeReply) -> torch.Tensor:
        """What the tail reads (n, hidden) at the rows of a ``DecodeStep`` (KV-cached generation):
        ``first`` the first cut's rows sent (n, hidden), ``reply`` the daemon's answer for them, each
        tensor's shape checked before anything is allocated."""
        with checked():
            answer = self.placement.answer(first, reply, self._decode)
        return self.placement.tail_input(answer, first.new_ones(first.shape[0]))

    # -- the cloud session, opened when first needed ---------------------------------------

    def request(self, msg: pb.EdgeMessage) -> pb.CloudMessage:
        if not self.opened:
            start = self.start_step
            self._open_session(self._connect_to, self._open, self.reconnect_timeout, (0.25, 10.0))
            self.start_step = start  # the cloud's session starts at 0 whatever this run's step
            self._open.session_id = ""  # a re-attachment opens a new session: the cloud holds nothing
            self.opened = True
        return super().request(msg)

    @property
    def bytes_sent(self) -> int:
        return super().bytes_sent if self.opened else 0

    @property
    def bytes_received(self) -> int:
        return super().bytes_received if self.opened else 0

    def close(self) -> int:
        """Close the cloud session if one was opened; it applied no step (0)."""
        if not self.opened:
            return 0
        try:
            super().close()
        except CloudError as exc:  # it holds nothing of the run: the daemon drops it when idle
            log.warning("the cloud's forward-only session did not close (%s); nothing was lost", exc.details)
        return 0
