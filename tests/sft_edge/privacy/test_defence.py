"""The defences (``sft_edge.privacy.defence``): clipping and noise as documented, drawn from the
step's seed, applied to the messages docs/privacy.md names and to nothing else (messages recorded
on an in-process link), and epsilon from dp-accounting's RDP accountant."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from bench.harness import inproc, record
from sft_common.topology.spec import SplitSpec
from sft_common.topology.ushape import UShapeSpec
from sft_common.wire import codec
from sft_edge.privacy.defence import ACTIVATIONS, GRADIENT, Defence, Gaussian, NoNoise
from sft_edge.runs.config import DPOptions, LinkOptions, OptimConfig
from sft_edge.sessions.two_part import EdgeSession
from sft_edge.sessions.ushape import UShapeSession

OPTIM = OptimConfig(lr=1e-3, total_steps=10, seed=5)
EPS_SIGMA1_3X = 9.00996  # dp-accounting 0.6.0, RdpAccountant, 3 x GaussianDpEvent(1.0), delta 1e-5


def test_each_example_is_clipped_to_the_norm_and_noised_at_sigma_times_clip():
    rows, lengths = torch.randn(9, 40) * 3, [2, 3, 4]
    rows[:2] *= 1e-3  # the first example is already inside the clip: unchanged
    mech = Gaussian(noise=0.5, clip=2.0)
    clipped = mech.clip_rows(rows, lengths)
    norms = [part.norm().item() for part in clipped.split(lengths)]
    assert norms[0] == pytest.approx(rows[:2].norm().item()) and norms[1:] == pytest.approx([2.0, 2.0])
    noise = mech.apply(rows, lengths, mech.generator(1, ACTIVATIONS, 3)) - clipped
    assert noise.std().item() == pytest.approx(1.0, rel=0.1)  # 0.5 x 2
    again = mech.apply(rows, lengths, mech.generator(1, ACTIVATIONS, 3))
    other = mech.apply(rows, lengths, mech.generator(1, ACTIVATIONS, 4))
    assert torch.equal(again, clipped + noise) and not torch.equal(again, other)
    assert NoNoise().apply(rows, lengths, None) is rows


def test_epsilon_comes_from_the_rdp_accountant():
    """Documented in docs/privacy.md: sigma 1, 3 epochs (steps x batch / examples), delta 1e-5."""
    pytest.importorskip("dp_accounting")
    d = Defence.of(DPOptions(noise=1.0, clip=1.0, delta=1e-5))
    assert d.epsilon(30, 0.1) == pytest.approx(d.epsilon(3, 1.0))  # 3 sendings of each example
    assert d.epsilon(30, 0.1) == pytest.approx(EPS_SIGMA1_3X, rel=1e-3)
    both = Defence.of(DPOptions(noise=1.0, clip=1.0, grad_noise=1.0, grad_clip=1.0))
    assert both.epsilon(30, 0.1) > d.epsilon(30, 0.1) == both.epsilon(30, 0.1, gradient=False)
    assert Defence.of(DPOptions()).epsilon(30, 0.1) is None


def _u_first_step(tiny_base, dp: DPOptions):
    transport = inproc(tiny_base)
    link = LinkOptions(dp=dp)
    session = UShapeSession(tiny_base, UShapeSpec(0, 8, 1), 2, transport, OPTIM, 8, 64, link)
    events = record(transport)
    session.train_step(0, random_batch(batch=4, seq=10, seed=1))
    sent = {m.WhichOneof("kind"): m for d, m, _ in events if d == "sent"}
    session.close()
    up = codec.decode(sent["forward_up"].forward_up.activations, name="up")
    grad = codec.decode(sent["gradient_up"].gradient_up.grad, name="grad")
    return up, grad, list(sent["forward_up"].forward_up.lengths)


def test_the_u_noises_the_activations_up_and_the_gradient_up_and_nothing_else(tiny_base):
    clean_up, clean_grad, lengths = _u_first_step(tiny_base, DPOptions())
    act = Gaussian(0.3, 1.0)
    up, grad, _ = _u_first_step(tiny_base, DPOptions(noise=0.3, clip=1.0))
    assert torch.allclose(
        up, act.apply(clean_up, lengths, act.generator(OPTIM.seed, ACTIVATIONS, 0)), atol=1e-6
    )
    g = Gaussian(0.5, 1e-3)
    up, grad, _ = _u_first_step(tiny_base, DPOptions(grad_noise=0.5, grad_clip=1e-3))
    assert torch.equal(up, clean_up)  # the gradient's defence leaves the activations alone
    expected = g.apply(clean_grad, lengths, g.generator(OPTIM.seed, GRADIENT, 0))
    assert torch.allclose(grad, expected, atol=1e-9)


def test_the_two_part_split_noises_the_cut_and_sends_the_labels_as_before(tiny_base):
    def first(dp):
        transport = inproc(tiny_base)
        session = EdgeSession(tiny_base, SplitSpec(1, 8), 2, transport, OPTIM, 8, 64, LinkOptions(dp=dp))
        events = record(transport)
        batch = random_batch(batch=4, seq=10, seed=1)
        session.train_step(0, batch)
        session.close()
        (msg,) = [m.train for d, m, _ in events if d == "sent" and m.WhichOneof("kind") == "train"]
        return codec.decode(msg.activations, name="cut"), list(msg.lengths), list(msg.labels)

    clean, lengths, labels = first(DPOptions())
    noised, _, noised_labels = first(DPOptions(noise=1.0, clip=0.5))
    mech = Gaussian(1.0, 0.5)
    assert torch.allclose(
        noised, mech.apply(clean, lengths, mech.generator(OPTIM.seed, ACTIVATIONS, 0)), atol=1e-6
    )
    assert noised_labels == labels  # the two-part split sends the labels: no defence of ours hides them


def test_a_defence_needs_both_its_noise_and_its_clip():
    with pytest.raises(ValueError, match="--dp-noise needs --dp-clip"):
        DPOptions(noise=1.0).validate()
    with pytest.raises(ValueError, match="--dp-grad-noise"):
        DPOptions(grad_clip=1.0).validate()
