"""--cls-only: with the cut at the last layer, sending only the [CLS] rows changes nothing but traffic."""

from __future__ import annotations

import copy
import dataclasses

import pytest
from helpers import max_diff, params, random_batch

from sft_common.topology.spec import SplitSpec
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.two_part import EdgeSession

OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=10, seed=5)


def _train(address, base, spec, cls_only, steps=4, micro_batches=1):
    backend = EdgeSession(
        base, spec, 2, GrpcTransport(open_channel(address)), OPTIM, batch_size=8, max_seq_len=64,
        link=LinkOptions(cls_only=cls_only, micro_batches=micro_batches),
    )  # fmt: skip
    batches = [random_batch(batch=6, seq=16, seed=k) for k in range(steps)]
    losses = [backend.train_step(k, b) for k, b in enumerate(batches)]
    logits = backend.predict(random_batch(batch=5, seq=16, seed=99))
    return backend, losses, logits


@pytest.mark.parametrize("mode, micro_batches", [("sl", 1), ("sft", 1), ("sft", 3)])
def test_cls_rows_only_train_the_same_model_with_less_traffic(live_server, tiny_base, mode, micro_batches):
    address, registry = live_server
    base = tiny_base
    if mode == "sft":  # the cloud's dropout after Σ, v would draw masks for other shapes
        config = copy.deepcopy(tiny_base.config)
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
        base = dataclasses.replace(tiny_base, config=config)
        registry._bases[base.name] = base
    spec = SplitSpec(split_layer=base.config.num_hidden_layers - 1, rank=8, mode=mode)
    full, full_losses, full_logits = _train(address, base, spec, cls_only=False)
    cls, cls_losses, cls_logits = _train(address, base, spec, cls_only=True, micro_batches=micro_batches)

    assert cls_losses == pytest.approx(full_losses, abs=1e-6)
    assert float((cls_logits - full_logits).abs().max()) <= 1e-5
    assert max_diff(params(full.net1), params(cls.net1)) <= 1e-6
    cloud_full = registry.get(full.session_id).net2
    cloud_cls = registry.get(cls.session_id).net2
    assert max_diff(params(cloud_full), params(cloud_cls)) <= 1e-6
    # 6 examples of 2..16 tokens: one row each instead of all of them, both ways (the micro-batch
    # fields add a few bytes a message).
    assert cls.bytes_sent * 3 < full.bytes_sent
    assert cls.bytes_received * 3 < full.bytes_received


def test_cls_only_needs_the_cut_at_the_last_layer(live_server, tiny_base):
    address, _ = live_server
    with pytest.raises(ValueError, match="--cls-only needs the cut at the last layer \\(3\\), not 1"):
        _train(address, tiny_base, SplitSpec(split_layer=1, rank=8), cls_only=True)
