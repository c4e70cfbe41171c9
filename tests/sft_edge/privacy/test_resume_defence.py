"""A defended run (noise on the activations and on the U's gradient up) interrupted by a broken
link through a real daemon ends bit-identical to an uninterrupted one: the noise of each message is
drawn from (seed, side, step), so a re-sent step sends the same bytes."""

from __future__ import annotations

import pytest
import torch
from proxy import TcpProxy
from safetensors.torch import load_file

from sft_cloud.daemon.server import ServeConfig, create_server
from sft_cloud.sessions.registry import SessionRegistry
from sft_edge.runs.trainer import TrainConfig, train


@pytest.fixture
def cloud(tmp_path):
    registry = SessionRegistry(max_sessions=4, checkpoint_dir=str(tmp_path / "cloud"))
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    yield port, registry
    server.stop(0).wait()


def _defended(glue_dir, out, address) -> TrainConfig:
    return TrainConfig(
        task="sst2", cloud=address, model="random:tiny", data_dir=glue_dir, batch_size=8, max_steps=10,
        max_train_examples=64, max_eval_examples=32, lr=1e-3, insecure=True, progress=False,
        output_dir=str(out), step_timeout=3.0, reconnect_timeout=30.0, label_private=True,
        dp_noise=0.5, dp_clip=5.0, dp_grad_noise=0.5, dp_grad_clip=0.01,
    )  # fmt: skip


def test_a_defended_u_run_resumes_bitwise_after_a_broken_link(cloud, glue_dir, tmp_path):
    port, registry = cloud
    ref = train(_defended(glue_dir, tmp_path / "ref", f"127.0.0.1:{port}"))
    proxy = TcpProxy(("127.0.0.1", port))
    proxy.cut_after("up", 6_000, grace=0.5)  # a step's message lost on its way up: sent again
    run = train(_defended(glue_dir, tmp_path / "cut", proxy.address))
    proxy.close()
    assert proxy.tripped.is_set() and run["resumes"] >= 1 and run["cloud_steps"] == 10
    assert run["eval_history"] == ref["eval_history"]
    for name in ("edge.safetensors",):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cloud_a = load_file(f"{registry.checkpoint_dir}/{ref['session_id']}/final.safetensors")
    cloud_b = load_file(f"{registry.checkpoint_dir}/{run['session_id']}/final.safetensors")
    assert all(torch.equal(cloud_a[k], cloud_b[k]) for k in cloud_a)
    assert ref["privacy"]["defence"]["gradient_up"] == {"noise": 0.5, "clip": 0.01}
