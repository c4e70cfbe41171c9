"""Drop-in split training for an existing PyTorch / Hugging Face loop (the paper's Listing 1).

    import sft_edge.api as sft                                                    # +1
    model, optimizer = sft.wrap(model, optimizer, cloud="gpu-host:50051",        # +2
                                total_steps=epochs * len(loader), insecure=True)
    for batch in loader:                      # the loop itself is unchanged
        loss = model(**batch, labels=y).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.close()                                                                 # +3

``wrap`` opens a cloud session for the model's checkpoint (the cloud loads the same weights by
name and checks the fingerprint), keeps net1 here and returns a module whose forward sends the
cut activations as one ``TrainStep``. The cloud runs net2, computes the loss, updates net2 and
answers with the loss and ∂loss/∂activations; the returned loss tensor hangs on net1's graph,
so ``loss.backward()`` feeds that gradient into net1 and ``optimizer.step()`` updates net1.

What differs from the unsplit loop, by construction of split training:
- one training forward is one cloud step (the cloud updates net2 when it answers), so gradient
  accumulation over several forwards is not supported;
- both halves use AdamW with the wrapped optimizer's lr and weight decay and a linear decay to
  zero at ``total_steps`` (the protocol carries no other optimizer), and the classification
  head lives on the cloud, initialised from ``seed``;
- the loss is the task loss the cloud computes (cross-entropy; MSE when ``num_labels == 1``);
- inputs must be right-padded (the attention mask is sent as per-example lengths).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple, Union

import torch
from torch import nn

from sft_common.models.base_model import (
    DEFAULT_MODEL,
    BaseModel,
    family_of,
    load_base_model,
    packaged_minilm_dir,
)
from sft_common.models.lora import LoraSpec
from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import task_loss
from sft_edge.data.glue import Batch
from sft_edge.link.connect import ROUTE_HEADER, route_key
from sft_edge.link.transport import connector
from sft_edge.runs.config import LinkOptions, OptimConfig, TrainConfig
from sft_edge.sessions.two_part import EdgeSession

log = logging.getLogger("sft_edge")


class _CloudLoss(torch.autograd.Function):
    """The cloud's loss as a function of the cut activations: forward returns the loss value the
    cloud computed, backward hands back the gradient the cloud sent (scaled by the incoming one)."""

    @staticmethod
    def forward(ctx: Any, activations: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


class SplitOutput(dict):
    """What a Hugging Face ``*ForSequenceClassification`` returns: ``.loss`` and ``.logits``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class SplitModel(nn.Module):
    """net1 here, net2 in a cloud session; called like the Hugging Face model it replaces."""

    def __init__(self, session: EdgeSession):
        super().__init__()
        self.session = session
        self.net1 = session.net1  # registered, so .parameters(), .train(), .eval() and .to() reach it
        self.step = session.start_step  # the number the next training forward sends
        self._eval_batches = 0

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **unused: Any,
    ) -> SplitOutput:
        batch = _batch(input_ids, attention_mask, token_type_ids, labels)
        if self.training and labels is not None:
            return SplitOutput(loss=self._train_forward(batch), logits=None)
        logits = self.session.predict(batch, self._eval_batches)
        self._eval_batches += 1
        loss = task_loss(logits, batch.labels) if labels is not None else None
        return SplitOutput(loss=loss, logits=logits)

    def _train_forward(self, batch: Batch) -> torch.Tensor:
        packed, grad, value = self.session.exchange(self.step, batch)
        self.step += 1
        loss = torch.tensor(value, dtype=packed.dtype, device=packed.device)
        return _CloudLoss.apply(packed, loss, grad)

    @property
    def bytes_sent(self) -> int:
        return self.session.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.session.bytes_received

    def close(self) -> int:
        """Close the cloud session (the cloud keeps net2 with a checkpoint dir); returns its steps."""
        return self.session.close()


class SplitOptimizer(torch.optim.Optimizer):
    """Steps net1's AdamW and the session's LR schedule; the cloud steps net2 when it answers.

    A real ``torch.optim.Optimizer`` (its ``param_groups`` and ``state`` are net1's optimizer's),
    so a scheduler or ``transformers.Trainer`` can drive it. The cloud follows the schedule the
    session was opened with (``total_steps``, ``warmup_steps``: linear), so a scheduler of the
    user's must set the same learning rates; ``step`` refuses, saying what to change, if not.
    """

    def __init__(self, session: EdgeSession, model: SplitModel):
        self.session, self.model = session, model
        self.optimizer = session.optimizer
        super().__init__(
            [p for g in self.optimizer.param_groups for p in g["params"]], self.optimizer.defaults
        )
        self.param_groups = self.optimizer.param_groups  # one source of truth for lr and state
        self.state = self.optimizer.state
        self._stepped_at = model.step  # the cloud step of the last update

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("split training cannot re-evaluate the loss: step() takes no closure")
        forwards = self.model.step - self._stepped_at
        if forwards > 1:
            raise ValueError(
                f"{forwards} training forwards before one optimizer step: each forward is a cloud step "
                "that updates net2, so gradient accumulation cannot work (Trainer: gradient_accumulation_steps=1)"
            )
        expected = [float(lr) for lr in self.session.schedule.get_last_lr()]
        actual = [float(g["lr"]) for g in self.param_groups]
        if any(abs(a - e) > 1e-6 * max(abs(e), 1e-12) for a, e in zip(actual, expected)):
            raise ValueError(
                f"the learning rate is {actual[0]:.3g} where the split session's schedule says {expected[0]:.3g}: "
                "the cloud follows a linear decay over sft.wrap(total_steps=..., warmup_steps=...), warming up as "
                "(k+1)/(W+1); give sft.wrap the run's steps (Trainer: max_steps=total_steps, lr_scheduler_type='linear', "
                "warmup_steps=0, or drive the loop yourself for a warm-up)"
            )
        self.optimizer.step()
        self.session.schedule.step()
        self._stepped_at = self.model.step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """net1's AdamW state, in torch's format (accelerate saves and reloads it)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


def wrap(
    model: Union[nn.Module, str],
    optimizer: Optional[torch.optim.Optimizer],
    cloud: str,
    total_steps: int,
    split_layer: Optional[int] = None,
    rank: int = TrainConfig.rank,
    mode: str = "sft",  # the two-part split (sft_edge.runs.defaults: its default everywhere)
    num_labels: Optional[int] = None,
    warmup_steps: int = OptimConfig.warmup_steps,
    seed: int = OptimConfig.seed,
    factor_lr: Optional[float] = OptimConfig.factor_lr,
    max_batch_size: int = TrainConfig.batch_size,
    max_seq_len: int = TrainConfig.max_seq_len,
    wire_dtype: str = LinkOptions.wire_dtype,
    compression: str = LinkOptions.compression,
    insecure: bool = False,
    tls_ca: Optional[str] = None,
    tls_cert: Optional[str] = None,
    tls_key: Optional[str] = None,
    auth_token_file: Optional[str] = None,
    device: Optional[str] = None,
    factorise: str = TrainConfig.factorise,
) -> Tuple[SplitModel, SplitOptimizer]:
    """Turn (model, optimizer) into split training with a cloud session at ``cloud`` (HOST:PORT).

    ``model``: a Hugging Face ``*ForSequenceClassification`` of a supported family (its
    checkpoint name or folder is what the cloud loads), that name itself, or such a model wrapped
    by PEFT's ``get_peft_model`` with a ``LoraConfig``: both halves then train LoRA adapters of
    its rank, alpha and target modules on a frozen base (``--peft lora``). ``optimizer``: where lr and weight decay come
    from (AdamW defaults of the GLUE recipe when None); ``factor_lr``: the SVD factors' own
    learning rate (sft-edge's ``--factor-lr``); ``factorise``: sft-edge's ``--factorise``. The
    connection flags are sft-edge's.
    """
    lora = _peft_lora(model) if isinstance(model, nn.Module) else None
    if lora is not None:
        model = model.get_base_model()  # type: ignore[union-attr,operator]
    base = _base_model(model)
    if num_labels is None:
        num_labels = getattr(getattr(model, "config", None), "num_labels", None) or 2
    if device is None:
        params = list(model.parameters()) if isinstance(model, nn.Module) else []
        device = str(params[0].device) if params and params[0].device.type != "meta" else "cpu"
    lr, weight_decay = _hyperparameters(optimizer)
    layers = base.num_hidden_layers
    split_layer = layers - 1 if split_layer is None else split_layer
    spec = SplitSpec(split_layer=split_layer, rank=rank, mode=mode, factorise=factorise)
    spec.validate(layers, base.hidden_size, base.intermediate_size)

    optim = OptimConfig(lr, weight_decay, warmup_steps, total_steps, seed, factor_lr)
    link = LinkOptions(wire_dtype=wire_dtype, compression=compression)
    connection = (cloud, insecure, tls_ca, tls_cert, tls_key, auth_token_file)
    session = _open_session(
        connection, base, spec, num_labels, optim, link, max_batch_size, max_seq_len, device, lora
    )
    log.info(
        "split training of %s via %s: %s at layer %d, rank %d%s; net1 on %s",
        base.name,
        cloud,
        mode,
        spec.split_layer,
        rank,
        f", LoRA rank {lora.rank}" if lora else "",
        device,
    )
    model = SplitModel(session)
    return model, SplitOptimizer(session, model)


def _open_session(connection, base, spec, num_labels, optim, link, max_batch_size, max_seq_len, device, lora):
    """The two-part cloud session ``wrap`` trains through, over a channel of its own."""
    from sft_edge.link.credentials import secure_link

    cloud = connection[0]
    creds, metadata = secure_link(*connection)
    transport = connector(cloud, creds, [*metadata, (ROUTE_HEADER, route_key(None))])()
    try:
        return EdgeSession(
            base,
            spec,
            num_labels,
            transport,
            optim,
            max_batch_size,
            max_seq_len,
            link,
            device=device,
            lora=lora,
        )
    except BaseException:
        transport.close()  # the channel is ours: do not leave it open behind a refused wrap
        raise


def _peft_lora(model: nn.Module) -> Optional[LoraSpec]:
    """The LoRA of a PEFT-wrapped model (``get_peft_model(model, LoraConfig(...))``), or None.

    Both halves then train adapters of that rank, alpha and targets (``--peft lora``), starting
    from sft's seeded initialisation (B = 0, as PEFT's: the same function at the start); the
    head trains fully, as PEFT's ``task_type="SEQ_CLS"`` makes it. What the split cannot honour
    is refused by name."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    active = getattr(model, "active_adapter", "default")
    config = configs[active if isinstance(active, str) else active[0]]
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "LORA" or len(configs) > 1:
        raise ValueError(f"wrap() takes one LoRA adapter; this model has {kind} ({', '.join(configs)})")
    unsupported = {
        "lora_dropout": config.lora_dropout,
        "bias": config.bias != "none",
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "layers_to_transform": config.layers_to_transform,
    }
    named = [k for k, v in unsupported.items() if v]
    if named or not isinstance(config.target_modules, (set, list, tuple)):
        raise ValueError(
            "split LoRA supports plain adapters on named modules (LoraConfig(r, lora_alpha, target_modules=[...]));"
            f" not {', '.join(named) or 'a target_modules pattern'}"
        )
    if any("lora_B" in n and p.detach().abs().max() > 0 for n, p in model.named_parameters()):
        raise ValueError(
            "the adapters are already trained: wrap() starts LoRA afresh (merge_and_unload() first)"
        )
    return LoraSpec(int(config.r), float(config.lora_alpha), tuple(sorted(config.target_modules)))


def _base_model(model: Union[nn.Module, str]) -> BaseModel:
    """The checkpoint the model came from, by a name the cloud can resolve too."""
    if isinstance(model, str):
        return load_base_model(model)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            "wrap() takes a Hugging Face *ForSequenceClassification model, or its checkpoint's name"
        )
    family_of(config)  # an unsupported family is refused by name, saying which work
    name = getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if not name:
        raise ValueError("the model does not say which checkpoint it came from; pass its name instead")
    if os.path.isdir(name) and os.path.realpath(name) == os.path.realpath(packaged_minilm_dir()):
        name = DEFAULT_MODEL  # the packaged MiniLM: the name every daemon resolves
    return load_base_model(name)


def _hyperparameters(optimizer: Optional[torch.optim.Optimizer]) -> Tuple[float, float]:
    if optimizer is None:
        return OptimConfig.lr, OptimConfig.weight_decay
    group = optimizer.param_groups[0]
    if not isinstance(optimizer, torch.optim.AdamW):
        log.warning(
            "%s given: both halves train with AdamW at its lr and weight decay", type(optimizer).__name__
        )
    return float(group["lr"]), float(group.get("weight_decay", 0.0))


def _batch(
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    token_type_ids: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
) -> Batch:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
        raise ValueError("split training needs right-padded inputs (tokenizer padding_side='right')")
    if labels is None:
        labels = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    return Batch(input_ids, token_type_ids, attention_mask, lengths.tolist(), labels)
