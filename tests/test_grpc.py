"""The live daemon: refusals arrive as gRPC statuses, the session survives them, health answers."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import random_batch, session_config

from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.wire import codec
from sft_edge.link.transport import CloudError, GrpcTransport, open_channel
from sft_edge.runs.config import OptimConfig
from sft_edge.sessions.two_part import EdgeSession


def test_health_service_reports_serving(live_server):
    address, _ = live_server
    stub = health_pb2_grpc.HealthStub(open_channel(address))
    for service in ("", "sft.v1.SplitTrainer"):
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service=service)).status
            == health_pb2.HealthCheckResponse.SERVING
        )


def _open(address, base):
    config = session_config()
    fp = session_fingerprint(base.fingerprint, SplitSpec(split_layer=3, rank=8), 2)
    t = GrpcTransport(open_channel(address))
    opened = t.call(pb.EdgeMessage(open=pb.OpenSession(config=config, fingerprint=fp))).opened
    return t, opened, config, fp


def _train(k, lengths=(3, 2), width=8):
    acts = codec.encode(torch.randn(sum(lengths), width))
    return pb.EdgeMessage(train=pb.TrainStep(step=k, activations=acts, lengths=list(lengths), labels=[0, 1]))


@pytest.mark.parametrize(
    "bad, code, match",
    [
        (
            _train(3),
            grpc.StatusCode.FAILED_PRECONDITION,
            "step 3 is out of order: the session expects step 1",
        ),
        (_train(1, width=5), grpc.StatusCode.INVALID_ARGUMENT, "dimension 1 is 5, expected 8"),
        (
            pb.EdgeMessage(
                train=pb.TrainStep(
                    step=1,
                    lengths=[2],
                    labels=[0],
                    activations=pb.Tensor(dtype=pb.BFLOAT16, shape=[2, 8], data=b"\0" * 32),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dtype BFLOAT16",
        ),
    ],
)
def test_refusal_is_a_status_and_the_session_survives(live_server, tiny_base, bad, code, match):
    address, registry = live_server
    t, opened, config, fp = _open(address, tiny_base)
    t.call(_train(0))
    with pytest.raises(CloudError, match=match) as info:
        t.call(bad)
    assert info.value.code == code
    session = registry.get(opened.session_id)
    assert session.next_step == 1
    # A new stream re-attaches to the same session and carries on from step 1.
    t2 = GrpcTransport(open_channel(address))
    again = t2.call(
        pb.EdgeMessage(open=pb.OpenSession(config=config, fingerprint=fp, session_id=opened.session_id))
    )
    assert again.opened.next_step == 1
    assert t2.call(_train(1)).train.step == 1 and session.next_step == 2


def test_unknown_session_over_the_wire(live_server):
    address, _ = live_server
    t = GrpcTransport(open_channel(address))
    with pytest.raises(CloudError, match="no session with this id") as info:
        t.call(pb.EdgeMessage(open=pb.OpenSession(config=session_config(), session_id="made-up")))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_several_sessions_at_once_each_with_its_own_net2(live_server, tiny_base):
    address, registry = live_server
    optim = OptimConfig(lr=1e-3, total_steps=10, seed=1)
    backends = [
        EdgeSession(
            tiny_base, SplitSpec(split_layer=l, rank=4), 2, GrpcTransport(open_channel(address)), optim, 8, 64
        )
        for l in (1, 3)
    ]
    for k in range(3):
        for b in backends:
            b.train_step(k, random_batch(seed=k))
    sessions = [registry.get(b.session_id) for b in backends]
    assert [s.next_step for s in sessions] == [3, 3]
    assert sessions[0].net2 is not sessions[1].net2
    assert len(sessions[0].net2.layers) == 2 and len(sessions[1].net2.layers) == 0


def test_no_daemon_is_a_clear_error():
    with pytest.raises(CloudError, match="no sft-cloud daemon answered at 127.0.0.1:1"):
        open_channel("127.0.0.1:1", connect_timeout=1)
