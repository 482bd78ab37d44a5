"""Tests of the deep-linear-network theory (METHODS 3) in localssl.theory."""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from localssl.theory import (
    AUTHORS_LAM,
    AUTHORS_SEED,
    LOSS_FUNCTIONS,
    NEGATIVES,
    ConvNet,
    LinearNet,
    authors_draw,
    broken,
    compare_gradients,
    conv,
    cosine,
    dfb,
    fit_b,
    fit_b_authors,
    fit_objective,
    grad_errors,
    init_weights,
    mnist_quadrant_batches,
    orthogonal_conv_kernel,
    other_view,
    projection,
    run_theory,
    scores,
    synthetic_views,
    theorem31,
    unified_loss,
    unrolled_operator,
)
from localssl.theory.linear import single_thread

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_DIR = Path(os.environ.get("LOCALSSL_MNIST_DIR", SHARED / "mnist"))
D = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: one thread is fastest and avoids OpenMP stalls on a busy CPU.
    with single_thread():
        yield


def _batch(n: int = 16, dim: int = 24, seed: int = 0) -> torch.Tensor:
    v1, v2 = synthetic_views(n, dim, seed=seed)
    return torch.cat([v1, v2])


# --- cosine ----------------------------------------------------------------


def test_cosine_tiny_vectors_are_exact():
    a = torch.randn(1000, dtype=D) * 1e-9
    assert cosine(a, a) == pytest.approx(1.0, abs=1e-15)
    assert cosine(a, 3.0 * a) == pytest.approx(1.0, abs=1e-15)
    assert cosine(a, -a) == pytest.approx(-1.0, abs=1e-15)
    # Norm 1e-9: F.cosine_similarity clamps norms at eps = 1e-8 here and reads ~0.01.
    t = torch.randn(100, dtype=D) * 1e-10
    assert cosine(t, t) == pytest.approx(1.0, abs=1e-15)
    b = torch.randn(50, dtype=D) * 1e-200  # would underflow when squared
    assert cosine(b, b) == pytest.approx(1.0, abs=1e-15)
    assert cosine(b, 2 * b) == pytest.approx(1.0, abs=1e-15)


def test_cosine_zero_and_orthogonal():
    z = torch.zeros(5, dtype=D)
    e1, e2 = torch.eye(5, dtype=D)[0], torch.eye(5, dtype=D)[1]
    assert cosine(z, z) == 1.0
    assert cosine(z, e1) == 0.0 and cosine(e1, z) == 0.0
    assert cosine(e1, e2) == 0.0
    assert cosine(e1 + e2, e1) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    err = grad_errors(e1 * 1e-9, e1 * 1e-9)
    assert err["cosine"] == 1.0 and err["max_rel_err"] == 0.0 and err["frob_err"] == 0.0


# --- fitting B ---------------------------------------------------------------


@pytest.mark.parametrize("f", ["logistic", "type1", "linear"])
@pytest.mark.parametrize("shared", [False, True])
def test_newton_fit_is_stationary_and_matches_lbfgs(f, shared):
    x = _batch()
    z = x @ init_weights([24, 20], "default", 1)[0].T
    c = other_view(z)
    bs = [b.clone().requires_grad_(True) for b in fit_b(z, c, f, shared=shared)]
    obj = fit_objective(z, c, bs, f)
    grads = torch.autograd.grad(obj, bs)
    scale = max(float(b.detach().abs().max()) for b in bs)
    assert all(float(g.abs().max()) <= 1e-10 * max(1.0, scale) for g in grads)
    lb = fit_b(z, c, f, shared=shared, method="lbfgs", lr=1.0)
    for b1, b2 in zip(bs, lb):
        assert cosine(b1, b2) > 1 - 1e-8


def test_hinge_fit_is_the_minimum():
    x = _batch()
    z = x @ init_weights([24, 20], "default", 2)[0].T
    c = other_view(z)
    b = fit_b(z, c, "hinge")
    best = float(fit_objective(z, c, b, "hinge"))
    assert best <= float(fit_objective(z, c, fit_b(z, c, "hinge", method="lbfgs", lr=1.0), "hinge")) + 1e-9
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        pert = tuple(bi + 1e-3 * bi.abs().max() * torch.randn(bi.shape, generator=g, dtype=D) for bi in b)
        assert best <= float(fit_objective(z, c, pert, "hinge")) + 1e-12


# --- Theorem 3.1 -------------------------------------------------------------


@pytest.mark.parametrize("f", ["logistic", "type1", "linear"])
def test_theorem31_exact_local_equals_bp(f):
    widths = [40] + [32] * 5  # W^1 semi-orthogonal; M = W^L...W^{l+1} orthogonal
    x = _batch(16, 40)
    net = LinearNet(init_weights(widths, "orthogonal", 3))
    for shared in (False, True):
        errs = compare_gradients(net, x, f=f, shared_b=shared).errors()
        for l, e in enumerate(errs):
            assert e["cosine"] >= 1 - 1e-6, (l, e)
            assert e["max_rel_err"] <= 1e-4, (l, e)


def test_theorem31_experiment():
    res = theorem31(seeds=1, n_batches=1, width=32, lbfgs_batches=1)
    for key in ("newton", "lbfgs"):
        assert all(c >= 1 - 1e-6 for c in res.get(key, "cosine_min"))
    assert all(e <= 1e-4 for e in res.get("newton", "max_rel_err"))
    assert len(res.get("newton", "cosine_mean")) == 6
    assert "newton" in res.table()


def test_projection_b_equals_rotated_top_b():
    res = projection(seeds=1, n_batches=1, width=24, depth=4)
    assert all(c >= 1 - 1e-9 for c in res.get("orthogonal", "cos(B^l,M'B^LM)_mean"))
    low = res.get("default", "cos(B^l,M'B^LM)_mean")
    assert low[0] < 0.9 and low[-1] == pytest.approx(1.0, abs=1e-12)


# --- broken assumptions --------------------------------------------------------


@pytest.mark.parametrize("init,relu", [("default", False), ("orthogonal", True), ("default", True)])
def test_broken_assumptions_misalign_lower_layers(init, relu):
    widths = [32] * 7
    x = _batch(16, 32)
    cos = []
    for seed in range(2):
        errs = compare_gradients(LinearNet(init_weights(widths, init, seed), relu=relu), x).errors()
        cos.append([e["cosine"] for e in errs])
    mean = torch.tensor(cos).mean(0)
    assert all(float(c) < 0.99 for c in mean[:3]), mean
    # The top layer's local loss is the global loss: identical gradients, even when tiny.
    assert float(mean[-1]) == pytest.approx(1.0, abs=1e-12)


def test_relu_default_init_gives_tiny_gradients_that_cosine_reads_right():
    widths = [32] * 7
    net = LinearNet(init_weights(widths, "default", 0), relu=True)
    cmp = compare_gradients(net, _batch(16, 32))
    top_local, top_bp = cmp.local[-1], cmp.bp[-1]
    assert float(top_bp.norm()) < 1e-5  # the regime of METHODS 3's practical note
    assert cosine(top_local, top_bp) == pytest.approx(1.0, abs=1e-12)


# --- the authors' layout (METHODS 3) ---------------------------------------------


def _rand_b(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(d, d, generator=g, dtype=D) for _ in range(2))


def test_projected_negative_is_next_row_of_projected_batch():
    """Row i's negative: z_{i+1} scored with B of row i+1 (projected) or of row i (context-b)."""
    x = _batch(4, 3)  # 8 rows: view 1 = rows 0-3, view 2 = rows 4-7
    z, c = x, other_view(x)
    b1, b2 = _rand_b(3, 0)
    grp = [b1] * 4 + [b2] * 4
    u_pos, u_neg = scores(z, c, (b1, b2), "projected")
    pos_cb, neg_cb = scores(z, c, (b1, b2), "context-b")
    for i in range(8):
        j = (i + 1) % 8
        assert float(u_pos[i]) == pytest.approx(float(z[i] @ grp[i] @ c[i]), rel=1e-14)
        assert float(u_neg[i]) == pytest.approx(float(z[j] @ grp[j] @ c[i]), rel=1e-14)
        assert float(neg_cb[i]) == pytest.approx(float(z[j] @ grp[i] @ c[i]), rel=1e-14)
    assert torch.allclose(u_pos, pos_cb, rtol=1e-14, atol=0)
    # The two negatives differ exactly at the rows that wrap into the other half (3 -> 4, 7 -> 0).
    differs = [i for i in range(8) if not math.isclose(float(u_neg[i]), float(neg_cb[i]), rel_tol=1e-12)]
    assert differs == [3, 7]
    # Positives: row i pairs with row i + 4 (the patch below it).
    assert torch.equal(other_view(torch.arange(8.0)[:, None])[:, 0], torch.tensor([4.0, 5, 6, 7, 0, 1, 2, 3]))
    # Shared B: both negatives coincide.
    assert torch.allclose(scores(z, c, (b1,), "projected")[1], scores(z, c, (b1,), "context-b")[1],
                          rtol=1e-14, atol=0)


def test_l2_is_per_b_and_matches_authors_form():
    """lam is per B: the authors' b_decay 0.01 * (|B1|^2 + |B2|^2) / 2 is lam = AUTHORS_LAM = 0.005."""
    x = _batch(8, 6)
    z, c = x, other_view(x)
    b = _rand_b(6, 1)
    pen = float(fit_objective(z, c, b, lam=AUTHORS_LAM, negative="projected")
                - unified_loss(z, c, b, negative="projected"))
    sq = float((b[0] ** 2).sum() + (b[1] ** 2).sum())
    assert AUTHORS_LAM == 0.01 / 2
    assert pen == pytest.approx(0.01 * sq / 2, rel=1e-12)
    # The fitted B is stationary for the authors' objective written their way.
    bs = [t.clone().requires_grad_(True) for t in fit_b(z, c, lam=AUTHORS_LAM, negative="projected")]
    obj = unified_loss(z, c, bs, negative="projected") + 0.01 * (bs[0].pow(2).sum() + bs[1].pow(2).sum()) / 2
    grads = torch.autograd.grad(obj, bs)
    scale = max(float(t.detach().abs().max()) for t in bs)
    assert all(float(g.abs().max()) <= 1e-10 * max(1.0, scale) for g in grads)


@pytest.mark.parametrize("f", ["logistic", "type1", "linear"])
def test_newton_fit_projected_negative_is_stationary(f):
    """The projected negative couples B_1 and B_2 at the wrap rows (type-1: one term uses both)."""
    x = _batch()
    z = x @ init_weights([24, 20], "default", 1)[0].T
    c = other_view(z)
    bs = [b.clone().requires_grad_(True) for b in fit_b(z, c, f, lam=AUTHORS_LAM, negative="projected")]
    grads = torch.autograd.grad(fit_objective(z, c, bs, f, AUTHORS_LAM, "projected"), bs)
    scale = max(float(b.detach().abs().max()) for b in bs)
    assert all(float(g.abs().max()) <= 1e-10 * max(1.0, scale) for g in grads)
    # The wrap rows' negative terms move to the other B: the fit differs from the context-b one.
    other = fit_b(z, c, f, lam=AUTHORS_LAM, negative="context-b")
    assert not torch.allclose(bs[0].detach(), other[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("negative", NEGATIVES)
@pytest.mark.parametrize("f", ["logistic", "type1"])
def test_theorem31_exact_with_either_negative(f, negative):
    widths = [40] + [32] * 5
    x = _batch(16, 40)
    net = LinearNet(init_weights(widths, "orthogonal", 5))
    for e in compare_gradients(net, x, f=f, negative=negative, lam=AUTHORS_LAM).errors():
        assert e["cosine"] >= 1 - 1e-6, e
        assert e["max_rel_err"] <= 1e-4, e


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">I", 0x08 << 8 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_mnist_quadrant_batches_rows(tmp_path):
    """Batch = [TL x bs, TR x bs | BL x bs, BR x bs] of consecutive images: row i's positive is below it."""
    n, bs = 6, 3
    imgs = np.zeros((n, 28, 28), np.uint8)
    for k in range(n):  # quadrant q of image k holds the value 10 k + q + 1
        for q, (ys, xs) in enumerate([(slice(0, 14), slice(0, 14)), (slice(0, 14), slice(14, 28)),
                                      (slice(14, 28), slice(0, 14)), (slice(14, 28), slice(14, 28))]):
            imgs[k, ys, xs] = 10 * k + q + 1
    imgs[0, 0, 1] = 200  # row-major flattening of a patch
    _write_idx(tmp_path / "train-images-idx3-ubyte", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(n, np.uint8))
    batches = mnist_quadrant_batches(tmp_path, 2, bs, preprocess="scale")
    assert len(batches) == 2 and all(b.shape == (4 * bs, 196) for b in batches)
    for b, x in enumerate(batches):
        want = [10 * (b * bs + j) + q + 1 for q in range(4) for j in range(bs)]
        assert torch.equal(x[:, -1] * 255, torch.tensor(want, dtype=D))
        assert torch.equal(other_view(x)[:, -1], torch.cat([x[2 * bs:, -1], x[:2 * bs, -1]]))
    assert float(batches[0][0, 1]) * 255 == pytest.approx(200, abs=1e-12)
    norm = mnist_quadrant_batches(tmp_path, 1, bs)[0]
    assert torch.allclose(norm, (batches[0] - 0.1307) / 0.3081, rtol=1e-15, atol=1e-15)


def _module_order_weights(widths, init, seed):
    """The authors' construction order with torch modules and the global RNG (METHODS 3)."""
    nn = torch.nn
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        out = {}
        for name, loss_dims in (("layerwise", widths[1:]), ("bp", widths[-1:])):
            ws = [nn.Linear(a, b, bias=False).weight.data for a, b in zip(widths[:-1], widths[1:])]
            b1 = [nn.Linear(d, d, bias=False).weight.data for d in loss_dims]
            b2 = [nn.Linear(d, d, bias=False).weight.data for d in loss_dims]
            if init == "orthogonal":
                for w in ws:
                    nn.init.orthogonal_(w)
            out[name] = (ws, b1, b2)
        return out
    finally:
        torch.random.set_rng_state(state)


@pytest.mark.parametrize("init", ["default", "orthogonal"])
def test_authors_draw_replays_their_construction_order(init):
    widths = [10, 6, 6, 6]
    d = authors_draw(widths, init, seed=7)
    ref = _module_order_weights(widths, init, 7)
    eps32 = torch.finfo(torch.float32).eps
    for got, (ws, _, _) in ((d.layerwise, ref["layerwise"]), (d.bp, ref["bp"])):
        for a, b in zip(got, ws):
            assert a.dtype == D and a.shape == b.shape
            if init == "default":
                assert torch.equal(a, b.double())  # float32 draws, cast exactly
            else:
                # Same Gaussian, QR in float64 vs float32: a backward-stable QR is off by O(n eps32).
                assert float((a - b.double()).abs().max()) <= 100 * max(b.shape) * eps32
                assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=D), rtol=0, atol=1e-14)
    for (bb1, bb2), r1, r2 in zip(d.b_layerwise, *ref["layerwise"][1:]):
        assert torch.equal(bb1, r1.double().T) and torch.equal(bb2, r2.double().T)
    assert torch.equal(d.b_top[0], ref["bp"][1][0].double().T)
    assert not torch.equal(d.bp[0], d.layerwise[0])  # the analysed W are the BP model's, drawn second


def test_fit_b_authors_warm_start_and_optimality():
    x = _batch(8, 6)
    z = x @ init_weights([6, 5], "default", 2)[0].T
    c = other_view(z)
    init = tuple(0.1 * b[:5, :5] for b in _rand_b(6, 3))
    # No refit: the start, held in float32 as theirs.
    assert all(torch.equal(a, b.float().double()) for a, b in zip(fit_b_authors(z, c, init, refits=0), init))
    got = fit_b_authors(z, c, init)
    best = fit_b(z, c, lam=AUTHORS_LAM, negative="projected")
    obj = [float(fit_objective(z, c, b, lam=AUTHORS_LAM, negative="projected")) for b in (init, got, best)]
    assert got[0].dtype == D
    assert obj[1] < obj[0]  # L-BFGS improved on its start
    assert obj[2] <= obj[1] + 1e-15 * abs(obj[1]) * 64  # the exact fit is the minimum


def test_broken_authors_layout_defaults():
    kw = dict(seeds=1, n_batches=1, batch_size=4, width=12, depth=3, settings=("orthogonal", "default"))
    res = broken(**kw)
    cfg = res.config
    assert (cfg["layout"], cfg["lam"], cfg["negative"], cfg["draw"]) == ("authors", AUTHORS_LAM, "projected",
                                                                         "authors")
    assert cfg["pairs_per_batch"] == 8 and cfg["authors_seed"] == AUTHORS_SEED
    # Theorem 3.1 control holds in this layout; the BP model's weights are exactly orthogonal in float64.
    for key in ("cosine_mean", f"cosine_seed{AUTHORS_SEED}"):
        assert all(c >= 1 - 1e-9 for c in res.get("orthogonal", key))
        low = res.get("default", key)
        assert low[0] < 0.99 and low[-1] == pytest.approx(1.0, abs=1e-12)
    old = broken(layout="one-pair", **kw).config
    assert (old["lam"], old["negative"], old["draw"], old["pairs_per_batch"]) == (0.01, "context-b", "plain", 4)
    assert broken(lam=0.02, **kw).config["lam"] == 0.02  # single choices override the layout
    with pytest.raises(ValueError, match="layout"):
        broken(layout="nope", **kw)
    with pytest.raises(ValueError, match="negative"):
        broken(negative="nope", **kw)
    with pytest.raises(ValueError, match="seeds"):
        broken(**dict(kw, seeds=0), authors_seed=None)


def test_broken_lbfgs32_fit_runs_and_warm_starts():
    res = broken(seeds=[], n_batches=2, batch_size=4, width=8, depth=2, settings=("default",), fit="lbfgs32")
    assert "cosine_mean" not in res.metrics["default"]  # no seed list: the authors' seed only
    seed42 = res.get("default", f"cosine_seed{AUTHORS_SEED}")
    assert len(seed42) == 2 and seed42[-1] == pytest.approx(1.0, abs=1e-12)


# --- locality ----------------------------------------------------------------


def test_local_gradient_ignores_other_layers_losses():
    """W^l gets the gradient of L^l only: summing all local losses changes nothing, nor do other B's."""
    widths = [20, 16, 16, 12]
    ws = [w.requires_grad_(True) for w in init_weights(widths, "default", 0)]
    net = LinearNet(ws, relu=True)
    x = _batch(8, 20)
    ref = compare_gradients(net, x)
    # One backward through the sum of every layer's local loss (detach between layers).
    h, total = x, 0.0
    for l, w in enumerate(ws):
        z = net.layer(l, h.detach(), w)
        total = total + unified_loss(z, other_view(z.detach()), ref.b_local[l])
        h = z
    total.backward()
    for w, g in zip(ws, ref.local):
        assert torch.allclose(w.grad, g, rtol=0, atol=1e-15)
    # Other layers' B (here scaled by 5) do not enter W^1's gradient (layer index 1).
    ws2 = [w.detach().clone().requires_grad_(True) for w in ws]
    hs = [x]
    for l in range(len(ws2)):
        hs.append(net.layer(l, hs[-1], ws2[l]).detach())
    total = 0.0
    for l, w in enumerate(ws2):
        z = net.layer(l, hs[l], w)
        b = ref.b_local[l] if l == 1 else tuple(5.0 * bi for bi in ref.b_local[l])
        total = total + unified_loss(z, other_view(z.detach()), b)
    total.backward()
    assert torch.allclose(ws2[1].grad, ref.local[1], rtol=0, atol=1e-15)
    assert not torch.allclose(ws2[0].grad, ref.local[0], rtol=0, atol=1e-15)  # its own B does


def test_local_gradient_is_the_three_factor_rule():
    """METHODS 2: dW_ji = mean over terms of gamma * (B c)_j * relu'(a_j) * x_i with gamma = -f'(u)."""
    x = _batch(8, 12)
    w = init_weights([12, 10], "default", 4)[0]
    net = LinearNet([w], relu=True)
    cmp = compare_gradients(net, x)
    b = cmp.b_local[0]
    a = x @ w.T
    z = F.relu(a)
    c = other_view(z)
    n = len(x)
    bc = torch.cat([c[: n // 2] @ b[0].T, c[n // 2:] @ b[1].T])
    u_pos, u_neg = (z * bc).sum(1), (z.roll(-1, 0) * bc).sum(1)
    g = -torch.sigmoid(1 - u_pos)[:, None] * bc / n  # positive term, at sample i
    g = g + (torch.sigmoid(1 + u_neg)[:, None] * bc / n).roll(1, 0)  # negative term lands on sample i+1
    dw = (g * (a > 0).to(D)).T @ x
    assert torch.allclose(cmp.local[0], dw, rtol=1e-12, atol=1e-15)


def test_all_loss_functions_run():
    x = _batch(8, 12)
    net = LinearNet(init_weights([12, 12, 12], "orthogonal", 0))
    for f in LOSS_FUNCTIONS:
        errs = compare_gradients(net, x, f=f).errors()
        assert errs[-1]["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert all(math.isfinite(e["cosine"]) for e in errs)


# --- direct feedback -------------------------------------------------------------


def test_dfb_no_worse_than_same_layer_context():
    res = dfb(seeds=2, n_batches=2, widths=[40, 36, 32, 28, 24, 20])
    same, dfbe = res.get("same-layer", "rel_frob_err"), res.get("dfb", "rel_frob_err")
    for l, (s, d) in enumerate(zip(same, dfbe)):
        assert d <= s + 1e-12, (l, s, d)
    assert same[0] > 0.1  # exact equality does fail with decreasing widths
    assert same[-1] == pytest.approx(0.0, abs=1e-12) and dfbe[-1] == pytest.approx(0.0, abs=1e-12)


# --- Proposition 3.5 -----------------------------------------------------------


def test_orthogonal_conv_kernel_is_orthogonal():
    shape = (4, 5, 5)
    w = orthogonal_conv_kernel(4, generator=torch.Generator().manual_seed(1))
    m = unrolled_operator(ConvNet([w]), 0, shape)
    assert torch.allclose(m.T @ m, torch.eye(m.shape[0], dtype=D), atol=1e-12)
    assert (w[:, :, 0, 0].abs().sum() > 0) and (w[:, :, 2, 2].abs().sum() > 0)  # a genuine 3x3 kernel
    mz = unrolled_operator(ConvNet([w], padding="zeros"), 0, shape)
    assert not torch.allclose(mz.T @ mz, torch.eye(m.shape[0], dtype=D), atol=1e-3)


def test_prop35_kernel1_exact_global_pooling_not():
    res = conv(seeds=1, n_batches=1, batch_size=8, size=5)
    assert all(c >= 1 - 1e-9 for c in res.get("kernel1", "cosine_mean"))
    assert all(e <= 1e-4 for e in res.get("kernel1", "max_rel_err"))
    assert all(c < 0.99 for c in res.get("global", "cosine_mean"))
    assert res.config["max|M'M-I| (circular)"] < 1e-12


# --- MNIST patches and the CLI ------------------------------------------------------


def test_mnist_patch_views():
    if not MNIST_DIR.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"MNIST not found at {MNIST_DIR}")
        pytest.skip(f"MNIST not found at {MNIST_DIR}")
    from localssl.data.mnist import load_mnist
    from localssl.theory import mnist_patch_views

    imgs, _ = load_mnist(MNIST_DIR, "train")
    v1, v2 = mnist_patch_views(MNIST_DIR, 4, preprocess="scale")
    assert v1.shape == v2.shape == (4, 196)
    assert torch.allclose(v1[0], torch.from_numpy(imgs[0, :14, :14].reshape(-1) / 255.0))  # left column
    assert torch.allclose(v2[1], torch.from_numpy(imgs[1, 14:, 14:].reshape(-1) / 255.0))  # right column


def test_cli_json_and_files(tmp_path, capsys):
    from localssl.theory.linear import add_theory_parser as hook  # where localssl.cli imports it from

    parser = argparse.ArgumentParser(prog="localssl")
    hook(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["theory", "conv", "--seeds", "1", "--batches", "1", "--json", "--out",
                              str(tmp_path)])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["conv"]["metrics"]["kernel1"]["cosine_mean"][0] == pytest.approx(1.0, abs=1e-9)
    assert (tmp_path / "conv.json").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "conv.png").stat().st_size > 0
    bad = parser.parse_args(["theory", "conv", "--seeds", "1", "--f", "hinge", "--batches", "1",
                             "--mnist-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--no-plot"])
    assert bad.func(bad) == 0  # conv ignores --mnist-dir (always synthetic)
    with pytest.raises(ValueError, match="unknown option"):
        run_theory("conv", seeds=1, n_batchs=1, verbose=False)  # a typo is an error, not ignored


def test_cli_layout_and_lam_reach_broken(tmp_path, capsys):
    from localssl.theory.cli import add_theory_parser

    parser = argparse.ArgumentParser(prog="localssl")
    sub = add_theory_parser(parser.add_subparsers(dest="command"))
    assert "--layout {authors,one-pair}" in sub.format_help()  # documented in --help
    args = parser.parse_args(["theory", "broken", "--layout", "one-pair", "--lam", "0.02", "--seeds", "1",
                              "--batches", "1", "--json", "--no-plot", "--out", str(tmp_path)])
    assert args.func(args) == 0
    cfg = json.loads(capsys.readouterr().out)["broken"]["config"]
    assert (cfg["layout"], cfg["lam"], cfg["negative"], cfg["pairs_per_batch"]) == ("one-pair", 0.02, "context-b", 32)


def test_ablation_rows_change_one_choice():
    from localssl.theory import broken_ablation

    kw = dict(seeds=1, n_batches=1, settings=("default",))
    res = broken_ablation(variants=("authors", "lam=0.01"), lbfgs32=False, **kw)
    ref = broken(**kw)
    assert res.get("default authors", "cosine_mean") == ref.get("default", "cosine_mean")
    assert res.get("default lam=0.01", "cosine_mean") == broken(lam=0.01, **kw).get("default", "cosine_mean")
    assert res.config["variants"] == {"authors": {}, "lam=0.01": {"lam": 0.01}}
    with pytest.raises(ValueError, match="variant"):
        broken_ablation(variants=("nope",), **kw)
