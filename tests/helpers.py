"""Helpers the tests share: batches of token ids, session configs, in-process split training."""

from __future__ import annotations

import csv
import json
from typing import Any, Dict, List

import lz4.block
import torch

from sft_common.proto import sft_pb2 as pb
from sft_edge.data.glue import Batch


def random_batch(batch: int = 4, seq: int = 12, num_labels: int = 2, seed: int = 0) -> Batch:
    """Right-padded random token ids with varied lengths (the first example is full length)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [seq] + torch.randint(2, seq + 1, (batch - 1,), generator=g).tolist()
    ids = torch.randint(1000, 5000, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, num_labels, (batch,), generator=g)
    return Batch(ids, torch.zeros_like(ids), mask, lengths, labels)


def session_config(
    model: str = "random:tiny",
    mode: int = pb.SFT,
    split_layer: int = 3,
    rank: int = 8,
    wire_dtype: int = pb.FLOAT32,
    total_steps: int = 100,
    **kw,
) -> pb.SessionConfig:
    values = dict(
        model=model,
        mode=mode,
        split_layer=split_layer,
        rank=rank,
        num_labels=2,
        wire_dtype=wire_dtype,
        lr=1e-3,
        weight_decay=0.01,
        warmup_steps=2,
        total_steps=total_steps,
        seed=7,
        max_batch_size=8,
        max_seq_len=64,
        task="sst2",
    )
    values.update(kw)
    return pb.SessionConfig(**values)


def open_stream(registry, base, owner="edge-a", **kw):
    """A stream protocol on ``registry`` with a session opened for ``session_config(**kw)``."""
    from sft_cloud.daemon.protocol import StreamProtocol
    from sft_common.topology.spec import SplitSpec, session_fingerprint

    config = session_config(**kw)
    spec = SplitSpec(
        split_layer=config.split_layer, rank=config.rank, mode="sft" if config.mode == pb.SFT else "sl"
    )
    fp = session_fingerprint(base.fingerprint, spec, config.num_labels)
    proto = StreamProtocol(registry, owner)
    proto.handle(pb.EdgeMessage(open=pb.OpenSession(config=config, fingerprint=fp)))
    return proto


def train_message(k, lengths=(5, 3), width=8, labels=(0, 1), dtype=pb.FLOAT32, **kw):
    """A TrainStep of step ``k`` with random activations."""
    from sft_common.wire import codec

    acts = codec.encode(torch.randn(sum(lengths), width), dtype)
    return pb.EdgeMessage(
        train=pb.TrainStep(step=k, activations=acts, lengths=list(lengths), labels=list(labels), **kw)
    )


def params(module: torch.nn.Module) -> List[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def max_diff(a: List[torch.Tensor], b: List[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


class AllocationSpy:
    """Records every size the decoder asks for: what ``torch.frombuffer`` and lz4 would allocate.

    A context manager rather than ``monkeypatch``: hypothesis runs many examples in one test."""

    def __init__(self):
        self.sizes: List[int] = []
        self._frombuffer, self._decompress = torch.frombuffer, lz4.block.decompress

    def __enter__(self) -> AllocationSpy:
        def frombuffer(buffer, *args, **kw):
            self.sizes.append(len(buffer))
            return self._frombuffer(buffer, *args, **kw)

        def decompress(data, *args, uncompressed_size=-1, **kw):
            self.sizes.append(uncompressed_size)
            return self._decompress(data, *args, uncompressed_size=uncompressed_size, **kw)

        torch.frombuffer, lz4.block.decompress = frombuffer, decompress  # type: ignore[assignment]
        return self

    def __exit__(self, *exc) -> None:
        torch.frombuffer, lz4.block.decompress = self._frombuffer, self._decompress  # type: ignore[assignment]

    def assert_bounded(self, cap: int) -> None:
        assert all(0 <= n <= cap for n in self.sizes), f"allocation from a claimed size: {self.sizes}"


def train_in_one_process(base, spec, optim, batches, micro_batches: int = 1, lora=None):
    """The reference for split training: the same factorised model, both halves under one
    optimizer and one autograd graph, dropout seeded as each side seeds it. With
    ``micro_batches`` > 1 each micro-batch's mean loss counts by its share of the batch,
    gradients accumulate and the update comes once a step. Returns (edge, cloud, losses)."""
    from sft_common.topology.two_part import build_split_model, factor_parameters
    from sft_common.training import make_optimizer, make_schedule, one_process_step

    edge, cloud = build_split_model(base, spec, 2, optim.seed)
    if lora is not None:  # the adapters each side puts on its half, seeded as there
        from sft_common.models.lora import lora_on_halves

        lora_on_halves(edge, cloud, lora.resolved(base.config.model_type), optim.seed)
    factors = factor_parameters(edge) + factor_parameters(cloud)
    opt = make_optimizer(
        list(edge.parameters()) + list(cloud.parameters()),
        optim.lr,
        optim.weight_decay,
        factors,
        optim.factor_lr,
    )
    sched = make_schedule(opt, optim.warmup_steps, optim.total_steps)
    edge.train(), cloud.train()
    losses = [
        one_process_step(edge, cloud, opt, sched, batch, optim.seed, k, micro_batches)
        for k, batch in enumerate(batches)
    ]
    return edge, cloud, losses


REVIEW_WORDS = {"good": ["great", "fine", "lovely", "superb"], "bad": ["awful", "dull", "poor", "boring"]}


def write_reviews(path, n: int, offset: int = 0) -> str:
    """A CSV of ``n`` short reviews with column names of our own ("opinion", "verdict") and string
    labels ("good" / "bad", alternating); ``offset`` gives other sentences (a dev set)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["opinion", "verdict"])
        for k in range(offset, offset + n):
            label = "good" if k % 2 else "bad"
            words = REVIEW_WORDS[label]
            w.writerow([f"a {words[k % 4]} film, {words[(k + 1) % 4]} acting", label])
    return str(path)


def interrupt_then_resume(monkeypatch, session_class, values: Dict[str, Any], output_dir, at: int = 4):
    """Ctrl-C during step ``at`` of ``train(TrainConfig(output_dir, **values))`` (``session_class``'s
    train_step raises KeyboardInterrupt), then ``--resume`` in the same folder: the resumed report."""
    import pytest

    from sft_edge.runs.config import TrainConfig
    from sft_edge.runs.trainer import Interrupted, train

    step = session_class.train_step

    def stop(self, k, batch):
        if k == at:
            raise KeyboardInterrupt
        return step(self, k, batch)

    monkeypatch.setattr(session_class, "train_step", stop)
    with pytest.raises(Interrupted, match=f"interrupted at step {at}"):
        train(TrainConfig(output_dir=str(output_dir), **values))
    monkeypatch.setattr(session_class, "train_step", step)
    return train(TrainConfig(output_dir=str(output_dir), resume=True, **values))


LM_WORDS = ["red", "green", "blue", "apple", "river", "stone", "light", "house"]


def write_completion_rows(path, n: int, offset: int = 0) -> str:
    """A JSONL of ``n`` prompt/completion rows: the completion repeats the prompt's words in reverse."""
    with open(path, "w") as f:
        for k in range(offset, offset + n):
            words = [LM_WORDS[(k + j) % len(LM_WORDS)] for j in range(3)]
            f.write(json.dumps({"prompt": " ".join(words), "completion": " ".join(reversed(words))}) + "\n")
    return str(path)


def assert_predicts_as(backend, edge_ref, cloud_ref, tolerance: float = 1e-5) -> None:
    """Evaluation through the daemon (``backend.predict``) gives the one-process halves' logits."""
    batch = random_batch(batch=5, seq=11, seed=42)
    edge_ref.eval(), cloud_ref.eval()
    with torch.no_grad():
        cut, _ = edge_ref(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        want = cloud_ref(cut, batch.attention_mask)
    assert float((backend.predict(batch) - want).abs().max()) <= tolerance
