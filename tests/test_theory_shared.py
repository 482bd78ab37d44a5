"""Proposition 3.5 with one channel map B at every position (`localssl.theory.conv`, B = B_ch (x) I_P).

What is checked: the restricted fit returns B_ch (x) I_P and is the optimum over that set (stationary in
B_ch, the same objective an independent L-BFGS on B_ch reaches); for the linear f it is the projection of
the dense optimum (closed form); chanBP is exact where the set is invariant (1x1 convs) and not with
3x3 ones; in the experiment the restricted B's cosine is below the exact dense kernel-1 setting's.
"""
from __future__ import annotations

import pytest
import torch

from localssl.theory import ConvNet, compare_gradients, conv, fit_b, orthogonal_conv_kernel, other_view
from localssl.theory.common import DTYPE
from localssl.theory.conv import distance_from_shared, shared_fitter, shared_projection, unrolled_operator
from localssl.theory.fit import _lbfgs
from localssl.theory.loss import fit_objective
from localssl.theory.metrics import cosine

C, S = 3, 4
P = S * S


def _eye() -> torch.Tensor:
    return torch.eye(P, dtype=DTYPE)


def _layer_batch(seed: int = 0, n: int = 12, channels: int = C, size: int = S):
    """z and its context at the first layer of a 3x3 orthogonal circular conv (the experiment's construction)."""
    g = torch.Generator().manual_seed(seed)
    w = orthogonal_conv_kernel(channels, generator=g)
    s = torch.randn(n // 2, channels, size, size, generator=g, dtype=DTYPE)
    x = torch.cat([s + 0.5 * torch.randn(s.shape, generator=g, dtype=DTYPE),
                   s + 0.5 * torch.randn(s.shape, generator=g, dtype=DTYPE)])
    z = ConvNet([w]).layer(0, x).flatten(1)
    return z, other_view(z), x


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("channels,size", [(C, S), (5, 2)])  # fewer channels than positions, and more
def test_linear_f_restricted_optimum_is_the_projection_of_the_dense_one(shared, channels, size):
    """f=linear: fit objective = lam |B - B*|^2 + const, so the optimum over {B_ch (x) I} is B*'s projection:
    B_ch[a, b] = mean_p B*[aP+p, bP+p]. The restricted fit (representer solution on B_ch's atoms)
    must agree with that closed form (computed from the dense fit) to float64 precision."""
    z, c, _ = _layer_batch(channels=channels, size=size)
    P = size * size  # noqa: N806 (the positions, as in the formulas)
    dense = fit_b(z, c, "linear", lam=0.02, shared=shared)
    restricted = fit_b(z, c, "linear", lam=0.02, shared=shared, positions=P)
    assert len(restricted) == len(dense) == (1 if shared else 2)
    for bd, br in zip(dense, restricted):
        closed = shared_projection(bd, P)
        assert float((br - closed).abs().max()) <= 1e-10 * float(closed.abs().max())
        # the hand formula for one entry: channel 1 -> channel 2 is the mean of block (1, 2)'s diagonal
        want = sum(float(bd[1 * P + p, 2 * P + p]) for p in range(P)) / P
        assert abs(float(br[1 * P, 2 * P]) - want) <= 1e-12 * abs(want) + 1e-15
        # the projection is orthogonal: its residual is orthogonal to the set (so it is the nearest point)
        g = torch.Generator().manual_seed(3)
        other = torch.kron(torch.randn(channels, channels, generator=g, dtype=DTYPE), torch.eye(P, dtype=DTYPE))
        assert abs(float(((bd - closed) * other).sum())) <= 1e-10 * float(bd.abs().sum())


@pytest.mark.parametrize("f,channels,size", [("logistic", C, S), ("type1", C, S), ("logistic", 5, 2)])
def test_restricted_fit_is_kron_and_the_optimum_over_the_set(f, channels, size):
    z, c, _ = _layer_batch(seed=1, channels=channels, size=size)
    P = size * size  # noqa: N806

    def _eye() -> torch.Tensor:
        return torch.eye(P, dtype=DTYPE)

    lam = 0.01
    bs = fit_b(z, c, f, lam=lam, positions=P)
    chans = [b[::P, ::P].clone() for b in bs]  # entry (aP, bP) of B_ch (x) I is B_ch[a, b]
    for b, a in zip(bs, chans):
        assert b.shape == (channels * P, channels * P)
        assert torch.equal(b, torch.kron(a, _eye()))
    # Stationary in B_ch for the objective of the full B (penalty lam |B|^2 = lam P |B_ch|^2).
    leaves = [a.clone().requires_grad_(True) for a in chans]
    with torch.enable_grad():
        obj = fit_objective(z, c, [torch.kron(a, _eye()) for a in leaves], f, lam)
        grads = torch.autograd.grad(obj, leaves)
    obj = obj.detach()
    assert max(float(gr.abs().max()) for gr in grads) < 1e-10
    # An independent fit: L-BFGS on B_ch through the same objective with kron built in, from B_ch = 0.
    fitted = _lbfgs(lambda a: fit_objective(z, c, [torch.kron(ai, _eye()) for ai in a], f, lam),
                    [torch.zeros(channels, channels, dtype=DTYPE)] * 2, lr=1.0, max_iter=500, tolerance_grad=1e-13,
                    tolerance_change=1e-18, history_size=50)
    of = fit_objective(z, c, [torch.kron(fa, _eye()) for fa in fitted], f, lam)
    assert float(obj) <= float(of) + 1e-12 and float(of - obj) < 1e-9 * float(obj)  # Newton's is the lower
    for a, fa in zip(chans, fitted):  # L-BFGS stops short of machine precision: a looser match
        torch.testing.assert_close(fa, a, rtol=1e-4, atol=1e-6)
    # and the restriction costs objective: the dense optimum is lower
    assert fit_objective(z, c, list(fit_b(z, c, f, lam=lam)), f, lam) < obj - 1e-6


def test_positions_must_divide_the_dims():
    z, c, _ = _layer_batch()
    with pytest.raises(ValueError, match="positions=5 must divide"):
        fit_b(z, c, "linear", positions=5)
    with pytest.raises(ValueError, match="unknown restriction"):
        shared_fitter("some", P, f="linear")


def test_conv_operators_do_not_map_the_set_onto_itself_1x1_ones_do():
    """M' (A (x) I) M for M the unrolled 3x3 orthogonal circular conv: off the set for a generic A, on it
    for A = I (M'M = I); for a 1x1 conv (M = K (x) I) on it for every A."""
    g = torch.Generator().manual_seed(4)
    m = unrolled_operator(ConvNet([orthogonal_conv_kernel(C, generator=g)]), 0, (C, S, S))
    a = torch.kron(torch.randn(C, C, generator=g, dtype=DTYPE), _eye())
    assert distance_from_shared(m.T @ a @ m, P) > 0.05
    assert distance_from_shared(m.T @ m, P) < 1e-12
    w1 = torch.zeros(C, C, 3, 3, dtype=DTYPE)
    w1[:, :, 1, 1] = torch.nn.init.orthogonal_(torch.empty(C, C, dtype=DTYPE), generator=g)
    m1 = unrolled_operator(ConvNet([w1]), 0, (C, S, S))
    assert distance_from_shared(m1.T @ a @ m1, P) < 1e-12


def test_shared_bp_is_exact_for_1x1_convs_and_not_for_3x3():
    """Rank.py's point 1 for the set {B_ch (x) I}: exact iff z -> Mz maps it onto itself (1x1 convs)."""
    _, _, x = _layer_batch(seed=5, n=16)
    g = torch.Generator().manual_seed(6)
    w1 = []
    for _ in range(3):
        w = torch.zeros(C, C, 3, 3, dtype=DTYPE)
        w[:, :, 1, 1] = torch.nn.init.orthogonal_(torch.empty(C, C, dtype=DTYPE), generator=g)
        w1.append(w)
    w3 = [orthogonal_conv_kernel(C, generator=g) for _ in range(3)]

    def cosines(weights, restrict):
        cmp = compare_gradients(ConvNet(weights), x, f="logistic",  # readout: flatten (kernel 1)
                                fitter=shared_fitter(restrict, P, f="logistic"))
        return [cosine(a, b) for a, b in zip(cmp.local, cmp.bp)]

    assert all(abs(v - 1) < 1e-9 for v in cosines(w1, "all"))
    three = cosines(w3, "all")
    assert all(v < 1 - 1e-3 for v in three[:-1]) and abs(three[-1] - 1) < 1e-9  # top: M = I


def test_conv_experiment_shared_settings_below_the_exact_dense_one():
    res = conv(seeds=1, n_batches=1, batch_size=8, size=4, depth=3)
    dense = res.get("kernel1", "cosine_mean")
    assert all(abs(v - 1) < 1e-9 for v in dense)
    for a, b in zip(res.get("kernel1-chanB", "cosine_mean"), dense):
        assert a < b - 1e-3
    bp = res.get("kernel1-chanB/chanBP", "cosine_mean")
    dist = res.get("kernel1-chanB/chanBP", "dist_MBM_from_set")
    assert all(v < 1 - 1e-3 for v in bp[:-1]) and abs(bp[-1] - 1) < 1e-9  # the top layer's M is I
    assert all(d > 0.05 for d in dist[:-1]) and dist[-1] < 1e-12
