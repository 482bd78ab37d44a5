"""Theorem 3.1 with a rank limit on B (`localssl.theory.rank`): the closed form, the fit, the experiment."""
from __future__ import annotations

import pytest
import torch

from localssl.theory import LinearNet, compare_gradients, fit_b, init_weights, other_view, synthetic_views
from localssl.theory.common import DTYPE
from localssl.theory.loss import fit_objective
from localssl.theory.metrics import cosine
from localssl.theory.rank import fit_b_rank, rank, rank_cosine_closed_form, truncate


def _layer_batch(width: int = 12, n: int = 16, seed: int = 0):
    v1, v2 = synthetic_views(n, width, seed=seed)
    x = torch.cat([v1, v2])
    net = LinearNet(init_weights([width] * 3, "orthogonal", seed))
    return net, x


def test_truncate_is_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(6, 5, generator=g, dtype=DTYPE)
    t = truncate(b, 2)
    assert torch.linalg.matrix_rank(t) == 2
    s = torch.linalg.svdvals(b)
    # Eckart-Young: the error is the discarded singular values.
    torch.testing.assert_close(torch.linalg.norm(b - t) ** 2, (s[2:] ** 2).sum(), rtol=1e-12, atol=0)


def test_rank_r_closed_form_is_the_optimum_an_independent_factor_fit_finds():
    """f=linear: the truncated SVD of the dense optimum is the rank-r optimum (Eckart-Young on
    lam |B - B*|^2); L-BFGS on the factors U, V' from a random start reaches the same objective and matrix."""
    net, x = _layer_batch()
    z = net.layer(0, x)
    c = other_view(z)
    for r in (1, 3):
        closed = fit_b_rank(z, c, "linear", r, lam=0.05, method="closed")
        fitted = fit_b_rank(z, c, "linear", r, lam=0.05, method="lbfgs", seed=1)
        oc = fit_objective(z, c, list(closed), "linear", 0.05)
        of = fit_objective(z, c, list(fitted), "linear", 0.05)
        assert oc <= of + 1e-10 and (of - oc) / oc.abs() < 1e-8
        torch.testing.assert_close(fitted[0], closed[0], rtol=1e-5, atol=1e-7)
        # and it is worse than the dense optimum, whose rank is higher
        assert fit_objective(z, c, list(fit_b(z, c, "linear", lam=0.05, shared=True)), "linear", 0.05) < oc
    with pytest.raises(ValueError, match="f=linear only"):
        fit_b_rank(z, c, "logistic", 2, method="closed")


@pytest.mark.parametrize("r", [1, 2, 5])
def test_rank_cosine_closed_form_matches_the_measured_gradients(r):
    """cos(local rank-r dW^l, BP dW^l) = sqrt(sum_{k<=r} s_k^4 / sum s^4) (linear f, shared B, orthogonal W)."""
    net, x = _layer_batch(width=10, n=12, seed=2)
    lam = 0.01

    def fitter(key, z, c):
        dense = fit_b(z, c, "linear", lam=lam, shared=True)
        return dense if key == "top" else fit_b_rank(z, c, "linear", r, lam=lam)

    cmp = compare_gradients(net, x, f="linear", lam=lam, shared_b=True, fitter=fitter)
    for l in range(len(net) - 1):
        z = cmp.reps[l]
        want = rank_cosine_closed_form(fit_b(z, other_view(z), "linear", lam=lam, shared=True)[0], r)
        got = cosine(cmp.local[l], cmp.bp[l])
        assert abs(got - want) < 1e-10, (l, got, want)
        assert want < 1 - 1e-6, "degenerate case: rank r already holds the whole optimum"


def test_rank_experiment_reports_the_theory():
    res = rank(seeds=1, n_batches=1, ranks=[1, 4, 16], width=16, depth=3)
    for r in (1, 4):
        dense, closed = res.get(f"r={r}", "cos_vs_dense_bp"), res.get(f"r={r}", "closed_form")
        assert max(abs(a - b) for a, b in zip(dense, closed)) < 1e-9
        assert all(abs(v - 1) < 1e-9 for v in res.get(f"r={r}", "cos_vs_rank_r_bp"))
        assert dense[0] < 1 - 1e-4  # a rank limit below the optimum's rank breaks exactness vs dense BP
    # Cosine grows with r, and is exact at full rank (Theorem 3.1 itself).
    assert res.get("r=1", "cos_vs_dense_bp")[0] < res.get("r=4", "cos_vs_dense_bp")[0]
    assert all(abs(v - 1) < 1e-9 for v in res.get("r=16", "cos_vs_dense_bp"))
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        rank(seeds=1, n_batches=1, ranks=[0])


def test_same_rank_at_the_top_stays_exact_for_the_logistic_f():
    """Point 1 of the theory for a non-linear f, fitted by L-BFGS on the factors: cos ~ 1 at every layer."""
    res = rank(f="logistic", seeds=1, n_batches=1, ranks=[2], width=8, depth=3)
    assert all(abs(v - 1) < 1e-6 for v in res.get("r=2", "cos_vs_rank_r_bp"))
    assert res.get("r=2", "cos_vs_dense_bp")[0] < 0.999
