"""LoRA sessions of one model and split hold one frozen base (the U's middle, a two-part net2): a
later one allocates only its own tensors (a two-part head included)."""

from __future__ import annotations

from typing import Dict, Set

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sft_cloud.sessions.registry import SessionRegistry
from sft_cloud.sessions.two_part import TwoPartSession
from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import FFN_INPUT, FFN_OUTPUT, SplitSpec, session_fingerprint

MODEL = "random:minilm"  # 6 BERT layers of 384: a middle of a few layers, 8-wide factors and adapters


class TensorBytes(TorchDispatchMode):
    """Adds up the bytes of every tensor storage an operation creates (not a view of an input's),
    off the meta device: what building a session allocates, transient copies included."""

    def __init__(self) -> None:
        super().__init__()
        self.created = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_ptr(t) for t in _flat(args) + _flat(kwargs)}
        for t in _flat(out):
            if t.device.type != "meta" and _ptr(t) not in inputs:
                inputs.add(_ptr(t))
                self.created += t.untyped_storage().nbytes()
        return out


def _flat(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat(item)]
    if isinstance(x, dict):
        return _flat(list(x.values()))
    return []


def _ptr(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.untyped_storage().data_ptr()


@pytest.fixture(scope="module")
def base():
    return load_base_model(MODEL)


def _config(mode: pb.Mode, factorise: pb.Factorise, lora_rank: int = 8, **two_part) -> pb.SessionConfig:
    """A U session's config at split layer 1 (one tail layer); ``two_part``: ``num_labels`` and
    ``seed`` of a two-part one instead."""
    return pb.SessionConfig(
        model=MODEL,
        mode=mode,
        split_layer=1,
        rank=8,
        num_labels=two_part.get("num_labels", 0),
        wire_dtype=pb.FLOAT32,
        lr=1e-3,
        total_steps=10,
        seed=two_part.get("seed", 7),
        max_batch_size=8,
        max_seq_len=64,
        label_private=not two_part,
        tail_layers=0 if two_part else 1,
        factorise=factorise,
        lora_rank=lora_rank,
        lora_alpha=16.0 * bool(lora_rank),
    )


def _open(
    registry: SessionRegistry, base, mode: pb.Mode, factorise: pb.Factorise, lora_rank: int = 8, **two_part
):
    config = _config(mode, factorise, lora_rank, **two_part)
    lora = LoraSpec(8, 16.0).resolved(base.config.model_type).as_dict() if lora_rank else None
    spec = SplitSpec(
        1, 8, "sft" if mode == pb.SFT else "sl", factorise=FFN_INPUT if factorise else FFN_OUTPUT
    )
    tail = None if two_part else 1
    fingerprint = session_fingerprint(base.fingerprint, spec, config.num_labels, lora, tail)
    return registry.open(pb.OpenSession(config=config, fingerprint=fingerprint), "edge-a")


def _storages(module: torch.nn.Module, trainable: bool) -> Dict[str, int]:
    return {n: p.data_ptr() for n, p in module.named_parameters() if p.requires_grad == trainable}


def _bytes(module: torch.nn.Module) -> int:
    seen: Set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


@pytest.mark.parametrize(
    "mode, factorise",
    [(pb.SFT, pb.FFN_OUTPUT), (pb.SFT, pb.FFN_INPUT), (pb.SL, pb.FFN_OUTPUT)],
    ids=["ffn-output", "ffn-input", "sl"],
)
def test_a_second_u_lora_session_shares_the_frozen_middle_and_allocates_only_its_own(base, mode, factorise):
    registry = SessionRegistry()
    registry._bases[MODEL] = base  # one copy of the base model for the whole module
    first = _open(registry, base, mode, factorise)
    with TensorBytes() as counted:
        second = _open(registry, base, mode, factorise)
    middle = _bytes(second.net2)
    assert counted.created < 0.05 * middle, (counted.created, middle)
    frozen = _storages(first.net2, trainable=False)
    assert frozen and frozen == _storages(second.net2, trainable=False)  # the same storage
    own = _storages(second.net2, trainable=True)  # adapters and factors: each session's own
    assert own and not set(own.values()) & set(_storages(first.net2, trainable=True).values())
    for (name, a), b in zip(first.net2.named_parameters(), second.net2.parameters()):
        assert torch.equal(a, b), name  # the same start: factors, adapters (same seed) and base


@pytest.mark.parametrize(
    "mode, factorise",
    [(pb.SFT, pb.FFN_OUTPUT), (pb.SFT, pb.FFN_INPUT), (pb.SL, pb.FFN_OUTPUT)],
    ids=["ffn-output", "ffn-input", "sl"],
)
def test_a_second_two_part_lora_session_shares_the_frozen_base_and_builds_its_own_head(base, mode, factorise):
    registry = SessionRegistry()
    registry._bases[MODEL] = base
    first = _open(registry, base, mode, factorise, num_labels=3, seed=7)
    with TensorBytes() as counted:  # another seed and label count: another head, the same base
        second = _open(registry, base, mode, factorise, num_labels=2, seed=8)
    frozen = _storages(first.net2, trainable=False)
    frozen_bytes = _bytes(first.net2) - sum(
        p.untyped_storage().nbytes() for p in first.net2.parameters() if p.requires_grad
    )
    assert counted.created < 0.05 * frozen_bytes, (counted.created, frozen_bytes)
    assert frozen and frozen == _storages(second.net2, trainable=False)  # the same storage
    own = _storages(second.net2, trainable=True)  # adapters, factors and head: each session's own
    assert own and not set(own.values()) & set(_storages(first.net2, trainable=True).values())
    assert second.net2.classifier.weight.shape[0] == 2
    for session, (labels, seed) in ((first, (3, 7)), (second, (2, 8))):
        alone = TwoPartSession("solo", "edge-a", _config(mode, factorise, num_labels=labels, seed=seed), base)
        assert session.edge_factor is not None or mode == pb.SL
        if session.edge_factor is not None:
            assert torch.equal(session.edge_factor, alone.edge_factor)
        assert session.fingerprint == alone.fingerprint
        mine = dict(session.net2.named_parameters())
        assert mine.keys() == dict(alone.net2.named_parameters()).keys()
        for name, value in alone.net2.named_parameters():  # the start of a solo build, head included
            assert torch.equal(mine[name], value), name
            assert mine[name].requires_grad == value.requires_grad, name


def test_full_fine_tuning_sessions_share_nothing(base):
    registry = SessionRegistry()
    registry._bases[MODEL] = base
    first = _open(registry, base, pb.SFT, pb.FFN_OUTPUT, lora_rank=0)
    second = _open(registry, base, pb.SFT, pb.FFN_OUTPUT, lora_rank=0)
    ptrs = set(_storages(first.net2, trainable=True).values())
    assert ptrs and not ptrs & set(_storages(second.net2, trainable=True).values())
