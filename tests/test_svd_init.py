"""`--svd-init activation-aware`: the edge whitens the SFT factors by its own FFN activations and
sends the cloud Σ and v; over a real daemon that trains as one process with the same factors, bad
factors are refused before anything exists, and resuming never calibrates again."""

from __future__ import annotations

import csv
import dataclasses
import json

import grpc
import pytest
import torch
from helpers import (
    interrupt_then_resume,
    max_diff,
    params,
    random_batch,
    session_config,
    train_in_one_process,
    write_reviews,
)

from sft_cloud.daemon.protocol import StreamProtocol
from sft_cloud.sessions.registry import SessionRegistry
from sft_common.cuts.ffn_output import svd_factors
from sft_common.proto import sft_pb2 as pb
from sft_common.storage.checkpoint import CheckpointDir
from sft_common.topology.spec import (
    ACTIVATION_AWARE,
    FFN_INPUT,
    FFN_OUTPUT,
    RESIDUAL_AWARE,
    SplitSpec,
    session_fingerprint,
)
from sft_common.topology.two_part import build_split_model
from sft_common.wire import codec
from sft_common.wire.errors import ProtocolError
from sft_edge import cli
from sft_edge.finished import predict
from sft_edge.link.transport import CloudError, GrpcTransport, InProcessTransport, open_channel
from sft_edge.runs import calibrate
from sft_edge.runs.config import Connection, LinkOptions, OptimConfig, PredictConfig, TrainConfig
from sft_edge.sessions.two_part import EdgeSession, Rollback

STEPS = 6
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, total_steps=10, seed=5)
SPEC = SplitSpec(split_layer=2, rank=8, init=ACTIVATION_AWARE)
# session_fingerprint("base-fp", SplitSpec(3, 8), 2) before --svd-init existed (commit dbd5f8e)
PLAIN_FINGERPRINT = "3c2da0192735e238dca4132d2638bce48d2ae4137187a479298b98aff70b6583"


def _batches():
    return [random_batch(batch=6, seq=14, seed=k) for k in range(STEPS)]


def _calibration():
    return [random_batch(batch=6, seq=14, seed=100 + k) for k in range(4)]


def _edge(base, connect, spec=SPEC, **kw) -> EdgeSession:
    return EdgeSession(
        base, spec, 2, connect, OPTIM, batch_size=8, max_seq_len=64, link=LinkOptions(wire_dtype="fp32"),
        calibration=_calibration(), **kw,
    )  # fmt: skip


def test_the_plain_fingerprint_is_unchanged_and_each_calibrated_init_has_its_own():
    plain = SplitSpec(split_layer=3, rank=8)
    assert session_fingerprint("base-fp", plain, 2) == PLAIN_FINGERPRINT
    prints = {
        session_fingerprint("base-fp", SplitSpec(3, 8, init=i), 2) for i in (ACTIVATION_AWARE, RESIDUAL_AWARE)
    }
    assert len(prints) == 2 and PLAIN_FINGERPRINT not in prints
    with pytest.raises(ValueError, match="need mode 'sft'"):
        SplitSpec(3, 8, mode="sl", init=ACTIVATION_AWARE).validate(4, 32, 64)
    with pytest.raises(ValueError, match="the FFN-input cut carries it already"):
        SplitSpec(3, 8, init=RESIDUAL_AWARE, factorise=FFN_INPUT).validate(4, 32, 64)


def test_the_residual_aware_cut_starts_closer_to_the_unsplit_layer_output(tiny_base):
    """What the init is for: on the calibration tokens the factorised layer's output before its
    norm, Ŵ g, is nearer the unsplit one, r + W g, than with the activation-aware factors (which fit
    W g alone and drop r, as the cut does)."""
    errors = {}
    for init in (ACTIVATION_AWARE, RESIDUAL_AWARE):
        spec = dataclasses.replace(SPEC, init=init)
        net1, sigma, v = calibrate.calibrated_edge_half(tiny_base, spec, _calibration())
        w = calibrate.ffn_output_weight(tiny_base, spec)
        total = count = 0.0
        with torch.no_grad():
            for b in _calibration():
                g, r = net1.cut_inputs(b.input_ids, b.attention_mask, b.token_type_ids)
                real = b.attention_mask.bool()
                y = r[real] + g[real] @ w.t()
                y_hat = (net1.u(g[real]) * sigma) @ v
                total += float(((y - y_hat) ** 2).sum())
                count += float((y**2).sum())
        errors[init] = total / count
    assert errors[RESIDUAL_AWARE] < 0.5 * errors[ACTIVATION_AWARE], errors
    # â Σ v stands for the residual too, which the unsplit layer never drops out: no dropout there
    tails = {i: build_split_model(tiny_base, dataclasses.replace(SPEC, init=i), 2, 0)[1].tail for i in errors}
    assert isinstance(tails[ACTIVATION_AWARE].dropout, torch.nn.Dropout)
    assert isinstance(tails[RESIDUAL_AWARE].dropout, torch.nn.Identity)
    input_cut = build_split_model(tiny_base, dataclasses.replace(SPEC, factorise=FFN_INPUT), 2, 0)[0]
    b = _calibration()[0]
    with pytest.raises(ValueError, match="at the FFN output only"):
        input_cut.cut_inputs(b.input_ids, b.attention_mask, b.token_type_ids)


@pytest.mark.parametrize(
    "init, factorise",
    [(ACTIVATION_AWARE, FFN_OUTPUT), (ACTIVATION_AWARE, FFN_INPUT), (RESIDUAL_AWARE, FFN_OUTPUT)],
)
def test_a_calibrated_init_over_grpc_equals_one_process_with_the_same_factors(
    live_server, tiny_base, init, factorise
):
    address, registry = live_server
    spec = dataclasses.replace(SPEC, init=init, factorise=factorise)
    _, sigma, v = calibrate.calibrated_edge_half(tiny_base, spec, _calibration())  # again, independently
    edge = _edge(tiny_base, GrpcTransport(open_channel(address)), spec)
    session = registry.get(edge.session_id)
    # at step 0 the cloud's tail holds exactly the edge's factors, and it sent no factor of its own
    assert session.edge_factor is None and session.spec.init == init
    tail = session.net2.tail
    if factorise == FFN_OUTPUT:
        assert torch.equal(tail.sigma.detach(), sigma) and torch.equal(tail.v.weight.detach(), v.t())
        start = edge.net1.u.weight.detach().clone()
        w = calibrate.ffn_output_weight(tiny_base, spec)
        whitened = torch.allclose(start, torch.diag(1 / sigma) @ v @ w, atol=1e-4)  # uᵀ = Σ⁻¹ v W
        assert whitened == (init == ACTIVATION_AWARE)  # residual-aware: uᵀ = Σ⁻¹ v (W + E[r gᵀ] C⁻¹)
        plain = svd_factors(w, 8)[1]
        assert float((sigma - plain).abs().max()) > 1e-2  # not the plain SVD (the test is not vacuous)
    else:  # B = V_R, A = V_Rᵀ: the top-R principal directions of the residual stream r
        assert sigma is None and torch.equal(tail.b.weight.detach(), v.t())
        start = edge.net1.a.weight.detach().clone()
        assert torch.equal(start, v) and torch.allclose(v @ v.t(), torch.eye(8), atol=1e-5)
        plain = build_split_model(tiny_base, dataclasses.replace(spec, init="plain"), 2, 0)[0].a.weight
        assert float((plain.detach().abs() - v.abs()).abs().max()) > 1e-2  # not the plain SVD's V_R

    losses = [edge.train_step(k, b) for k, b in enumerate(_batches())]

    def same_factors(e, c):
        with torch.no_grad():
            if factorise == FFN_OUTPUT:
                e.u.weight.copy_(start)
                c.tail.sigma.copy_(sigma)
                c.tail.v.weight.copy_(v.t())
            else:
                e.a.weight.copy_(start)
                c.tail.b.weight.copy_(v.t())

    edge_ref, cloud_ref, ref_losses = train_in_one_process(
        tiny_base, spec, OPTIM, _batches(), init=same_factors
    )
    trained = edge.net1.a.weight if factorise == FFN_INPUT else edge.net1.u.weight
    assert max_diff([start], [trained.detach()]) > 1e-4  # the edge's factor trained
    assert max_diff(params(edge_ref), params(edge.net1)) <= 1e-6
    assert max_diff(params(cloud_ref), params(session.net2)) <= 1e-6
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert edge.close() == STEPS


def _open(base, **kw) -> pb.OpenSession:
    sigma, v = torch.rand(8) + 0.5, torch.randn(8, 32)
    config = kw.pop("config", session_config(svd_init=pb.SVD_INIT_ACTIVATION_AWARE))
    spec = SplitSpec(config.split_layer, config.rank, init=ACTIVATION_AWARE)
    values = dict(
        config=config, fingerprint=session_fingerprint(base.fingerprint, spec, 2),
        cloud_sigma=codec.encode(sigma), cloud_v=codec.encode(v),
    )  # fmt: skip
    values.update(kw)
    return pb.OpenSession(**{k: x for k, x in values.items() if x is not None})


NAN_V = torch.randn(8, 32)
NAN_V[3, 5] = float("nan")


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(cloud_sigma=codec.encode(torch.ones(9))),
            "cloud_sigma: shape \\[9\\]: dimension 0 is 9, expected 8",
        ),
        (dict(cloud_v=codec.encode(torch.ones(8, 33))), "cloud_v: .*dimension 1 is 33, expected 32"),
        (dict(cloud_v=codec.encode(torch.ones(32, 8))), "cloud_v: .*dimension 0 is 32, expected 8"),
        (dict(cloud_v=codec.encode(NAN_V)), "cloud_v: contains NaN or Inf"),
        (dict(cloud_sigma=codec.encode(torch.full((8,), float("inf")))), "cloud_sigma: contains NaN or Inf"),
        (dict(cloud_v=codec.encode(torch.ones(8, 32), pb.FLOAT16)), "cloud_v: dtype FLOAT16"),
        (dict(cloud_v=None), "needs both cloud_sigma and cloud_v"),
        (dict(cloud_sigma=None), "needs both cloud_sigma and cloud_v"),
        (
            dict(config=session_config(svd_init=pb.SVD_INIT_ACTIVATION_AWARE, factorise=pb.FFN_INPUT)),
            "cloud_v \\(Bᵀ\\) alone",
        ),
        (dict(cloud_sigma=None, cloud_v=None), "the open carries none"),
        (dict(config=session_config()), "this session's init is the plain SVD"),
        (dict(session_id="some-session"), "with the open of a new session only"),
        (dict(config=session_config(svd_init=pb.SVD_INIT_ACTIVATION_AWARE, mode=pb.SL)), "need mode 'sft'"),
        (
            dict(
                config=session_config(svd_init=pb.SVD_INIT_RESIDUAL_AWARE, factorise=pb.FFN_INPUT),
                cloud_sigma=None,
            ),
            "the FFN-input cut carries it already",
        ),
        (dict(config=session_config(svd_init=7)), "svd_init 7 is not one of"),
        (
            dict(
                config=session_config(
                    svd_init=pb.SVD_INIT_ACTIVATION_AWARE, label_private=True, tail_layers=1, num_labels=0
                )
            ),
            "label_private: the calibrated inits are for the two-part split only",
        ),
    ],
)
def test_bad_factors_are_refused_and_nothing_is_created(tiny_base, tmp_path, change, match):
    registry = SessionRegistry(checkpoint_dir=str(tmp_path / "cloud"))
    registry._bases[tiny_base.name] = tiny_base
    with pytest.raises(ProtocolError, match=match) as info:
        StreamProtocol(registry, "edge-a").handle(pb.EdgeMessage(open=_open(tiny_base, **change)))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(registry) == 0
    assert not (tmp_path / "cloud").exists() or not any((tmp_path / "cloud").iterdir())
    # the same open with good factors is accepted
    StreamProtocol(registry, "edge-a").handle(pb.EdgeMessage(open=_open(tiny_base)))
    assert len(registry) == 1


class _Link:
    """Streams to an in-process registry (replaceable: a restarted daemon); can lose a request."""

    def __init__(self, registry):
        self.registry, self.opens, self.lose_next = registry, [], False

    def __call__(self):
        link = self

        class Transport(InProcessTransport):
            def _submit(self, msg):
                if msg.WhichOneof("kind") == "open":
                    link.opens.append(msg.open)
                if link.lose_next:
                    link.lose_next = False
                    self._answers.append(CloudError(grpc.StatusCode.UNAVAILABLE, "request lost"))
                    return
                super()._submit(msg)

        return Transport(StreamProtocol(self.registry, "tester"))


def _registry(base, folder=None):
    registry = SessionRegistry(checkpoint_dir=folder)
    registry._bases[base.name] = base
    return registry


@pytest.mark.parametrize(
    "init, factorise",
    [(ACTIVATION_AWARE, FFN_OUTPUT), (ACTIVATION_AWARE, FFN_INPUT), (RESIDUAL_AWARE, FFN_OUTPUT)],
)
def test_a_restarted_cloud_resumes_from_its_checkpoint_and_nothing_is_calibrated_again(
    tiny_base, tmp_path, init, factorise
):
    """The daemon restarts (only its checkpoint of step 2 left): the edge re-attaches without
    factors, both sides restore Σ, v and u from their checkpoints, and the run ends where an
    uninterrupted one ends."""
    cloud_dir = str(tmp_path / "cloud")
    link = _Link(_registry(tiny_base, cloud_dir))
    spec = dataclasses.replace(SPEC, init=init, factorise=factorise)
    edge = _edge(tiny_base, link, spec, checkpoints=CheckpointDir(str(tmp_path / "edge")))
    batches = _batches()
    for k in range(3):
        if k == 2:
            edge.checkpoint(2, {})
        edge.train_step(k, batches[k])
    link.registry, link.lose_next = _registry(tiny_base, cloud_dir), True  # the restart; a lost request
    with pytest.raises(Rollback) as caught:
        edge.train_step(3, batches[3])
    assert caught.value.step == 2
    for k in range(2, STEPS):
        edge.train_step(k, batches[k])
    assert link.opens[0].HasField("cloud_v") and link.opens[0].HasField("cloud_sigma") == (
        factorise == FFN_OUTPUT
    )
    assert len(link.opens) == 2 and not link.opens[1].HasField("cloud_sigma")  # the re-attach: none
    assert not link.opens[1].HasField("cloud_v") and link.opens[1].session_id == edge.session_id

    ref_link = _Link(_registry(tiny_base))
    ref = _edge(tiny_base, ref_link, spec)
    for k, b in enumerate(batches):
        ref.train_step(k, b)
    assert all(torch.equal(a, b) for a, b in zip(params(edge.net1), params(ref.net1)))
    restored = link.registry.get(edge.session_id).net2
    # rebuilt from the checkpoint's config: the residual-aware tail keeps no dropout
    if factorise == FFN_OUTPUT:
        assert isinstance(restored.tail.dropout, torch.nn.Identity) == (init == RESIDUAL_AWARE)
    assert all(
        torch.equal(a, b)
        for a, b in zip(params(restored), params(ref_link.registry.get(ref.session_id).net2))
    )


def test_cli_train_then_resume_and_predict(tmp_path, recorded, monkeypatch):
    """`sft-edge train --svd-init activation-aware` end to end; then Ctrl-C at step 4 and --resume
    from the checkpoint of step 3 ends bit-identical to the whole run, without a second
    calibration; predict through the daemon reopens the run (its fingerprint covers the init)."""
    from safetensors.torch import load_file

    address, registry, messages = recorded
    train_file, dev = write_reviews(tmp_path / "train.csv", 40), write_reviews(tmp_path / "dev.csv", 12, 100)
    calls = []
    calibrated = calibrate.calibrated_edge_half
    monkeypatch.setattr(
        calibrate, "calibrated_edge_half", lambda *a, **k: calls.append(1) or calibrated(*a, **k)
    )
    argv = [
        "train", "--train-file", train_file, "--dev-file", dev, "--text-columns", "opinion",
        "--label-column", "verdict", "--cloud", address, "--insecure", "--model", "random:tiny",
        "--batch-size", "8", "--max-steps", "6", "--lr", "1e-3", "--checkpoint-every", "3",
        "--svd-init", "activation-aware", "--calibration-batches", "3", "--no-progress",
        "--output-dir", str(tmp_path / "whole"), "--report", str(tmp_path / "r.json"),
    ]  # fmt: skip
    assert cli.main(argv) == 0 and len(calls) == 1
    whole = json.loads((tmp_path / "r.json").read_text())
    assert whole["steps"] == whole["cloud_steps"] == 6 and whole["config"]["svd_init"] == ACTIVATION_AWARE
    open_msg, opened = messages[0][0].open, messages[0][1].opened
    assert open_msg.config.svd_init == pb.SVD_INIT_ACTIVATION_AWARE
    assert tuple(open_msg.cloud_sigma.shape) == (8,) and tuple(open_msg.cloud_v.shape) == (8, 32)
    assert not opened.HasField("edge_factor")  # u never crosses the link

    values = dict(
        train_file=train_file, dev_file=dev, text_columns="opinion", label_column="verdict", cloud=address,
        insecure=True, model="random:tiny", batch_size=8, max_steps=6, lr=1e-3, checkpoint_every=3,
        svd_init=ACTIVATION_AWARE, calibration_batches=3, progress=False,
    )  # fmt: skip
    resumed = interrupt_then_resume(monkeypatch, EdgeSession, values, tmp_path / "cut")
    assert len(calls) == 2  # the whole run and the interrupted one; --resume calibrated nothing
    reattach = next(m[0].open for m in messages if m[0].open.session_id)  # the --resume
    assert reattach.session_id and not reattach.HasField("cloud_sigma") and not reattach.HasField("cloud_v")
    assert resumed["eval_history"] == whole["eval_history"] and resumed["resumes"] == 1
    edge_a, edge_b = (load_file(str(tmp_path / n / "edge.safetensors")) for n in ("whole", "cut"))
    assert edge_a.keys() == edge_b.keys() and all(torch.equal(edge_a[k], edge_b[k]) for k in edge_a)
    cloud_a, cloud_b = (
        load_file(f"{registry.checkpoint_dir}/{r['session_id']}/final.safetensors") for r in (whole, resumed)
    )
    assert cloud_a.keys() == cloud_b.keys() and all(torch.equal(cloud_a[k], cloud_b[k]) for k in cloud_a)

    info = json.loads((tmp_path / "whole" / "sft_edge.json").read_text())
    assert info["svd_init"] == ACTIVATION_AWARE
    conn = Connection(cloud=address, insecure=True)
    assert predict.predict(PredictConfig(str(tmp_path / "whole"), dev, str(tmp_path / "p.csv"), conn)) == 12
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gold = [r["verdict"] for r in csv.DictReader(open(dev, newline=""))]
    accuracy = sum(r["prediction"] == g for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(whole["metrics"]["accuracy"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(mode="sl"), "--mode sl factorises nothing"),
        (dict(local=True), "--local trains the unsplit model"),
        (dict(label_private=True), "--label-private (the U) starts both cuts from the plain SVD"),
        (dict(calibration_batches=0), "--calibration-batches must be >= 1"),
        (dict(svd_init="whitened"), "--svd-init must be one of plain, activation-aware, residual-aware"),
        (
            dict(svd_init=RESIDUAL_AWARE, factorise=FFN_INPUT),
            "--factorise ffn-input carries the residual already (use activation-aware)",
        ),
        (dict(svd_init="plain", calibration_batches=4), "--calibration-batches goes with --svd-init"),
    ],
)
def test_flags_that_cannot_go_with_activation_aware_init_are_refused(flags, message):
    values = dict(task="sst2", svd_init=ACTIVATION_AWARE, insecure=True)
    values.update(flags)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**values).validate()


def test_a_calibration_of_few_tokens_for_its_rank_is_warned_about(tiny_base, caplog):
    """With n calibration tokens the factors' directions come from those n activations alone (for
    n <= R, exactly their span): below 32 tokens a rank the edge says so; the default's are far above."""
    few = [random_batch(batch=2, seq=5, seed=1)]  # at most 10 real tokens for rank 8
    with caplog.at_level("WARNING", logger="sft_edge"):
        calibrate.calibrated_edge_half(tiny_base, SPEC, few)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "calibration tokens for rank 8" in warning and "--calibration-batches" in warning
    caplog.clear()
    many = [random_batch(batch=8, seq=40, seed=k) for k in range(2)]
    with caplog.at_level("WARNING", logger="sft_edge"):
        calibrate.calibrated_edge_half(tiny_base, SPEC, many)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
