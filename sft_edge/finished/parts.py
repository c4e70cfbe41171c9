"""A finished run's model, opened where its parts are: through the daemon, or all in this process.

``open_model(folder, record)`` picks the opener by what the folder holds (``record.part``), from one
mapping: a split run's ``--output-dir`` (``edge``: net1, or the U's head and tail, here; the rest
on the daemon that trained it, reopened for inference only), a ``--local`` run (``full``), or an
export (``split``: both halves; ``ushape``: the U's three parts; ``ushape-side``: those and a
forward-only run's side network, ``side_parts``). Each gives an ``OpenedModel``:
a function from a batch to logits ((batch, num_labels), or a causal LM's (batch, seq, vocab)),
the module holding the weights, and how to close it. ``predict``, ``generate`` and
``load_trained`` use it and never ask which kind of run it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, cast

import torch
from safetensors.torch import load_file
from torch import nn

from sft_common.storage.checkpoint import load_owned
from sft_edge.data.glue import Batch, DataError
from sft_edge.finished.record import EDGE, FULL, RUN_FILE, SPLIT, USHAPE, USHAPE_SIDE, RunRecord


@dataclass
class OpenedModel:
    """A trained model ready to run: ``logits(batch, index)``, its weights, and ``close()``."""

    logits: Callable[..., torch.Tensor]
    module: nn.Module
    close: Callable[[], object] = lambda: None
    max_batch: Optional[int] = None  # the largest batch it takes (a daemon's session: the run's)


def open_model(folder: str, record: RunRecord, device: str = "cpu", connection=None) -> OpenedModel:
    """The model of the run in ``folder``; ``connection`` (``sft_edge.runs.config.Connection``)
    reaches the daemon that keeps a split run's cloud part."""
    try:
        opener = OPENERS[record.part]
    except KeyError:
        raise DataError(f"{folder}: {RUN_FILE} names an unknown part {record.part!r}") from None
    return opener(folder, record, device, connection)


def open_finished(folder: str, record: RunRecord, connection, device: str):
    """The run's finished cloud session, reopened for inference, with this side's trained weights."""
    from sft_common.models.base_model import load_base_model
    from sft_edge.link.connect import grpc_connector, route_key
    from sft_edge.runs.kinds import kind_of_record

    kind = kind_of_record(record)
    if kind.cloud_keeps_part and not record.session_id:
        raise DataError(f"{folder}: {RUN_FILE} names no cloud session")
    base = load_base_model(record.model)
    connect = grpc_connector(connection, route_key(folder))
    session = kind.reopen(record, base, connect, device)
    load_owned(session.module, load_file(os.path.join(folder, "edge.safetensors"), device=device))
    return session


def _through_daemon(folder: str, record: RunRecord, device: str, connection) -> OpenedModel:
    if connection is None:
        raise DataError(
            f"{folder} holds only the edge half of a split run: predict through the daemon "
            "(sft-edge predict --run DIR --cloud HOST:PORT), or `sft-edge export` it first"
        )
    session = open_finished(folder, record, connection, device)
    return OpenedModel(session.predict, session.module, session.close, record.batch_size)


def _whole(folder: str, record: RunRecord, device: str, connection) -> OpenedModel:
    """A ``--local`` run: the classifier, or the causal LM; under LoRA the base by name with the
    run's adapters on it, the way training built it."""
    from transformers import AutoConfig

    from sft_common.models.families import Decoder

    config = AutoConfig.from_pretrained(folder)
    if record.lora:
        from sft_edge.sessions.local import build_local_model

        base = base_of(record)
        model = build_local_model(
            base, record.num_labels, record.seed, device, record.lora_spec(), record.causal_lm
        )
    elif record.causal_lm:
        from sft_common.topology.ushape_lm import trained_causal_lm

        model = trained_causal_lm(config, device)
    else:
        from sft_common.topology.two_part import trained_skeleton

        model = cast(nn.Module, trained_skeleton(config, None, record.num_labels, device))
    load_owned(model, load_file(os.path.join(folder, record.weight_files[0]), device=device))
    model.eval()
    from sft_common.models.base_model import family_of

    types = not isinstance(family_of(config), Decoder)  # GPT-2 would add token-type embeddings

    def logits(batch: Batch, index: int = 0) -> torch.Tensor:
        extra = {"token_type_ids": batch.token_type_ids} if types else {}
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra).logits

    return OpenedModel(logits, model)


def _split(folder: str, record: RunRecord, device: str, connection) -> OpenedModel:
    """An exported two-part run: net1 and net2 here, the cut still factorised."""
    spec = record.split_spec()
    edge: nn.Module
    cloud: nn.Module
    if record.lora:
        from sft_common.models.lora import lora_on_halves
        from sft_common.topology.two_part import build_split_model

        edge, cloud = build_split_model(base_of(record), spec, record.num_labels, record.seed, device=device)
        lora_on_halves(edge, cloud, record.lora_spec(), record.seed)
    else:
        from transformers import AutoConfig

        from sft_common.topology.two_part import trained_skeleton

        config = AutoConfig.from_pretrained(folder)
        edge, cloud = cast(
            Tuple[nn.Module, nn.Module], trained_skeleton(config, spec, record.num_labels, device)
        )
    for module, name in zip((edge, cloud), record.weight_files):
        load_owned(module, load_file(os.path.join(folder, name), device=device))
    halves = nn.ModuleDict({"edge": edge, "cloud": cloud}).eval()

    def logits(batch: Batch, index: int = 0) -> torch.Tensor:
        cut, _ = edge(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return cloud(cut, batch.attention_mask)

    return OpenedModel(logits, halves)


def _ushape(folder: str, record: RunRecord, device: str, connection) -> OpenedModel:
    """An exported U: the head, the daemon's middle and the tail, run one after the other here."""
    head, middle, tail = load_ushape(folder, record, device)

    def logits(batch: Batch, index: int = 0) -> torch.Tensor:
        cut, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        return tail(middle(cut, batch.attention_mask)[0], batch.attention_mask)

    return OpenedModel(logits, nn.ModuleDict({"head": head, "middle": middle, "tail": tail}))


def _ushape_side(folder: str, record: RunRecord, device: str, connection) -> OpenedModel:
    """An exported forward-only U with its side network (``--adapters parallel``), all here."""
    from sft_edge.finished.side_parts import load_sided

    sided = load_sided(folder, record, device)
    return OpenedModel(sided, sided)


OPENERS: Dict[str, Callable[..., OpenedModel]] = {
    EDGE: _through_daemon,
    FULL: _whole,
    SPLIT: _split,
    USHAPE: _ushape,
    USHAPE_SIDE: _ushape_side,
}


def load_ushape(
    folder: str, record: RunRecord, device: str = "cpu", beside: Optional[Dict[str, nn.Module]] = None
) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """The head, middle and tail of an exported U-shaped run, loaded and in eval mode: built from
    the config alone, or, under LoRA, from the base model by name with the run's adapters on each
    part the way training put them. A causal LM's tail ends in its LM head (``num_labels`` 0).
    The SFT cuts stay factorised (see ``sft_edge.finished.predict.export``). ``beside``: modules
    the edge's file also holds, by name (a side network: ``side_parts``), loaded with the parts."""
    from transformers import AutoConfig

    from sft_common.topology.ushape import lora_part
    from sft_common.topology.ushape_lm import trained_ushape
    from sft_edge.sessions.tail_end import tail_end_of

    spec, seed = record.ushape_spec(), record.seed
    parts: Tuple[nn.Module, nn.Module, nn.Module]
    if record.lora:
        base, lora = base_of(record), record.lora_spec()
        parts = tail_end_of(record.causal_lm).model(base, spec, record.num_labels, seed, device)
        for which, part in zip(("head", "middle", "tail"), parts):
            lora_part(part, which, lora, seed)
    else:
        parts = trained_ushape(AutoConfig.from_pretrained(folder), spec, record.num_labels, device)
    head, middle, tail = parts
    edge, cloud = (load_file(os.path.join(folder, name), device=device) for name in record.weight_files)
    load_owned(nn.ModuleDict({"head": head, "tail": tail, **(beside or {})}), edge)  # as the edge saved them
    load_owned(middle, cloud)  # as the daemon saved its middle
    for part in parts:
        part.eval()
    return head, middle, tail


def base_of(record: RunRecord):
    """The pretrained model a run names, checked to be the one it was trained from (its LoRA
    weights need that base)."""
    from sft_common.models.base_model import load_base_model

    base = load_base_model(record.model)
    if record.base_fingerprint not in (None, base.fingerprint):
        raise DataError(
            f"{record.model} here is not the model this run was trained from (fingerprint "
            f"{base.fingerprint[:12]}, the run's {str(record.base_fingerprint)[:12]}): its LoRA weights need that base"
        )
    return base
