"""Delta mode (``--delta-cache-mb``) through a real gRPC server, tiny Llama + LoRA over 3 epochs.

The U (causal LM, both full-width cuts) and the two-part split (classification) train the same
batches three times on an fp32 wire, so delta mode's defaults send epoch 1 in fp32 and later epochs
as 2-bit differences: each step's loss stays within that rounding of the same run without delta
mode, and epochs 2 and 3 cost fewer bytes than epoch 1, counted from the serialised messages. Tolerances are about 5x what was measured (CPU, torch 2.13; printed with pytest -s).
"""

from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch
from helpers import random_batch
from test_ushape_lm_grpc import OPTIM, lm_batches

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_edge.link.transport import CloudError, GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions
from sft_edge.sessions.two_part import EdgeSession
from sft_edge.sessions.ushape import UShapeSession

LORA = LoraSpec(rank=4, alpha=8.0)
EPOCHS = 3
PLAIN = LinkOptions(wire_dtype="fp32")
DELTA = LinkOptions(wire_dtype="fp32", delta_cache_mb=1.0)
OPTIM_3 = dataclasses.replace(OPTIM, total_steps=12)
U_TOLERANCE, TWO_PART_TOLERANCE = 5e-3, 4e-3  # measured 9.0e-4 and 8.1e-4


def _u(address, link):
    base = load_base_model("random:tiny-llama")
    spec = UShapeSpec(split_layer=0, tail_layers=1, mode="sl")
    return UShapeSession(
        base, spec, 0, GrpcTransport(open_channel(address)), OPTIM_3, batch_size=8, max_seq_len=32,
        link=link, lora=LORA, causal_lm=True,
    )  # fmt: skip


def _two_part(address, link):
    base = load_base_model("random:tiny-llama")
    return EdgeSession(
        base, SplitSpec(split_layer=1, mode="sl"), 2, GrpcTransport(open_channel(address)), OPTIM_3,
        batch_size=8, max_seq_len=64, link=link, lora=LORA,
    )  # fmt: skip


def _epochs(edge, batches):
    """Losses of every step, and the bytes (sent, received) of each epoch."""
    losses, traffic = [], []
    for epoch in range(EPOCHS):
        sent, received = edge.bytes_sent, edge.bytes_received
        for k, batch in enumerate(batches):
            losses.append(edge.train_step(epoch * len(batches) + k, batch))
        traffic.append((edge.bytes_sent - sent, edge.bytes_received - received))
    return losses, traffic


@pytest.mark.parametrize(
    "make, batches, tolerance",
    [
        pytest.param(_u, lambda: lm_batches(4), U_TOLERANCE, id="ushape"),
        pytest.param(
            _two_part,
            lambda: [random_batch(6, 14, seed=k) for k in range(4)],
            TWO_PART_TOLERANCE,
            id="two-part",
        ),
    ],
)
def test_delta_mode_trains_as_without_it_and_later_epochs_cost_less(live_server, make, batches, tolerance):
    address, registry = live_server
    plain = make(address, PLAIN)
    ref_losses, ref_traffic = _epochs(plain, batches())
    edge = make(address, DELTA)
    losses, traffic = _epochs(edge, batches())
    error = max(abs(a - b) for a, b in zip(losses, ref_losses))
    print(
        f"max |loss difference| {error:.2g}; bytes (sent, received) an epoch {traffic} against {ref_traffic}"
    )
    assert 0 < error <= tolerance
    assert all(t[0] < traffic[0][0] for t in traffic[1:])  # the first cut: deltas after epoch 1
    if make is _u:  # the middle's output down the second cut too
        assert all(t[1] < traffic[0][1] for t in traffic[1:])
    cloud = registry.get(edge.session_id).core.delta
    assert cloud is not None and edge.delta is not None
    for cut, cache in edge.delta.cuts.items():  # bitwise the same rows on both sides of each cut
        assert cache.rows.keys() == cloud[cut].rows.keys() and cache.used > 0
        assert all(torch.equal(cache.rows[k], cloud[cut].rows[k]) for k in cache.rows)
    assert edge.close() == plain.close() == EPOCHS * len(batches())


def test_a_delta_for_an_example_the_cloud_lacks_is_refused(live_server):
    address, registry = live_server
    edge = _two_part(address, DELTA)
    batch = random_batch(6, 14, seed=0)
    edge.train_step(0, batch)
    assert edge.delta is not None
    registry.get(edge.session_id).core.delta["up"].rows.clear()  # the cloud's cache lost
    with pytest.raises(CloudError, match="holds no 14 rows") as caught:
        edge.train_step(1, batch)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_delta_fields_without_delta_mode_are_refused(live_server):
    address, _ = live_server
    edge = _two_part(address, PLAIN)
    msg = pb.TrainStep(step=0, lengths=[2], labels=[0], example_keys=[b"k" * 16])
    msg.activations.CopyFrom(edge.wire.encode_activations(torch.zeros(2, 64)))
    with pytest.raises(CloudError, match="example_keys and delta are for delta mode"):
        edge.request(pb.EdgeMessage(train=msg))


def test_delta_mode_is_refused_where_no_hidden_state_crosses(live_server):
    address, _ = live_server
    base = load_base_model("random:tiny-llama")
    with pytest.raises(ValueError, match="--delta-cache-mb is for full-width cuts"):
        EdgeSession(base, SplitSpec(split_layer=1, rank=4), 2, GrpcTransport(open_channel(address)), OPTIM_3,
                    batch_size=8, max_seq_len=64, link=DELTA)  # fmt: skip


def test_the_daemon_reports_the_caches_memory(live_server):
    from sft_cloud.daemon.metrics import DaemonMetrics

    address, registry = live_server
    edge = _two_part(address, DELTA)
    edge.train_step(0, random_batch(6, 14, seed=0))
    gauge = DaemonMetrics(session_list=registry.sessions).registry.get_sample_value("sft_delta_cache_bytes")
    assert edge.delta is not None and gauge == edge.delta.used > 0


def test_micro_batches_in_flight_keep_both_caches_equal(live_server):
    """Two-part micro-batches, two in flight: each carries its examples' keys and is applied in order."""
    address, registry = live_server
    batches = [random_batch(6, 14, seed=k) for k in range(2)]
    edge = _two_part(address, dataclasses.replace(DELTA, micro_batches=3))
    _, traffic = _epochs(edge, batches)
    assert all(t[0] < traffic[0][0] for t in traffic[1:])
    cloud = registry.get(edge.session_id).core.delta
    assert edge.delta is not None and cloud is not None
    assert edge.delta["up"].rows.keys() == cloud["up"].rows.keys()
    assert all(torch.equal(v, cloud["up"].rows[k]) for k, v in edge.delta["up"].rows.items())


def test_a_daemon_without_delta_mode_is_refused_at_open(live_server, monkeypatch):
    from sft_cloud.sessions.core import SessionCore

    opened = SessionCore.opened

    def older(core, *args):  # what a daemon from before delta mode answers: the field unknown, 0
        reply = opened(core, *args)
        reply.ClearField("delta_cache_bytes")
        return reply

    monkeypatch.setattr(SessionCore, "opened", older)
    address, _ = live_server
    with pytest.raises(CloudError, match="the daemon does not run delta mode") as caught:
        _two_part(address, DELTA)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    _two_part(address, PLAIN).close()  # without delta mode it opens as before
