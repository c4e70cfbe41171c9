"""Nothing lost: a run interrupted by a broken link ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from proxy import TcpProxy
from safetensors import safe_open
from safetensors.torch import load_file

from sft_cloud.daemon.server import ServeConfig, create_server
from sft_cloud.sessions.registry import SessionRegistry
from sft_edge.runs.trainer import TrainConfig, train


@pytest.fixture
def daemon(tmp_path):
    """An in-process daemon that keeps each closed session's final net2 in a checkpoint dir."""
    registry = SessionRegistry(max_sessions=4, checkpoint_dir=str(tmp_path / "cloud"))
    server, port, _ = create_server(ServeConfig(host="127.0.0.1", port=0, insecure=True), registry)
    yield port, registry
    server.stop(0).wait()


def _config(glue_dir, tmp_path, name, cloud, **kw):
    values = dict(
        task="sst2", cloud=cloud, model="random:tiny", data_dir=glue_dir, batch_size=8, max_steps=14,
        max_train_examples=64, max_eval_examples=48, lr=1e-3, insecure=True, progress=False,
        output_dir=str(tmp_path / name), step_timeout=3.0, reconnect_timeout=30.0,
    )  # fmt: skip
    values.update(kw)
    return TrainConfig(**values)


def _final_cloud(registry, session_id):
    return load_file(f"{registry.checkpoint_dir}/{session_id}/final.safetensors")


def _assert_identical(a_report, b_report, a_dir, b_dir, registry):
    assert a_report["metrics"] == b_report["metrics"]
    assert a_report["eval_history"] == b_report["eval_history"]
    edge_a, edge_b = load_file(f"{a_dir}/edge.safetensors"), load_file(f"{b_dir}/edge.safetensors")
    assert edge_a.keys() == edge_b.keys() and all(torch.equal(edge_a[k], edge_b[k]) for k in edge_a)
    cloud_a = _final_cloud(registry, a_report["session_id"])
    cloud_b = _final_cloud(registry, b_report["session_id"])
    assert cloud_a.keys() == cloud_b.keys() and all(torch.equal(cloud_a[k], cloud_b[k]) for k in cloud_a)


@pytest.mark.parametrize(
    "direction, action",
    [
        ("down", "cut"),  # the cloud applied the step, its answer was lost: the cache answers the retry
        ("up", "cut"),  # the step never reached the cloud: it is sent again and applied once
        ("down", "freeze"),  # the link goes silent without a reset: the step deadline notices
    ],
)
def test_broken_link_mid_step_changes_nothing(daemon, glue_dir, tmp_path, direction, action):
    port, registry = daemon
    ref = train(_config(glue_dir, tmp_path, "ref", f"127.0.0.1:{port}"))
    assert ref["resumes"] == 0

    proxy = TcpProxy(("127.0.0.1", port))
    # Break the link part-way through the run (after about 10 KB of traffic in that direction).
    if action == "cut":  # the other direction flows on for 0.5 s, then both reset
        proxy.cut_after(direction, 10_000, grace=0.5)
    else:
        proxy.freeze_after(direction, 10_000)
    run = train(_config(glue_dir, tmp_path, "cut", proxy.address))
    proxy.close()

    assert proxy.tripped.is_set(), "the proxy never broke the link: the test would prove nothing"
    assert run["resumes"] >= 1 and run["steps"] == ref["steps"] == 14
    assert run["cloud_steps"] == 14  # each step applied exactly once
    with safe_open(f"{registry.checkpoint_dir}/{run['session_id']}/final.safetensors", "pt") as f:
        replayed = int(f.metadata()["replayed"])
    if direction == "down":  # the answer was lost after the cloud applied the step: served from cache
        assert replayed == 1
    _assert_identical(ref, run, tmp_path / "ref", tmp_path / "cut", registry)
