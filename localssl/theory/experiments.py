"""The linear-network experiments theorem31, dfb and projection (METHODS 3).

``theorem31``: orthogonal W, equal widths -> local dW^l == BP dW^l;
``dfb``: decreasing widths, same-layer context vs direct feedback;
``projection``: cosine between the fitted B^l and M' B^L M. (``broken``
and ``ablation`` are in :mod:`.broken_assumptions`.)
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import DEFAULT_LAM, DTYPE, _one_thread, _seed_list, _summ
from .metrics import cosine
from .network import GradientComparison, LinearNet, compare_gradients, init_weights
from .report import TheoryResult
from .views import _batches, make_views

__all__ = ["dfb", "projection", "theorem31"]


@_one_thread
def _views_and_widths(mnist_dir, width, in_dim, depth, n_samples, preprocess, columns):
    """The two views and the layer widths of a deep linear network experiment.

    Defaults: MNIST (14 x 14 = 196 inputs, width 128), else synthetic data
    with the input as wide as the layers (64).
    """
    if mnist_dir is not None:
        width, in_dim = width or 128, in_dim or 196
    else:
        width = width or 64
        in_dim = in_dim or width
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_samples, dim=in_dim, preprocess=preprocess,
                              columns=columns)
    return v1, v2, data, [in_dim] + [width] * depth


def theorem31(*, f: str = "logistic", seeds: int | Sequence[int] = 2, mnist_dir: str | Path | None = None,
              n_batches: int = 4, batch_size: int = 32, width: int | None = None, depth: int = 6,
              in_dim: int | None = None, lam: float = DEFAULT_LAM, shared_b: bool = False,
              lbfgs_batches: int = 1, preprocess: str = "normalize",
              columns: str = "alternate") -> TheoryResult:
    """Theorem 3.1: equal widths, orthogonal W, every B at its optimum -> local dW^l == BP dW^l.

    Default: synthetic 64-d views, 64 x 6; with ``mnist_dir`` the authors'
    196 -> 128 x 6 on MNIST patches. W^1 may be rectangular (semi-orthogonal):
    the theorem only needs M = W^L...W^{l+1} orthogonal. Reports per layer
    the cosine (mean and min over batches and seeds), the max element-wise
    relative error and the max error over max |BP|, for the exact (Newton)
    fit of B, and for the authors' L-BFGS fit on ``lbfgs_batches`` batches of
    the first seed (0 to skip).
    """
    t0 = time.perf_counter()
    v1, v2, data, widths = _views_and_widths(mnist_dir, width, in_dim, depth, n_batches * batch_size, preprocess,
                                             columns)
    res = TheoryResult("theorem31", primary="cosine_mean",
                       config=dict(f=f, seeds=_seed_list(seeds), n_batches=n_batches, batch_size=batch_size,
                                   widths=widths, init="orthogonal", lam=lam, shared_b=shared_b, data=data))
    for fit in ("newton", "lbfgs"):
        errs: list[list[dict]] = []
        for si, seed in enumerate(_seed_list(seeds)):
            if fit == "lbfgs" and (si > 0 or lbfgs_batches <= 0):
                break
            net = LinearNet(init_weights(widths, "orthogonal", seed))
            for bi, x in enumerate(_batches(v1, v2, batch_size)):
                if fit == "lbfgs" and bi >= lbfgs_batches:
                    break
                errs.append(compare_gradients(net, x, f=f, lam=lam, fit=fit, shared_b=shared_b).errors())
        if not errs:
            continue
        cos = np.array([[e["cosine"] for e in row] for row in errs])
        res.add(fit, "cosine_mean", cos.mean(0))
        res.add(fit, "cosine_min", cos.min(0))
        res.add(fit, "1-cos_max", (1 - cos).max(0))
        res.add(fit, "max_rel_err", np.array([[e["max_rel_err"] for e in row] for row in errs]).max(0))
        res.add(fit, "max_err/max", np.array([[e["max_err_over_max"] for e in row] for row in errs]).max(0))
        res.config[f"{fit}_gradients_compared"] = len(errs)
    res.notes.append("B fitted per layer and per view (separate B_1, B_2) with L2 penalty lam*|B|^2; "
                     "'newton' = exact representer-space Newton solve, 'lbfgs' = the authors' L-BFGS "
                     "(lr 0.2, strong Wolfe, <= 1000 iterations).")
    res.runtime_s = time.perf_counter() - t0
    return res


@_one_thread
def dfb(*, f: str = "logistic", seeds: int | Sequence[int] = 5, mnist_dir: str | Path | None = None,
        n_batches: int = 4, batch_size: int = 32, widths: Sequence[int] | None = None,
        lam: float = DEFAULT_LAM, shared_b: bool = False, preprocess: str = "normalize",
        columns: str = "alternate", fit: str = "newton") -> TheoryResult:
    """Direct feedback (METHODS 3): decreasing widths, semi-orthogonal W, linear network.

    Exact equality fails; compares the same-layer context (B^l: layer ->
    layer) with DFB (context = the other view's *top* representation, B^l:
    top -> layer). Per layer: relative Frobenius error |local - BP|_F / |BP|_F
    and cosine, mean over batches and seeds, plus the fraction of (seed,
    batch) pairs where DFB's Frobenius error is <= same-layer's, and the
    cosine between the fitted DFB B^l and M' B^L (M = W^L ... W^{l+1}).
    """
    t0 = time.perf_counter()
    if widths is None:
        widths = [196, 160, 128, 96, 64, 48, 32] if mnist_dir is not None else [64, 56, 48, 40, 32, 24, 16]
    widths = list(widths)
    if any(b > a for a, b in zip(widths[1:-1], widths[2:])):
        raise ValueError(f"dfb needs non-increasing hidden widths, got {widths}")
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_batches * batch_size, dim=widths[0],
                              preprocess=preprocess, columns=columns)
    seed_list = _seed_list(seeds)
    res = TheoryResult("dfb", primary="rel_frob_err",
                       config=dict(f=f, seeds=seed_list, n_batches=n_batches, batch_size=batch_size,
                                   widths=widths, init="orthogonal (semi-orthogonal, orthonormal rows)",
                                   lam=lam, shared_b=shared_b, fit=fit, data=data))
    acc = {k: [] for k in ("same_f", "dfb_f", "same_c", "dfb_c", "proj")}
    for seed in seed_list:
        net = LinearNet(init_weights(widths, "orthogonal", seed))
        for x in _batches(v1, v2, batch_size):
            cs = compare_gradients(net, x, f=f, context="same", lam=lam, fit=fit, shared_b=shared_b)
            cd = compare_gradients(net, x, f=f, context="dfb", lam=lam, fit=fit, shared_b=shared_b)
            es, ed = cs.errors(), cd.errors()
            acc["same_f"].append([e["rel_frob_err"] for e in es])
            acc["dfb_f"].append([e["rel_frob_err"] for e in ed])
            acc["same_c"].append([e["cosine"] for e in es])
            acc["dfb_c"].append([e["cosine"] for e in ed])
            acc["proj"].append(_dfb_projection(net.weights, cd))
    a = {k: np.array(v) for k, v in acc.items()}
    res.add("same-layer", "rel_frob_err", a["same_f"].mean(0))
    res.add("dfb", "rel_frob_err", a["dfb_f"].mean(0))
    res.add("same-layer", "cosine", a["same_c"].mean(0))
    res.add("dfb", "cosine", a["dfb_c"].mean(0))
    # Small slack for float64 rounding at the top layer, where both errors are ~0.
    res.add("dfb", "frac_dfb<=same", (a["dfb_f"] <= a["same_f"] * (1 + 1e-9) + 1e-12).mean(0))
    res.add("dfb", "cos(B^l,M'B^L)", a["proj"].mean(0))
    res.notes.append("BP reference: the same loss at the top (same-layer context = top context there).")
    res.runtime_s = time.perf_counter() - t0
    return res


def _top_products(weights: Sequence[Tensor]) -> list[Tensor]:
    """M_l = W^L ... W^{l+1} for l = 1..L (M_L = I)."""
    mats = [torch.eye(weights[-1].shape[0], dtype=DTYPE)]
    for w in reversed(weights[1:]):
        mats.append(mats[-1] @ w.detach())
    return mats[::-1]


def _dfb_projection(weights: Sequence[Tensor], cmp: GradientComparison) -> list[float]:
    ms = _top_products(weights)
    return [float(np.mean([cosine(bl, m.T @ bt) for bl, bt in zip(b, cmp.b_top)]))
            for m, b in zip(ms, cmp.b_local)]


@_one_thread
def projection(*, f: str = "logistic", seeds: int | Sequence[int] = 5, mnist_dir: str | Path | None = None,
               n_batches: int = 4, batch_size: int = 32, width: int | None = None, depth: int = 6,
               in_dim: int | None = None, lam: float = DEFAULT_LAM, shared_b: bool = False,
               preprocess: str = "normalize", columns: str = "alternate",
               fit: str = "newton") -> TheoryResult:
    """Projection alignment (METHODS 3): cosine between the fitted B^l and M' B^L M, linear nets.

    1 at every layer for orthogonal W (Theorem 3.1's mechanism), below 1 for
    the default init. Mean over batches, then mean and std over seeds; the
    two view-B's are averaged.
    """
    t0 = time.perf_counter()
    v1, v2, data, widths = _views_and_widths(mnist_dir, width, in_dim, depth, n_batches * batch_size, preprocess,
                                             columns)
    seed_list = _seed_list(seeds)
    res = TheoryResult("projection", primary="cos(B^l,M'B^LM)_mean",
                       config=dict(f=f, seeds=seed_list, n_batches=n_batches, batch_size=batch_size,
                                   widths=widths, lam=lam, shared_b=shared_b, fit=fit, data=data))
    for init in ("orthogonal", "default"):
        per_seed = []
        for seed in seed_list:
            net = LinearNet(init_weights(widths, init, seed))
            ms = _top_products(net.weights)
            rows = []
            for x in _batches(v1, v2, batch_size):
                cmp = compare_gradients(net, x, f=f, lam=lam, fit=fit, shared_b=shared_b)
                rows.append([float(np.mean([cosine(bl, m.T @ bt @ m) for bl, bt in zip(b, cmp.b_top)]))
                             for m, b in zip(ms, cmp.b_local)])
            per_seed.append(np.mean(rows, 0))
        m, s = _summ(per_seed)
        res.add(init, "cos(B^l,M'B^LM)_mean", m)
        res.add(init, "cos(B^l,M'B^LM)_std_seeds", s)
    res.runtime_s = time.perf_counter() - t0
    return res
