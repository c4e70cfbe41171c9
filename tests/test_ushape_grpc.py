"""The U-shape over a real gRPC server trains what its three parts trained in one process train.

The reference is ``build_ushape_model``'s parts in one process, one AdamW over all three (AdamW is
per-parameter, so it equals the edge's and the cloud's), the gradients passed by hand across
both cuts and each part's dropout seeded as its side seeds it: the head by (seed, "edge", k), the
middle by (seed, "cloud", k), the tail by (seed, "edge-tail", k).
"""

from __future__ import annotations

import grpc
import pytest
import torch
from helpers import random_batch

from sft_common.models.base_model import load_base_model
from sft_common.models.lora import LoraSpec
from sft_common.proto import sft_pb2 as pb
from sft_common.topology.two_part import task_loss
from sft_common.topology.ushape import UShapeSpec, build_ushape_model, lora_part, part_factors
from sft_common.training import make_optimizer, make_schedule, step_seed
from sft_edge.link.transport import CloudError, GrpcTransport, open_channel
from sft_edge.runs.config import LinkOptions, OptimConfig
from sft_edge.sessions.two_part import EdgeSession
from sft_edge.sessions.ushape import UShapeSession

STEPS = 5
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=2, total_steps=10, seed=5)
SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1)
INPUT_SPEC = UShapeSpec(split_layer=0, rank=8, tail_layers=1, factorise="ffn-input")


def _batches():
    return [random_batch(batch=6, seq=14, seed=k) for k in range(STEPS)]


def _session(address, base, spec=SPEC, lora=None, optim=OPTIM):
    return UShapeSession(
        base, spec, 2, GrpcTransport(open_channel(address)), optim, batch_size=8, max_seq_len=64,
        link=LinkOptions(wire_dtype="fp32"), lora=lora,
    )  # fmt: skip


def train_u_in_one_process(base, spec, optim, batches, lora=None):
    """The reference: (head, middle, tail, losses) after training on ``batches``."""
    parts = build_ushape_model(base, spec, 2, optim.seed)
    if lora is not None:
        resolved = lora.resolved(base.config.model_type)
        for which, part in zip(("head", "middle", "tail"), parts):
            lora_part(part, which, resolved, optim.seed)
    head, middle, tail = parts
    params = [p for part in parts for p in part.parameters()]
    factors = [p for part in parts for p in part_factors(part)]
    optimizer = make_optimizer(params, optim.lr, optim.weight_decay, factors, optim.factor_lr)
    schedule = make_schedule(optimizer, optim.warmup_steps, optim.total_steps)
    losses = []
    for part in parts:
        part.train()
    for k, batch in enumerate(batches):
        mask = batch.attention_mask
        torch.manual_seed(step_seed(optim.seed, "edge", k))
        first, _ = head(batch.input_ids, mask, batch.token_type_ids)
        first_in = first.detach().requires_grad_()
        torch.manual_seed(step_seed(optim.seed, "cloud", k))
        second, _ = middle(first_in, mask)
        second_in = second.detach().requires_grad_()
        torch.manual_seed(step_seed(optim.seed, "edge-tail", k))
        loss = task_loss(tail(second_in, mask), batch.labels)
        loss.backward()
        second.backward(second_in.grad)
        first.backward(first_in.grad)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return head, middle, tail, losses


def assert_parts_equal(ref, got, atol=1e-6):
    """Every parameter of ``got`` within ``atol`` of ``ref``'s of the same name."""
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in got.named_parameters()]
    assert names == list(ref_params)
    for n, p in got.named_parameters():
        torch.testing.assert_close(p.detach(), ref_params[n].detach(), atol=atol, rtol=0, msg=n)


@pytest.mark.parametrize("spec", [SPEC, INPUT_SPEC], ids=["ffn-output", "ffn-input"])
@pytest.mark.parametrize("lora", [None, LoraSpec(rank=4, alpha=8.0)], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["random:tiny", "random:tiny-llama"])
def test_grpc_ushape_training_equals_one_process(live_server, name, lora, spec):
    """5 steps (BERT: dropout on): the same losses and parameters of all three parts within 1e-6;
    the daemon computed no loss and holds no head; evaluation gives the reference's logits. At
    the FFN input the cloud sent A1ᵀ and B2ᵀ, no Σ2."""
    address, registry = live_server
    base = load_base_model(name)
    edge = _session(address, base, spec, lora=lora)
    losses = [edge.train_step(k, b) for k, b in enumerate(_batches())]
    cloud = registry.get(edge.session_id)
    assert cloud.opened().HasField("tail_sigma") == (spec.factorise == "ffn-output")
    head, middle, tail, ref_losses = train_u_in_one_process(base, spec, OPTIM, _batches(), lora)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    start = build_ushape_model(base, spec, 2, OPTIM.seed)
    for ref, got, before in (
        (head, edge.head, start[0]),
        (middle, cloud.net2, start[1]),
        (tail, edge.tail, start[2]),
    ):
        assert_parts_equal(ref, got)
        before_state = before.state_dict()
        moved = [n for n, p in got.named_parameters() if p.requires_grad and n in before_state
                 and not torch.equal(p.detach(), before_state[n])]  # fmt: skip
        assert moved  # the comparison is not vacuous
    assert cloud.next_step == STEPS and cloud.config.num_labels == 0
    assert not any("classifier" in n or "pooler" in n or "score" in n for n in cloud.net2.state_dict())
    if lora is not None:
        assert any(
            "lora_B" in n and float(p.detach().abs().max()) > 0 for n, p in cloud.net2.named_parameters()
        )
    batch = random_batch(batch=5, seq=11, seed=42)
    for part in (head, middle, tail):
        part.eval()
    with torch.no_grad():
        cut, _ = head(batch.input_ids, batch.attention_mask, batch.token_type_ids)
        want = tail(middle(cut, batch.attention_mask)[0], batch.attention_mask)
    assert float((edge.predict(batch) - want).abs().max()) <= 1e-5
    assert edge.close() == STEPS


def test_plain_split_learning_u_trains_over_grpc(live_server, tiny_base):
    """--mode sl --label-private: hidden states cross both cuts; still equal to one process."""
    spec = UShapeSpec(split_layer=1, rank=8, tail_layers=1, mode="sl")
    address, registry = live_server
    edge = _session(address, tiny_base, spec)
    losses = [edge.train_step(k, b) for k, b in enumerate(_batches()[:3])]
    head, middle, tail, ref_losses = train_u_in_one_process(tiny_base, spec, OPTIM, _batches()[:3])
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    assert_parts_equal(middle, registry.get(edge.session_id).net2)
    assert_parts_equal(tail, edge.tail)
    edge.close()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tail_layers=3), "label_private: split layer 0 and 3 tail layers leave the cloud no layer"),
        (dict(tail_layers=0), "label_private: tail layers must be >= 1"),
        (dict(num_labels=2), "label_private: num_labels must be 0"),
        (dict(label_private=False, tail_layers=1, num_labels=2), "tail_layers 1 needs label_private"),
    ],
)
def test_bad_u_configs_are_refused_with_invalid_argument(live_server, tiny_base, change, message):
    address, _ = live_server
    edge = _session(address, tiny_base)
    config = pb.SessionConfig()
    config.CopyFrom(edge._open.config)
    for key, value in change.items():
        setattr(config, key, value)
    transport = GrpcTransport(open_channel(address))
    transport.submit(pb.EdgeMessage(open=pb.OpenSession(config=config, fingerprint=edge.fingerprint)))
    with pytest.raises(CloudError, match=message) as caught:
        transport.result()
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    transport.close()
    edge.close()


def test_each_protocol_refuses_the_others_step(live_server, tiny_base):
    """A two-part session refuses forward_up; a label-private one refuses a TrainStep."""
    address, _ = live_server
    from sft_common.topology.spec import SplitSpec

    two_part = EdgeSession(tiny_base, SplitSpec(2, 8), 2, GrpcTransport(open_channel(address)), OPTIM, 8, 64)
    with pytest.raises(CloudError, match="forward_up is for label-private sessions") as caught:
        two_part.request(pb.EdgeMessage(forward_up=pb.ForwardUp(step=0)))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    u = _session(address, tiny_base)
    with pytest.raises(CloudError, match="this session is label-private") as caught:
        u.request(pb.EdgeMessage(train=pb.TrainStep(step=0)))
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
