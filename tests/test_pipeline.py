"""Micro-batches in flight (--micro-batches): the same update as the whole batch, overlapped."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from daemon import start_daemon, stop_daemon
from helpers import max_diff, params, random_batch, train_in_one_process
from proxy import TcpProxy
from safetensors import safe_open
from safetensors.torch import load_file

from sft_common.topology.spec import SplitSpec
from sft_common.topology.two_part import build_split_model
from sft_edge.link.transport import GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.runs.trainer import TrainConfig, train
from sft_edge.sessions.two_part import EdgeSession

STEPS = 4
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=10, seed=5)


def _batches():
    return [random_batch(batch=7, seq=14, seed=k) for k in range(STEPS)]


def _backend(address, base, spec, micro_batches, depth=2, transport=None):
    return EdgeSession(
        base, spec, 2, transport or GrpcTransport(open_channel(address)), OPTIM, batch_size=8,
        max_seq_len=64, link=LinkOptions(wire_dtype="fp32", micro_batches=micro_batches, pipeline_depth=depth),
    )  # fmt: skip


def _micro_batched_in_one_process(base, spec, micro_batches):
    return train_in_one_process(base, spec, OPTIM, _batches(), micro_batches)


def test_batch_split_keeps_every_example_once():
    batch = random_batch(batch=7, seq=14, seed=3)
    parts = batch.split(3)
    assert [len(p.lengths) for p in parts] == [3, 2, 2]
    assert [n for p in parts for n in p.lengths] == batch.lengths
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)
    for p, start in zip(parts, (0, 3, 5)):
        width = max(p.lengths)  # each micro-batch trimmed to its own longest sequence
        assert p.input_ids.shape == (len(p.lengths), width)
        assert torch.equal(p.input_ids, batch.input_ids[start : start + len(p.lengths), :width])
        assert int(p.attention_mask.sum()) == sum(p.lengths)
    assert batch.split(1) == [batch] and len(batch.split(50)) == 7


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A real `sft-cloud serve` process: with edge and cloud in one process, overlapped
    micro-batches would draw dropout masks from the same process-wide RNG at the same time."""
    folder = tmp_path_factory.mktemp("cloud")
    proc, port = start_daemon(["--insecure", "--checkpoint-dir", str(folder)])
    yield f"127.0.0.1:{port}", folder
    stop_daemon(proc)


@pytest.mark.parametrize("mode", ["sft", "sl"])
def test_pipelined_micro_batches_over_grpc_equal_one_process(daemon, tiny_base, mode):
    address, folder = daemon
    spec = SplitSpec(split_layer=2, rank=8, mode=mode)
    backend = _backend(address, tiny_base, spec, micro_batches=3)
    losses = [backend.train_step(k, b) for k, b in enumerate(_batches())]
    assert backend.close() == STEPS
    cloud = load_file(str(folder / backend.session_id / "final.safetensors"))
    edge_ref, cloud_ref, ref_losses = _micro_batched_in_one_process(tiny_base, spec, 3)
    cloud_ref_state = cloud_ref.state_dict()

    start_edge, start_cloud = build_split_model(tiny_base, spec, 2, OPTIM.seed)
    assert max_diff(params(start_edge), params(backend.net1)) > 1e-4  # training moved them
    start_state = start_cloud.state_dict()
    assert max(float((cloud[k] - start_state[k]).abs().max()) for k in cloud) > 1e-4
    assert max_diff(params(edge_ref), params(backend.net1)) <= 1e-6
    assert cloud.keys() == cloud_ref_state.keys()
    assert max(float((cloud[k] - cloud_ref_state[k]).abs().max()) for k in cloud) <= 1e-6
    assert losses == pytest.approx(ref_losses, abs=1e-6)


def test_micro_batches_give_the_whole_batch_update(live_server, tiny_base):
    """Without dropout, 4 micro-batches (sizes 2, 2, 2, 1) end where whole batches end."""
    address, registry = live_server
    config = copy.deepcopy(tiny_base.config)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    base = dataclasses.replace(tiny_base, config=config)
    registry._bases[base.name] = base  # the daemon builds net2 from this same dropout-free model
    spec = SplitSpec(split_layer=1, rank=8)
    whole = _backend(address, base, spec, micro_batches=1)
    micro = _backend(address, base, spec, micro_batches=4, depth=3)
    whole_losses = [whole.train_step(k, b) for k, b in enumerate(_batches())]
    micro_losses = [micro.train_step(k, b) for k, b in enumerate(_batches())]
    cloud_whole = registry.get(whole.session_id).net2
    cloud_micro = registry.get(micro.session_id).net2

    start_edge, _ = build_split_model(base, spec, 2, OPTIM.seed)
    assert max_diff(params(start_edge), params(micro.net1)) > 1e-4
    assert max_diff(params(whole.net1), params(micro.net1)) <= 1e-6
    assert max_diff(params(cloud_whole), params(cloud_micro)) <= 1e-6
    assert micro_losses == pytest.approx(whole_losses, abs=1e-6)


class _Recorder:
    """Listens on a transport and records the order of the training step's sends and answers."""

    def __init__(self, transport):
        self.events = []
        transport.listeners.append(self)

    def __call__(self, direction, msg, when):
        if msg.WhichOneof("kind") == "train":
            self.events.append(("send" if direction == "sent" else "answer", msg.train.micro))


@pytest.mark.parametrize("depth, expected", [
    (1, "s0 a0 s1 a1 s2 a2 s3 a3"),  # no overlap: each micro-batch waits for the one before
    (2, "s0 s1 a0 s2 a1 s3 a2 a3"),  # micro-batch k+1 is computed and sent while k is away
    (4, "s0 s1 s2 s3 a0 a1 a2 a3"),
])  # fmt: skip
def test_pipeline_depth_bounds_the_micro_batches_in_flight(live_server, tiny_base, depth, expected):
    address, _ = live_server
    transport = GrpcTransport(open_channel(address))
    recorder = _Recorder(transport)
    backend = _backend(address, tiny_base, SplitSpec(split_layer=2, rank=8), 4, depth, transport)
    backend.train_step(0, _batches()[0])
    assert " ".join(f"{e[0][0]}{e[1]}" for e in recorder.events) == expected
    backend.close()


def _run(glue_dir, out, cloud, **kw):
    return train(
        TrainConfig(
            task="sst2",
            cloud=cloud,
            model="random:tiny",
            data_dir=glue_dir,
            batch_size=8,
            max_steps=10,
            max_train_examples=64,
            max_eval_examples=32,
            lr=1e-3,
            insecure=True,
            progress=False,
            output_dir=str(out),
            step_timeout=5.0,
            reconnect_timeout=30.0,
            micro_batches=3,
            **kw,
        )  # fmt: skip
    )


@pytest.mark.parametrize("direction", ["down", "up"])
def test_broken_link_mid_step_with_micro_batches_in_flight_changes_nothing(
    daemon, glue_dir, tmp_path, direction
):
    """The link breaks with micro-batches in flight: the edge re-attaches and re-sends the step
    from its first micro-batch; the cloud answers what it had applied from its cache."""
    address, folder = daemon
    ref = _run(glue_dir, tmp_path / "ref", address)
    proxy = TcpProxy(("127.0.0.1", int(address.rsplit(":", 1)[1])))
    proxy.cut_after(direction, 6_000, grace=0.5)  # the other direction flows for 0.5 s, then RST
    run = _run(glue_dir, tmp_path / "cut", proxy.address)
    proxy.close()

    assert proxy.tripped.is_set(), "the proxy never broke the link: the test would prove nothing"
    assert run["resumes"] >= 1 and run["steps"] == run["cloud_steps"] == 10
    assert run["eval_history"] == ref["eval_history"]
    for name in ("edge.safetensors",):
        a, b = load_file(str(tmp_path / "ref" / name)), load_file(str(tmp_path / "cut" / name))
        assert all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(folder / ref["session_id"] / "final.safetensors"))
    b = load_file(str(folder / run["session_id"] / "final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(folder / run["session_id"] / "final.safetensors"), "pt") as f:
        replayed = int(f.metadata()["replayed"])
    print(f"{direction}: {replayed} micro-batches answered from the cache")
    if direction == "down":  # answers to applied micro-batches were lost: the cache answered them
        assert replayed >= 1
