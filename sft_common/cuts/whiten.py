"""Activation-aware factors: input statistics of a linear layer and the rank-R factors that minimise
its error on those inputs (the whitening of SVD-LLM / ASVD), for ``--svd-init activation-aware``.

For a linear ``y = W g`` (W: out x in) and ``C = E[g gᵀ]`` over calibration inputs,
``S = cholesky(C + εI)`` (``C = S Sᵀ``; ε = 1e-6 · mean diag C, so it never fails) and
``SVD(W S) = P diag(Σ) Qᵀ``, the matrix ``Ŵ = P_R diag(Σ_R) Q_Rᵀ S⁻¹`` minimises
``E||W g − Ŵ g||² = ||(W − Ŵ) S||²_F`` over rank-R matrices (Eckart-Young on ``W S``).

Returned in ``split.svd_factors``' convention, ``Ŵᵀ = u · diag(Σ) · v``: ``u = S⁻ᵀ Q_R`` (in, R),
``Σ = Σ_R`` (R,), ``v = P_Rᵀ`` (R, out). Since ``Q_R = Sᵀ Wᵀ P_R Σ_R⁻¹``, also ``uᵀ = Σ_R⁻¹ P_Rᵀ W``
and ``Ŵ = P_R P_Rᵀ W``: ``P_R`` and ``Σ_R²`` are the top-R eigenvectors and eigenvalues of the
output's second moment ``W (C + εI) Wᵀ`` (what that tells the cloud: docs/privacy.md).

``--svd-init residual-aware`` fits the cut layer's whole output instead, the residual the cut drops
included (``residual_aware_factors``: a reduced-rank regression, whitened the same way).

The FFN-input cut (``--factorise ffn-input``) takes ``principal_directions`` instead: the top-R
eigenvectors of the residual stream's second moment, ``A = V_Rᵀ`` and ``B = V_R``.

Pure functions of tensors, in float64 on the CPU; float32 results.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

REL_EPS = 1e-6  # ε relative to the mean variance: C + εI is positive definite however C degenerates
# The regression's ridge (relative, as REL_EPS): C⁻¹ multiplies the residual statistics, so the
# directions g hardly varies in are damped rather than amplified (1e-4 and 1e-2 fit MiniLM alike).
RIDGE = 1e-4


class CrossMoment:
    """The running mean of ``r gᵀ`` over row pairs (float64): ``add`` (n, left), (n, right)."""

    def __init__(self, left: int, right: int):
        self.total = torch.zeros(left, right, dtype=torch.float64)
        self.count = 0

    def add(self, left: torch.Tensor, right: Optional[torch.Tensor] = None) -> None:
        """``right`` None: the left rows against themselves (a second moment), converted once."""
        a = left.detach().reshape(-1, self.total.shape[0]).to("cpu", torch.float64)
        b = a if right is None else right.detach().reshape(-1, self.total.shape[1]).to("cpu", torch.float64)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{a.shape[0]} left rows against {b.shape[0]} right rows")
        self.total.addmm_(a.t(), b)
        self.count += a.shape[0]

    def matrix(self) -> torch.Tensor:
        """``E[r gᵀ]`` (left, right)."""
        if self.count == 0:
            raise ValueError("no calibration rows: the moment of nothing is undefined")
        return self.total / self.count


class SecondMoment:
    """The running mean of ``g gᵀ`` over rows ``g`` (float64): ``add`` (n, dim) rows, ``matrix``."""

    def __init__(self, dim: int):
        self.dim = dim
        self._outer = CrossMoment(dim, dim)

    @property
    def count(self) -> int:
        return self._outer.count

    def add(self, rows: torch.Tensor) -> None:
        self._outer.add(rows)

    def matrix(self) -> torch.Tensor:
        """``E[g gᵀ]`` (dim, dim), symmetric."""
        c = self._outer.matrix()
        return (c + c.t()) / 2


def whitening(cov: torch.Tensor, rel_eps: float = REL_EPS) -> torch.Tensor:
    """Lower-triangular ``S`` with ``S Sᵀ = C + εI`` (float64). ε is relative to the mean of diag C
    (1 where that is 0 or not finite) and grows 100-fold until the factorisation succeeds."""
    c = cov.to("cpu", torch.float64)
    scale = float(c.diagonal().mean())
    eps = rel_eps * (scale if math.isfinite(scale) and scale > 0 else 1.0)
    eye = torch.eye(c.shape[0], dtype=torch.float64)
    for _ in range(10):
        s, info = torch.linalg.cholesky_ex(c + eps * eye)
        if int(info) == 0:
            return s
        eps *= 100
    raise ValueError("the calibration statistics are not finite: no whitening exists")


def whitened_factors(
    weight: torch.Tensor, cov: torch.Tensor, rank: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-R factors of a Linear weight W (out x in) minimising the error on inputs of second
    moment ``cov`` (in x in): u (in, R), Σ (R,), v (R, out) with ``Wᵀ ≈ u · diag(Σ) · v``."""
    w = weight.detach().to("cpu", torch.float64)
    out, inp = w.shape
    if tuple(cov.shape) != (inp, inp):
        raise ValueError(f"input statistics {tuple(cov.shape)} do not fit a weight of {out}x{inp}")
    if not 1 <= rank <= min(out, inp):
        raise ValueError(f"rank {rank} is outside 1..{min(out, inp)}")
    s = whitening(cov)
    p, sigma, qh = torch.linalg.svd(w @ s, full_matrices=False)
    u = torch.linalg.solve_triangular(s.t(), qh[:rank].t(), upper=True)  # S⁻ᵀ Q_R
    return u.float().contiguous(), sigma[:rank].float().contiguous(), p[:, :rank].t().float().contiguous()


def residual_aware_factors(
    weight: torch.Tensor, cross: torch.Tensor, cov: torch.Tensor, rank: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-R factors predicting the cut layer's whole output ``y = r + W g`` (the residual r the
    cut drops included) from its FFN activation g alone: the reduced-rank regression of y on g.

    ``cross = E[r gᵀ]`` (out, in), ``cov = E[g gᵀ]`` (in, in). The least-squares map is
    ``W* = W + E[r gᵀ] C⁻¹`` (C with the ridge of ``RIDGE``); since ``W* g`` is y's projection on g,
    ``E||y − Ŵ g||² = E||y − W* g||² + E||W* g − Ŵ g||²``, and ``whitened_factors(W*, C, R)``
    minimises the second term: the best rank-R predictor. Same convention as ``whitened_factors``."""
    w = weight.detach().to("cpu", torch.float64)
    out, inp = w.shape
    if tuple(cross.shape) != (out, inp):
        raise ValueError(f"residual statistics {tuple(cross.shape)} do not fit a weight of {out}x{inp}")
    if tuple(cov.shape) != (inp, inp):
        raise ValueError(f"input statistics {tuple(cov.shape)} do not fit a weight of {out}x{inp}")
    s = whitening(cov, RIDGE)
    fit = torch.cholesky_solve(cross.to("cpu", torch.float64).t(), s).t()  # E[r gᵀ] C⁻¹
    return whitened_factors(w + fit, cov, rank)


def principal_directions(cov: torch.Tensor, rank: int) -> torch.Tensor:
    """The top-R eigenvectors of a second moment (dim, dim), as columns (dim, R), largest first:
    the rank-R projection ``V_R V_Rᵀ`` minimising ``E||r − V_R V_Rᵀ r||²`` (PCA, uncentred)."""
    if not 1 <= rank <= cov.shape[0]:
        raise ValueError(f"rank {rank} is outside 1..{cov.shape[0]}")
    c = cov.to("cpu", torch.float64)
    _, vectors = torch.linalg.eigh((c + c.t()) / 2)  # ascending eigenvalues
    return vectors[:, -rank:].flip(1).float().contiguous()


def activation_error(weight: torch.Tensor, approx: torch.Tensor, cov: torch.Tensor) -> float:
    """``E||W g − Ŵ g||² = tr((W − Ŵ) C (W − Ŵ)ᵀ)`` for inputs of second moment ``cov``."""
    d = (weight.double() - approx.double()).cpu()
    return float(torch.einsum("oi,ij,oj->", d, cov.double().cpu(), d))
