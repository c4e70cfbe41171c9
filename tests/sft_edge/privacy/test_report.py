"""The report's ``privacy`` with a defence: what was noised and one training example's epsilon,
only where the run sent the noised message."""

from __future__ import annotations

import pytest

from sft_edge.privacy.measured import MINILM
from sft_edge.runs.config import DPOptions
from sft_edge.runs.privacy import Setting, privacy_of

EPS_SIGMA1_3X = 9.00996  # as tests/sft_edge/privacy/test_defence.py: 3 sendings at sigma 1, delta 1e-5


def _setting(kind: str, dp: DPOptions) -> Setting:
    tail = 1 if kind == "label-private" else None
    return Setting(kind, MINILM, False, 6, "sft", 8, 0, tail, "fp32", "labels", dp, 30, 0.1)


def test_the_u_reports_epsilon_of_its_gradient_defence():
    pytest.importorskip("dp_accounting")
    privacy = privacy_of(_setting("label-private", DPOptions(grad_noise=1.0, grad_clip=0.01)))
    defence = privacy["defence"]
    assert defence["gradient_up"] == {"noise": 1.0, "clip": 0.01} and defence["activations"] is None
    assert privacy["epsilon"] == pytest.approx(EPS_SIGMA1_3X, rel=1e-3) == defence["epsilon"]
    assert "noise on gradient_up (noise 1, clip 0.01): epsilon 9.01 at delta 1e-05" in privacy["summary"]


def test_a_defence_on_a_message_never_sent_reports_none():
    assert privacy_of(_setting("two-part", DPOptions(grad_noise=1.0, grad_clip=0.01)))["defence"] is None
    assert privacy_of(_setting("local", DPOptions(noise=1.0, clip=1.0)))["epsilon"] is None
    plain = privacy_of(_setting("label-private", DPOptions()))
    assert plain["defence"] is None and plain["summary"].endswith("no defence (epsilon: none)")
