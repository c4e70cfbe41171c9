"""The daemon's Prometheus endpoint counts sessions, steps, bytes and latency; logs can be JSON."""

from __future__ import annotations

import io
import json
import logging
import urllib.request

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import session_config
from prometheus_client.parser import text_string_to_metric_families

from sft_cloud.daemon.metrics import DaemonMetrics
from sft_cloud.daemon.server import ServeConfig, create_server
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.logs import setup_logging
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.spec import SplitSpec, session_fingerprint
from sft_common.wire import codec
from sft_edge.link.transport import CloudError, GrpcTransport, open_channel


@pytest.fixture
def metered_server():
    registry = SessionRegistry(device="cpu", max_sessions=4)
    metrics = DaemonMetrics(sessions=registry.__len__)
    http, http_port = metrics.serve(0, "127.0.0.1")
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry, metrics)
    yield f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}/metrics"
    server.stop(0).wait()
    http.shutdown()  # type: ignore[attr-defined]


def scrape(url: str) -> dict:
    """{(sample name, sorted labels): value} of one scrape."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_endpoint_counts_a_session(metered_server, tiny_base):
    address, url = metered_server
    before = scrape(url)
    assert before[("sft_sessions", ())] == 0
    assert before[("sft_train_steps_total", ())] == 0

    fp = session_fingerprint(tiny_base.fingerprint, SplitSpec(split_layer=3, rank=8), 2)
    t = GrpcTransport(open_channel(address))
    t.call(pb.EdgeMessage(open=pb.OpenSession(config=session_config(), fingerprint=fp)))
    for k in range(3):
        acts = codec.encode(torch.randn(5, 8))
        t.call(pb.EdgeMessage(train=pb.TrainStep(step=k, activations=acts, lengths=[3, 2], labels=[0, 1])))
    during = scrape(url)
    assert during[("sft_sessions", ())] == 1
    assert during[("sft_streams", ())] == 1
    assert during[("sft_train_steps_total", ())] == 3
    assert during[("sft_messages_total", (("kind", "open"),))] == 1
    assert during[("sft_step_seconds_count", (("kind", "train"),))] == 3
    assert during[("sft_step_seconds_sum", (("kind", "train"),))] > 0
    # The daemon counts the same serialized bytes as the edge's transport, each way.
    assert during[("sft_received_bytes_total", ())] == t.bytes_sent
    assert during[("sft_sent_bytes_total", ())] == t.bytes_received

    with pytest.raises(CloudError):  # out of order: refused, counted by status code
        t.call(pb.EdgeMessage(train=pb.TrainStep(step=9, activations=codec.encode(torch.randn(5, 8)))))
    t.close()
    after = scrape(url)
    assert after[("sft_refused_total", (("code", "FAILED_PRECONDITION"),))] == 1
    assert after[("sft_streams", ())] == 0


def test_reflection_lists_the_services(live_server):
    address, _ = live_server
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(address))
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in next(replies).list_services_response.service}
    assert {"sft.v1.SplitTrainer", "grpc.health.v1.Health"} <= names


def test_json_logs_carry_extra_fields():
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging("INFO", "json", stream)
    try:
        logging.getLogger("sft_cloud").info("step %d done", 4, extra={"session": "ab12", "step": 4})
    finally:
        root.handlers[:], root.level = handlers, level
    record = json.loads(stream.getvalue())
    assert record["msg"] == "step 4 done"
    assert record["level"] == "INFO" and record["logger"] == "sft_cloud"
    assert record["session"] == "ab12" and record["step"] == 4
    assert record["ts"].endswith("Z")
