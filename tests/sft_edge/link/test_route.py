"""Every stream of a run carries the same `x-sft-route` key: across reconnects, --resume and
predict, so that an L7 proxy hashing on it sends all of them to the replica holding the session."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from sft_cloud.daemon.server import ServeConfig, create_server
from sft_cloud.sessions.registry import SessionRegistry
from sft_edge.finished import predict
from sft_edge.runs.config import Connection, PredictConfig
from sft_edge.runs.trainer import TrainConfig, train


class RecordingProxy:
    """A gRPC server that records each Train stream's metadata and relays its bytes upstream."""

    def __init__(self, upstream: str):
        self.keys: list = []
        self._up = grpc.insecure_channel(upstream)
        relay = self._up.stream_stream("/sft.v1.SplitTrainer/Train")  # raw bytes both ways

        def train(requests, context):
            self.keys.append(dict(context.invocation_metadata()).get("x-sft-route"))
            yield from relay(requests)

        handler = grpc.method_handlers_generic_handler(
            "sft.v1.SplitTrainer", {"Train": grpc.stream_stream_rpc_method_handler(train)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[handler])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def close(self):
        self.server.stop(0).wait()
        self._up.close()


@pytest.fixture
def proxied(tmp_path):
    registry = SessionRegistry(checkpoint_dir=str(tmp_path / "cloud"))
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    proxy = RecordingProxy(f"127.0.0.1:{port}")
    # the health check the edge makes first goes to the daemon itself
    yield proxy, f"127.0.0.1:{port}"
    proxy.close()
    server.stop(0).wait()


def test_one_key_per_run_kept_in_its_folder_for_predict(tmp_path, proxied, glue_dir):
    proxy, _ = proxied
    values = dict(
        task="sst2", data_dir=glue_dir, cloud=f"127.0.0.1:{proxy.port}", insecure=True, model="random:tiny",
        batch_size=8, max_train_examples=32, max_eval_examples=16, max_steps=2, progress=False,
    )  # fmt: skip
    train(TrainConfig(output_dir=str(tmp_path / "a"), **values))
    train(TrainConfig(output_dir=str(tmp_path / "b"), **values))
    (tmp_path / "in.txt").write_text("a film\n")
    conn = Connection(cloud=f"127.0.0.1:{proxy.port}", insecure=True)
    predict.predict(
        PredictConfig(str(tmp_path / "a"), str(tmp_path / "in.txt"), str(tmp_path / "p.csv"), conn)
    )
    key_a, key_b = ((tmp_path / run / "route-key").read_text().strip() for run in ("a", "b"))
    assert len(key_a) == 32 and key_a != key_b
    assert proxy.keys == [key_a, key_b, key_a]


def test_the_key_survives_a_restart_of_the_edge(tmp_path):
    from sft_edge.link.connect import keep_route_key, route_key

    first = route_key(str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written before a session opens
    keep_route_key(str(tmp_path / "run"), first)
    assert route_key(str(tmp_path / "run")) == first  # what --resume in a new process reads again
    assert route_key(None) != route_key(None)
