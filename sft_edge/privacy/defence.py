"""Calibrated Gaussian noise with per-example clipping on what the edge sends, and its epsilon.

A ``Gaussian`` mechanism takes one message's rows (tokens, width), in the order they cross, and
the lengths that say which example each row belongs to. It scales each example's rows together
so that their L2 norm (Frobenius, over the example's tokens and width) is at most ``clip``, then
adds N(0, (noise x clip)^2) to every value. Sent for the activations up (DP-Forward, Du et al.,
CCS 2023) and for the U's gradient up at the second cut (label-DP style: the gradient is what
carries the labels). ``NoNoise`` is the same interface doing nothing: the sessions always ask an
object, never whether a defence is on.

The noise is drawn from a generator seeded by (seed, what, step, micro-batch) through
``training.step_seed``: a re-sent or resumed step sends the same bytes.

Epsilon (``Defence.epsilon``) comes from Google's ``dp-accounting`` (its RDP accountant, the one
Opacus uses; ``pip install 'sft[dp]'``, Python >= 3.10), never from a formula of ours. The
neighbouring relation is add/remove-one example, so a clipped example moves a message by at
most ``clip`` and each sending is one Gaussian mechanism of noise multiplier ``noise``. An
example's rows cross once every time its batch is sent; the cloud sees per-example rows, so no
amplification by subsampling is claimed: an example sent in E epochs is E compositions of each
mechanism on (the count is ceil(steps x sampling rate), sampling rate = batch / examples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import torch

from sft_common.training import step_seed
from sft_edge.runs.config import DPOptions

ACTIVATIONS, GRADIENT, EVAL = "dp-activations", "dp-gradient", "dp-eval"  # seeds' sides


class NoNoise:
    """No defence: the rows cross as they are."""

    noise = 0.0
    clip = 0.0

    def clip_rows(self, rows: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        return rows

    def add_noise(self, rows: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        return rows

    def apply(
        self, rows: torch.Tensor, lengths: Sequence[int], generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        return rows

    def generator(self, seed: int, side: str, step: int, micro: int = 0) -> Optional[torch.Generator]:
        return None


@dataclass(frozen=True)
class Gaussian:
    """Per-example L2 clipping to ``clip``, then Gaussian noise of std ``noise x clip``."""

    noise: float  # the noise multiplier sigma: std / clip
    clip: float  # the L2 norm of one example's rows after clipping

    def clip_rows(self, rows: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """``rows`` (tokens, width) with each example's rows scaled to L2 norm <= clip (on the
        graph: the edge's backward goes through the scaling, as the cloud saw the clipped rows)."""
        norms = torch.stack([part.norm() for part in rows.split(list(lengths))])
        scale = (self.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        counts = torch.tensor(list(lengths), device=rows.device)
        return rows * scale.repeat_interleave(counts).unsqueeze(1).to(rows.dtype)

    def add_noise(self, rows: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """``rows`` + N(0, (noise x clip)^2) on every value, drawn on the CPU (the same on any device)."""
        draw = torch.randn(rows.shape, generator=generator, dtype=torch.float32)
        return rows + (draw * (self.noise * self.clip)).to(rows.device, rows.dtype)

    def apply(
        self, rows: torch.Tensor, lengths: Sequence[int], generator: Optional[torch.Generator]
    ) -> torch.Tensor:
        """Clipped and noised: what crosses instead of ``rows``."""
        return self.add_noise(self.clip_rows(rows, lengths), generator)

    def generator(self, seed: int, side: str, step: int, micro: int = 0) -> torch.Generator:
        """The noise of one message: a function of (seed, side, step, micro-batch) only."""
        return torch.Generator().manual_seed(step_seed(seed, side, step, micro))


Mechanism = Union[Gaussian, NoNoise]


def mechanism(noise: float, clip: float) -> Mechanism:
    return Gaussian(noise, clip) if noise > 0 else NoNoise()


@dataclass(frozen=True)
class Defence:
    """The defences of one run: on the activations sent up, on the U's gradient up."""

    activations: Mechanism
    gradient: Mechanism
    delta: float = 1e-5

    @classmethod
    def of(cls, dp: DPOptions) -> Defence:
        return cls(mechanism(dp.noise, dp.clip), mechanism(dp.grad_noise, dp.grad_clip), dp.delta)

    def epsilon(
        self, steps: int, sampling_rate: float, delta: Optional[float] = None, gradient: bool = True
    ) -> Optional[float]:
        """Epsilon of one training example after ``steps`` steps at ``sampling_rate`` (batch /
        examples), at ``delta`` (default: this defence's); ``gradient``: whether its gradient-up
        mechanism sent anything (the U only). None when nothing is noised."""
        sigmas = [
            m.noise for m in (self.activations, self.gradient if gradient else NoNoise()) if m.noise > 0
        ]
        if not sigmas:
            return None
        from dp_accounting import dp_event, rdp  # optional: pip install 'sft[dp]'

        releases = self.releases(steps, sampling_rate)
        accountant = rdp.RdpAccountant()
        for sigma in sigmas:
            accountant.compose(dp_event.GaussianDpEvent(sigma), releases)
        return float(accountant.get_epsilon(self.delta if delta is None else delta))

    @staticmethod
    def releases(steps: int, sampling_rate: float) -> int:
        """How many times one example is sent in ``steps`` steps at ``sampling_rate``: each mechanism's
        compositions (a forward-only run asks (1, 1.0): each example crosses once)."""
        return max(1, math.ceil(steps * min(sampling_rate, 1.0) - 1e-9))

    def describe(self) -> Dict[str, Any]:
        """What the report says of the defence (None where it is off)."""
        return {
            name: {"noise": m.noise, "clip": m.clip} if m.noise > 0 else None
            for name, m in (("activations", self.activations), ("gradient_up", self.gradient))
        }
