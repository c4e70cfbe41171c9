"""Activation-aware factors (sft_common/cuts/whiten.py): never worse than the plain SVD on the inputs they
were computed from, exact at full rank, finite however degenerate the statistics. Residual-aware
factors: the best rank-R predictor of the layer's whole output r + W g from g."""

from __future__ import annotations

import pytest
import torch

from sft_common.cuts.ffn_output import svd_factors
from sft_common.cuts.whiten import (
    CrossMoment,
    SecondMoment,
    activation_error,
    principal_directions,
    residual_aware_factors,
    whitened_factors,
    whitening,
)

OUT, IN = 16, 40


def _approx(u, s, v):
    return (u @ torch.diag(s) @ v).t()  # Ŵ from Ŵᵀ = u · diag(Σ) · v


def _correlated(n=4000, seed=0):
    """Inputs whose variance spans three orders of magnitude along random directions."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=g) * torch.logspace(0, -3, IN)
    return torch.randn(n, IN, generator=g) @ mix.t()


def _moment(rows):
    m = SecondMoment(rows.shape[1])
    for part in rows.split(300):  # accumulated in pieces, as the calibration pass does
        m.add(part)
    return m.matrix()


def test_second_moment_is_the_mean_outer_product():
    rows = _correlated(500)
    assert torch.allclose(_moment(rows), rows.double().t() @ rows.double() / 500, atol=1e-12)
    with pytest.raises(ValueError, match="no calibration rows"):
        SecondMoment(3).matrix()


def test_whitened_error_is_at_most_the_plain_svds_at_every_rank():
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1))
    cov = _moment(_correlated())
    for rank in range(1, OUT + 1):
        whitened = activation_error(w, _approx(*whitened_factors(w, cov, rank)), cov)
        plain = activation_error(w, _approx(*svd_factors(w, rank)), cov)
        assert whitened <= plain * (1 + 1e-6) + 1e-9, rank
        if rank < OUT:  # correlated inputs: strictly better below full rank (at R=8: 41 vs 338)
            assert whitened < 0.9 * plain, rank


def test_factors_have_svd_factors_shapes_and_full_rank_is_exact():
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(2))
    cov = _moment(_correlated())
    u, s, v = whitened_factors(w, cov, 8)
    assert (u.shape, s.shape, v.shape) == ((IN, 8), (8,), (8, OUT))
    assert u.dtype == s.dtype == v.dtype == torch.float32
    assert bool((s[:-1] >= s[1:]).all()) and bool((s > 0).all())
    assert torch.allclose(v @ v.t(), torch.eye(8), atol=1e-5)  # v = P_Rᵀ: orthonormal rows
    full = _approx(*whitened_factors(w, cov, OUT))
    assert float((full - w).abs().max()) <= 1e-5  # measured 4.8e-7
    # uᵀ = Σ⁻¹ P_Rᵀ W: the edge's factor follows from the cloud's and the public W
    assert torch.allclose(u.t(), torch.diag(1 / s) @ v @ w, atol=1e-4)


@pytest.mark.parametrize(
    "rows",
    [
        torch.randn(3, IN).repeat(5, 1),  # duplicate samples, fewer than the dimensions: rank 3
        torch.zeros(7, IN),  # nothing varies
        torch.cat([torch.randn(50, 1) * 1e4, torch.zeros(50, IN - 1)], 1),  # one huge direction
    ],
    ids=["rank-deficient", "zero", "ill-conditioned"],
)
def test_degenerate_statistics_still_give_finite_factors(rows):
    w = torch.randn(OUT, IN)
    cov = _moment(rows)
    u, s, v = whitened_factors(w, cov, 8)
    assert all(bool(torch.isfinite(t).all()) for t in (u, s, v))
    s_mat = whitening(cov)
    assert torch.allclose(s_mat @ s_mat.t(), cov, atol=1e-5 * max(float(cov.diagonal().mean()), 1.0))
    # still no worse than the plain SVD on those inputs
    plain = activation_error(w, _approx(*svd_factors(w, 8)), cov)
    assert activation_error(w, _approx(u, s, v), cov) <= plain * (1 + 1e-6) + 1e-6


def test_bad_arguments_are_refused():
    w, cov = torch.randn(OUT, IN), torch.eye(IN)
    with pytest.raises(ValueError, match="do not fit"):
        whitened_factors(w, torch.eye(OUT), 4)
    with pytest.raises(ValueError, match="rank 17 is outside 1..16"):
        whitened_factors(w, cov, 17)
    with pytest.raises(ValueError, match="not finite"):
        whitening(torch.full((3, 3), float("nan")))


def test_principal_directions_reconstruct_the_inputs_best():
    """The FFN-input cut's A = V_Rᵀ, B = V_R: the top-R eigenvectors of E[r rᵀ], orthonormal, and
    no rank-R projection onto other orthonormal directions (here: random ones) reconstructs r better."""
    rows = _correlated()
    cov = _moment(rows)
    for rank in (1, 4, 8):
        v = principal_directions(cov, rank)
        assert v.shape == (IN, rank) and torch.allclose(v.t() @ v, torch.eye(rank), atol=1e-5)
        error = activation_error(torch.eye(IN), v @ v.t(), cov)  # E||r − V Vᵀ r||²
        other = torch.linalg.qr(torch.randn(IN, rank, generator=torch.Generator().manual_seed(rank)))[0]
        assert error < activation_error(torch.eye(IN), other @ other.t(), cov)
        eigenvalues = torch.linalg.eigvalsh(cov)  # ascending: the error is the sum of the rest
        assert error == pytest.approx(float(eigenvalues[: IN - rank].sum()), rel=1e-4)
    with pytest.raises(ValueError, match="rank 41 is outside 1..40"):
        principal_directions(cov, 41)


def _residual_case(n=4000, seed=3, noise=0.1):
    """g, W and a residual r = M g + noise (out): what the residual-aware init is fitted to."""
    gen = torch.Generator().manual_seed(seed)
    g = _correlated(n, seed)
    w = torch.randn(OUT, IN, generator=gen)
    m = torch.randn(OUT, IN, generator=gen) * 3  # the residual dominates the FFN output, as in BERT
    r = g @ m.t() + noise * torch.randn(n, OUT, generator=gen)
    return g, w, r


def _cross(r, g):
    c = CrossMoment(r.shape[1], g.shape[1])
    for a, b in zip(r.split(300), g.split(300)):
        c.add(a, b)
    return c.matrix()


def _output_error(g, r, w, approx):
    """Mean ||(r + W g) − Ŵ g||² over the rows: how far the cut layer's output is from the unsplit one."""
    y = r.double() + g.double() @ w.double().t()
    return float(((y - g.double() @ approx.double().t()) ** 2).sum(1).mean())


def test_cross_moment_is_the_mean_outer_product_and_refuses_unpaired_rows():
    g, _, r = _residual_case(500)
    assert torch.allclose(_cross(r, g), r.double().t() @ g.double() / 500, atol=1e-10)
    with pytest.raises(ValueError, match="3 left rows against 2 right rows"):
        CrossMoment(OUT, IN).add(torch.zeros(3, OUT), torch.zeros(2, IN))
    with pytest.raises(ValueError, match="no calibration rows"):
        CrossMoment(OUT, IN).matrix()


def test_residual_aware_factors_predict_the_whole_output_best_at_every_rank():
    """Below full rank they leave less of r + W g unexplained than the activation-aware factors and
    the plain SVD (both of which fit W g alone); at full rank they reach the least-squares fit."""
    g, w, r = _residual_case()
    cov, cross = _moment(g), _cross(r, g)
    least_squares = torch.linalg.lstsq(g.double(), (r + g @ w.t()).double()).solution.t()
    best = _output_error(g, r, w, least_squares)
    for rank in (1, 4, 8, OUT):
        u, s, v = residual_aware_factors(w, cross, cov, rank)
        assert (u.shape, s.shape, v.shape) == ((IN, rank), (rank,), (rank, OUT))
        ours = _output_error(g, r, w, _approx(u, s, v))
        aware = _output_error(g, r, w, _approx(*whitened_factors(w, cov, rank)))
        plain = _output_error(g, r, w, _approx(*svd_factors(w, rank)))
        assert ours < (0.7 if rank == 1 else 0.2) * min(aware, plain), rank  # R=8: 400 vs 22,861
        assert ours >= best * (1 - 1e-6)
    # full rank: the least-squares fit, but for the ridge's damping of g's faintest directions
    energy = _output_error(g, r, w, torch.zeros(OUT, IN))  # mean ||r + W g||²
    full = _output_error(g, r, w, _approx(*residual_aware_factors(w, cross, cov, OUT)))
    assert full <= best + 1e-4 * energy  # measured 0.26 against 0.16, of 7,900


def test_residual_aware_without_a_residual_is_the_activation_aware_init():
    g, w, _ = _residual_case()
    cov = _moment(g)
    ours = _approx(*residual_aware_factors(w, torch.zeros(OUT, IN, dtype=torch.float64), cov, 8))
    assert torch.allclose(ours, _approx(*whitened_factors(w, cov, 8)), atol=1e-4)


def test_an_exactly_linear_residual_is_recovered_at_its_rank():
    """r = M g with W + M of rank 4: rank 4 predicts the whole output exactly."""
    gen = torch.Generator().manual_seed(7)
    g = _correlated(2000, 7)
    w = torch.randn(OUT, IN, generator=gen)
    target = torch.randn(OUT, 4, generator=gen) @ torch.randn(4, IN, generator=gen)  # W + M
    r = g @ (target - w).t()
    approx = _approx(*residual_aware_factors(w, _cross(r, g), _moment(g), 4))
    energy = float((g @ target.t()).pow(2).sum(1).mean())
    assert _output_error(g, r, w, approx) <= 2e-5 * energy  # the ridge's damping: 6e-6 measured


def test_residual_aware_refuses_statistics_of_another_shape():
    w = torch.randn(OUT, IN)
    with pytest.raises(ValueError, match="residual statistics"):
        residual_aware_factors(w, torch.zeros(IN, OUT), torch.eye(IN), 4)
    with pytest.raises(ValueError, match="input statistics"):
        residual_aware_factors(w, torch.zeros(OUT, IN), torch.eye(OUT), 4)
    with pytest.raises(ValueError, match="rank 17 is outside 1..16"):
        residual_aware_factors(w, torch.zeros(OUT, IN), torch.eye(IN), 17)
