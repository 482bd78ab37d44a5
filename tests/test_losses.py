"""Contract tests of the pure loss functions (``localssl.rules.losses``, METHODS 2, 2.2, 2.3).

Every test states an exact property the code must have, so each one fails on
a plausible bug: a wrong sign or a missing factor in an f, the negative taken
from the wrong row, views swapped the wrong way, a pooling kernel that does
not match the grid, an InfoNCE that normalises or symmetrises differently.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from localssl.rules import (
    CONTRASTIVE_F,
    contrastive_loss,
    info_nce,
    info_nce_symmetric,
    nt_xent,
    scores,
    spatial_pool,
    swap_views,
)
from localssl.rules.losses import barlow_twins, vicreg


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- f


@pytest.mark.parametrize("name", CONTRASTIVE_F.names())
def test_f_is_decreasing_in_u_pos_and_increasing_in_u_neg(name):
    """METHODS 2: f is decreasing in the positive score and increasing in the negative one."""
    f = CONTRASTIVE_F.get(name)
    g = _gen(1)
    # Scores over a range that covers both sides of the hinge kinks (+-1).
    u_pos = (torch.rand(4000, generator=g, dtype=torch.float64) * 8 - 4).requires_grad_()
    u_neg = (torch.rand(4000, generator=g, dtype=torch.float64) * 8 - 4).requires_grad_()
    loss = f(u_pos, u_neg)
    assert loss.shape == u_pos.shape, "f must be per-sample (the batch mean is taken by contrastive_loss)"
    d_pos, d_neg = torch.autograd.grad(loss.sum(), (u_pos, u_neg))
    assert (d_pos <= 0).all(), f"{name}: df/du_pos > 0 somewhere"
    assert (d_neg >= 0).all(), f"{name}: df/du_neg < 0 somewhere"
    # ... and not constant: it really pushes both scores somewhere in the range.
    assert (d_pos < 0).any() and (d_neg > 0).any()

    # Finite differences (no autograd): the same monotonicity on the values.
    with torch.no_grad():
        base = f(u_pos, u_neg)
        step = 0.05
        assert (f(u_pos + step, u_neg) <= base + 1e-12).all()
        assert (f(u_pos, u_neg + step) >= base - 1e-12).all()
        assert (f(u_pos + step, u_neg) < base).any() and (f(u_pos, u_neg + step) > base).any()


def test_f_values_match_methods():
    """The formulas of METHODS 2, at hand-picked points."""
    up = torch.tensor([-2.0, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    un = torch.tensor([-3.0, -1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    relu, sp = torch.relu, F.softplus
    expected = {
        "hinge": relu(1 - up) + relu(1 + un),
        "softplus": sp(1 - up) + sp(1 + un),
        "logistic": sp(1 - up) + sp(1 + un),
        "linear": un - up,
        "type1": sp(un - up),
    }
    assert set(expected) == set(CONTRASTIVE_F.names()), "a new f needs its formula here"
    for name, want in expected.items():
        torch.testing.assert_close(CONTRASTIVE_F.get(name)(up, un), want, rtol=0, atol=1e-15)
    # Hinge: exactly zero once the positive is above 1 and the negative below -1.
    assert CONTRASTIVE_F.get("hinge")(torch.tensor([1.5]), torch.tensor([-1.5])).item() == 0.0


def test_unknown_f_lists_valid_names():
    z = torch.randn(4, 3)
    with pytest.raises(KeyError) as e:
        contrastive_loss(z, z, "hingee")
    for name in CONTRASTIVE_F.names():
        assert name in str(e.value)


@pytest.mark.parametrize("name", ["linear", "type1", "hinge"])
def test_loss_is_blind_to_a_common_shift_of_z(name):
    """u_pos - u_neg = (z_m - z_{m+1}) . B c_m does not see z -> z + v (same context for both).

    So linear and type-1 losses are exactly shift invariant, and so is the hinge
    while every term is active; hence sum_m dL/dz_m = 0 there (the reason a bias
    under global pooling can get exactly zero gradient).
    """
    g = _gen(6)
    z = (0.01 * torch.randn(8, 5, generator=g, dtype=torch.float64)).requires_grad_()
    bc = 0.01 * torch.randn(8, 5, generator=g, dtype=torch.float64)  # small scores: all hinge terms active
    v = torch.randn(5, generator=g, dtype=torch.float64) * 0.01
    torch.testing.assert_close(contrastive_loss(z + v, bc, name), contrastive_loss(z, bc, name), rtol=1e-12, atol=1e-14)
    (dz,) = torch.autograd.grad(contrastive_loss(z, bc, name), (z,))
    torch.testing.assert_close(dz.sum(0), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-15)
    # softplus has row-dependent gammas: no such invariance.
    (dz_sp,) = torch.autograd.grad(contrastive_loss(z, bc, "softplus"), (z,))
    assert dz_sp.sum(0).abs().max() > 1e-7


# ----------------------------------------------------------------- scores, views


@pytest.mark.parametrize("n_img", [2, 3, 5])
def test_scores_negative_is_next_row(n_img):
    """u_pos_i = z_i . bc_i and u_neg_i = z_{(i+1) mod 2B} . bc_i, exactly."""
    n = 2 * n_img
    g = _gen(2)
    z = torch.randn(n, 7, generator=g, dtype=torch.float64)
    bc = torch.randn(n, 7, generator=g, dtype=torch.float64)
    u_pos, u_neg = scores(z, bc)
    for i in range(n):
        assert u_pos[i].item() == pytest.approx(float(sum(z[i, d] * bc[i, d] for d in range(7))), rel=1e-13)
        j = (i + 1) % n
        assert u_neg[i].item() == pytest.approx(float(sum(z[j, d] * bc[i, d] for d in range(7))), rel=1e-13)
    # Exact structural check: a one-hot z picks out which row a score reads.
    eye = torch.eye(n, dtype=torch.float64)
    _, u_neg_eye = scores(eye, eye)  # u_neg_i = e_{i+1} . e_i = 0
    assert (u_neg_eye == 0).all()
    _, u_neg_shift = scores(eye, torch.roll(eye, -1, dims=0))  # bc_i = e_{i+1}
    assert (u_neg_shift == 1).all()


@pytest.mark.parametrize("n_img", [2, 3, 8])
def test_negative_is_always_another_image(n_img):
    """For B >= 2, row (i+1) mod 2B is neither row i nor the other view i +- B of the same image."""
    n = 2 * n_img
    image_of = torch.arange(n) % n_img
    neg = (torch.arange(n) + 1) % n
    assert (image_of[neg] != image_of).all()


def test_swap_views_swaps_halves():
    x = torch.arange(12.0).reshape(6, 2)
    s = swap_views(x)
    assert torch.equal(s[:3], x[3:]) and torch.equal(s[3:], x[:3])
    assert torch.equal(swap_views(s), x)
    # Row i of view 1 <-> row i of view 2, for 4-D maps too.
    m = torch.randn(8, 2, 3, 3)
    assert torch.equal(swap_views(m)[1], m[5]) and torch.equal(swap_views(m)[5], m[1])
    with pytest.raises(ValueError):
        swap_views(torch.zeros(5, 2))


def test_contrastive_loss_is_batch_mean_of_f():
    g = _gen(3)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64)
    bc = torch.randn(6, 5, generator=g, dtype=torch.float64)
    for name in CONTRASTIVE_F.names():
        up = torch.stack([z[i] @ bc[i] for i in range(6)])
        un = torch.stack([z[(i + 1) % 6] @ bc[i] for i in range(6)])
        want = CONTRASTIVE_F.get(name)(up, un).mean()
        torch.testing.assert_close(contrastive_loss(z, bc, name), want, rtol=1e-13, atol=0)


# ------------------------------------------------------------------- pooling


def test_spatial_pool_full_grid_is_flatten():
    h = torch.randn(4, 3, 6, 6)
    assert torch.equal(spatial_pool(h, 6), h.flatten(1))


def test_spatial_pool_grid_one_is_global_mean():
    h = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(spatial_pool(h, 1), h.mean(dim=(2, 3)), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("grid", [2, 3])
def test_spatial_pool_is_block_mean_channel_major(grid):
    """grid g on an HxW map: kernel = stride = H/g, flattened as (channel, row, col)."""
    n, c, s = 2, 3, 6
    k = s // grid
    h = torch.randn(n, c, s, s, dtype=torch.float64)
    want = h.reshape(n, c, grid, k, grid, k).mean(dim=(3, 5)).reshape(n, c * grid * grid)
    torch.testing.assert_close(spatial_pool(h, grid), want, rtol=1e-14, atol=1e-15)
    # One explicit cell: channel 1, cell (row 1, col 0).
    cell = h[0, 1, k : 2 * k, 0:k].mean()
    assert spatial_pool(h, grid)[0, 1 * grid * grid + 1 * grid + 0].item() == pytest.approx(cell.item(), rel=1e-13)


def test_spatial_pool_rejects_grid_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide"):
        spatial_pool(torch.zeros(2, 3, 6, 6), 4)
    with pytest.raises(ValueError):
        spatial_pool(torch.zeros(2, 3, 8, 6), 4)  # divides H but not W


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grid", [1, 2, 4])
def test_spatial_pool_gradient_equals_avg_pool2d(grid, channels_last):
    """The hand-written backward (a broadcast view for global pooling) gives avg_pool2d's gradient
    bitwise, also through the ReLU under it, and a gradient a channels_last conv can take."""
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 5, 8, 8, dtype=torch.float64).to(memory_format=mf)
    up = torch.randn(3, 5 * grid * grid, dtype=torch.float64)
    grads = []
    for pool in (lambda h: spatial_pool(h, grid), lambda h: F.avg_pool2d(h, 8 // grid).flatten(1)):
        xi = x.clone().requires_grad_(True)
        (pool(torch.relu(xi)) * up).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
    assert grads[0].is_contiguous(memory_format=mf)


def test_spatial_pool_passes_vectors_through():
    v = torch.randn(4, 9)
    assert spatial_pool(v, 1) is v


# ------------------------------------------------------------------- InfoNCE


def _cos_matrix_loop(a: list[list[float]], c: list[list[float]]) -> list[list[float]]:
    """cos(a_i, c_j) with Python floats and the math module only."""

    def cos(x, y):
        dot = sum(xk * yk for xk, yk in zip(x, y))
        return dot / (math.sqrt(sum(v * v for v in x)) * math.sqrt(sum(v * v for v in y)))

    return [[cos(x, y) for y in c] for x in a]


def _nll_loop(sim: list[list[float]], rows: list[int], targets: list[int], cols: list[list[int]]) -> float:
    """mean over anchors of -log(exp(sim[r][t]) / sum_{j in cols} exp(sim[r][j]))."""
    out = [-(sim[r][t] - math.log(sum(math.exp(sim[r][j]) for j in cs))) for r, t, cs in zip(rows, targets, cols)]
    return sum(out) / len(out)


def _fixed_pair(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(4)
    p1 = torch.randn(5, 6, generator=g, dtype=dtype) * 3
    p2 = p1 + 0.5 * torch.randn(5, 6, generator=g, dtype=dtype)
    return p1, p2


# float64: the loops and torch differ by rounding only (a few ulps per term).
F64 = dict(rel=1e-12, abs=1e-12)


def test_info_nce_by_hand_on_a_2x2_example():
    """One direction (METHODS 2.3), worked out on paper.

    p1 = [(1, 0), (0, 1)], p2 = [(1, 0), (1, 1)], T = 0.5: cos = [[1, 1/sqrt2], [0, 1/sqrt2]],
    S = cos / T = [[2, sqrt2], [0, sqrt2]]; loss = -(1/2) [log softmax(S_0)_0 + log softmax(S_1)_1].
    """
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    r2 = math.sqrt(2)
    want = -0.5 * ((2 - math.log(math.exp(2) + math.exp(r2))) + (r2 - math.log(1 + math.exp(r2))))
    assert info_nce(p1, p2, 0.5).item() == pytest.approx(want, **F64)
    # The symmetric loss also averages the columns' softmax: here a different number.
    col = -0.5 * ((2 - math.log(math.exp(2) + 1)) + (r2 - math.log(2 * math.exp(r2))))
    assert info_nce_symmetric(p1, p2, 0.5).item() == pytest.approx(0.5 * (want + col), **F64)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_info_nce_is_the_reference_one_direction_loss(t):
    """-mean_i log_softmax(S, dim=1)_ii, S_ij = cos(p1_i, p2_j) / T: a Python loop, and the reference's
    expression (nn.CosineSimilarity(dim=-1, eps=1e-9) of the broadcast pair, zihan-wu/local-SSL SSLLoss.py)."""
    p1, p2 = _fixed_pair()
    b = p1.shape[0]
    sim = [[v / t for v in row] for row in _cos_matrix_loop(p1.tolist(), p2.tolist())]
    want = _nll_loop(sim, list(range(b)), list(range(b)), [list(range(b))] * b)
    assert info_nce(p1, p2, t).item() == pytest.approx(want, **F64)
    ref_sim = torch.nn.CosineSimilarity(dim=-1, eps=1e-9)(p1.unsqueeze(1), p2.unsqueeze(0)) / t
    ref = torch.diagonal(-F.log_softmax(ref_sim, dim=1)).mean()
    torch.testing.assert_close(info_nce(p1, p2, t), ref, rtol=1e-12, atol=1e-12)
    # Gradients too (autograd through both views), against the reference expression.
    q1, q2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    r1, r2 = p1.clone().requires_grad_(), p2.clone().requires_grad_()
    info_nce(q1, q2, t).backward()
    sim_r = torch.nn.CosineSimilarity(dim=-1, eps=1e-9)(r1.unsqueeze(1), r2.unsqueeze(0)) / t
    torch.diagonal(-F.log_softmax(sim_r, dim=1)).mean().backward()
    torch.testing.assert_close(q1.grad, r1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(q2.grad, r2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_info_nce_symmetric_and_nt_xent_by_loop(t):
    p1, p2 = _fixed_pair()
    b = p1.shape[0]
    sim = [[v / t for v in row] for row in _cos_matrix_loop(p1.tolist(), p2.tolist())]
    simt = [list(col) for col in zip(*sim)]
    rows = list(range(b))
    sym = 0.5 * (_nll_loop(sim, rows, rows, [rows] * b) + _nll_loop(simt, rows, rows, [rows] * b))
    assert info_nce_symmetric(p1, p2, t).item() == pytest.approx(sym, **F64)
    # NT-Xent: 2B anchors, positive = the other view, 2B - 2 negatives (every other row, self excluded).
    z = torch.cat([p1, p2]).tolist()
    simz = [[v / t for v in row] for row in _cos_matrix_loop(z, z)]
    anchors = list(range(2 * b))
    targets = [(i + b) % (2 * b) for i in anchors]
    cols = [[j for j in anchors if j != i] for i in anchors]
    assert nt_xent(p1, p2, t).item() == pytest.approx(_nll_loop(simz, anchors, targets, cols), **F64)


def test_info_nce_variants_differ():
    """The three are different losses, with different gradients (so no rule silently uses another)."""
    p1, p2 = _fixed_pair()
    grads = []
    for fn in (info_nce, info_nce_symmetric, nt_xent):
        q = p1.clone().requires_grad_()
        fn(q, p2, 0.1).backward()
        grads.append(q.grad)
    for i in range(3):
        for j in range(i + 1, 3):
            assert (grads[i] - grads[j]).abs().max() > 1e-3 * grads[i].abs().max()


def test_info_nce_is_scale_invariant_and_asymmetric_targets():
    """Cosine similarity: rescaling a row changes nothing; permuting view 2 changes the loss."""
    g = _gen(5)
    p1, p2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    scale = torch.rand(4, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(info_nce(p1 * scale, p2, 0.1), info_nce(p1, p2, 0.1), rtol=1e-5, atol=1e-6)
    # Perfectly aligned views with a low temperature: loss near its minimum 0.
    q = torch.eye(4, 8) * 5
    assert info_nce(q, q, 0.05).item() < 1e-6
    assert info_nce(q, q[[1, 2, 3, 0]], 0.05).item() > 10


# ------------------------------------------------- Barlow Twins and VICReg (METHODS 5.1)

def _rows(seed: int, n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=_gen(seed), dtype=torch.float64)


def _mean_var_loop(z: list[list[float]], j: int, unbiased: bool) -> tuple[float, float]:
    col = [row[j] for row in z]
    m = sum(col) / len(col)
    return m, sum((v - m) ** 2 for v in col) / (len(col) - (1 if unbiased else 0))


def test_barlow_twins_by_hand_on_a_3x2_example():
    # Two rows of features, three images: standardise each column, C = A^T B / 3.
    z1 = [[1.0, 2.0], [2.0, 0.0], [4.0, 1.0]]
    z2 = [[0.0, 1.0], [3.0, 3.0], [3.0, 2.0]]
    eps = 1e-5

    def standardised(z):
        cols = [_mean_var_loop(z, j, unbiased=False) for j in range(2)]
        return [[(row[j] - cols[j][0]) / math.sqrt(cols[j][1] + eps) for j in range(2)] for row in z]

    a, b = standardised(z1), standardised(z2)
    c = [[sum(a[n][i] * b[n][j] for n in range(3)) / 3 for j in range(2)] for i in range(2)]
    lambd = 0.0051
    expected = (1 - c[0][0]) ** 2 + (1 - c[1][1]) ** 2 + lambd * (c[0][1] ** 2 + c[1][0] ** 2)
    got = barlow_twins(torch.tensor(z1, dtype=torch.float64), torch.tensor(z2, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_barlow_twins_equals_the_reference_expression_with_batchnorm():
    # facebookresearch/barlowtwins: c = bn(z1).T @ bn(z2) / N with BatchNorm1d(affine=False) in training mode.
    z1, z2 = _rows(1, 16, 8), _rows(2, 16, 8)
    bn = torch.nn.BatchNorm1d(8, affine=False).double().train()
    c = bn(z1).T @ bn(z2) / 16
    off = c - torch.diag(torch.diagonal(c))
    reference = (torch.diagonal(c) - 1).pow(2).sum() + 0.0051 * off.pow(2).sum()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ours = barlow_twins(a, b)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=0)
    ra, rb = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    c = bn(ra).T @ bn(rb) / 16
    ((torch.diagonal(c) - 1).pow(2).sum() + 0.0051 * (c - torch.diag(torch.diagonal(c))).pow(2).sum()).backward()
    ours.backward()
    torch.testing.assert_close(a.grad, ra.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, rb.grad, rtol=1e-10, atol=1e-12)


def test_barlow_twins_is_zero_only_for_perfectly_correlated_decorrelated_views():
    z = _rows(3, 64, 4)
    z = 8 * torch.linalg.qr(z - z.mean(0))[0]  # zero-mean orthogonal columns of variance 1: C = I up to eps
    assert barlow_twins(z, z).item() < 1e-6
    assert barlow_twins(z, -z).item() > 3.9  # anti-correlated: each (1 - (-1))^2 = 4
    with pytest.raises(ValueError, match=">= 2 rows"):
        barlow_twins(z[:1], z[:1])


def test_vicreg_by_hand_on_a_3x2_example():
    z1 = [[1.0, 2.0], [2.0, 0.0], [4.0, 1.0]]
    z2 = [[0.0, 1.0], [3.0, 3.0], [3.0, 2.0]]
    n, d = 3, 2
    inv = sum((z1[i][j] - z2[i][j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def var_cov(z):
        stats = [_mean_var_loop(z, j, unbiased=True) for j in range(d)]
        v = sum(max(0.0, 1 - math.sqrt(s[1] + 1e-4)) for s in stats) / d
        cov01 = sum((z[i][0] - stats[0][0]) * (z[i][1] - stats[1][0]) for i in range(n)) / (n - 1)
        return v, 2 * cov01 ** 2 / d  # the two off-diagonal entries are equal

    (va, ca), (vb, cb) = var_cov(z1), var_cov(z2)
    expected = 25 * inv + 25 * (va / 2 + vb / 2) + 1 * (ca + cb)
    got = vicreg(torch.tensor(z1, dtype=torch.float64), torch.tensor(z2, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_vicreg_terms_each_respond_to_what_they_measure():
    z = _rows(4, 256, 8) * 3  # std ~3 > 1: no variance penalty; nearly uncorrelated
    base = vicreg(z, z, sim=0, var=1, cov=0).item()
    assert base == 0.0
    collapsed = vicreg(z * 0.01, z * 0.01, sim=0, var=1, cov=0).item()
    assert collapsed > 0.9  # std 0.03: relu(1 - 0.03) per dimension
    assert vicreg(z, z + 1, sim=1, var=0, cov=0).item() == pytest.approx(1.0)  # mean squared difference
    correlated = torch.cat([z[:, :1]] * 8, dim=1)
    assert vicreg(correlated, correlated, sim=0, var=0, cov=1).item() > 100 * vicreg(z, z, sim=0, var=0, cov=1).item()


def test_barlow_and_vicreg_compute_in_float32_from_bf16():
    z1, z2 = _rows(5, 32, 8).float(), _rows(6, 32, 8).float()
    for loss in (barlow_twins, vicreg):
        out = loss(z1.bfloat16(), z2.bfloat16())
        assert out.dtype == torch.float32
        assert out.item() == pytest.approx(loss(z1.bfloat16().float(), z2.bfloat16().float()).item(), rel=1e-6)
