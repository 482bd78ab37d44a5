"""What a rank limit on B does to Theorem 3.1 (METHODS 3; issue 14's low-rank B, ``b_rank``).

Theorem 3.1 needs every B^l at the optimum of its own local loss. With B
limited to rank r (B = U V^T, CLAPP++'s ``b_rank``), the local optimum is
the optimum over the rank-<= r matrices. What the theory then says, in the
theorem's setting (orthogonal W, equal widths, linear network):

1. **BP with the same rank limit at the top: still exact, at every r.** With
   M = W^L ... W^{l+1} orthogonal, B -> M' B M maps the set of rank-<= r
   matrices onto itself and preserves |B|_F (so the L2 penalty), so it maps a
   rank-r top optimum onto a rank-r local optimum, and the local gradient is
   BP's element by element (where the rank-r optimum is unique: for the
   linear f, where the r-th and (r+1)-th singular values of the dense
   optimum differ).
2. **BP with a dense top B (the real BP baseline): exact iff r >= rank of
   the dense optimum B^l*.** Below, for the linear f (u_neg - u_pos, L2 lam
   per B) with one shared B, there is a closed form. The fit objective is
   <G, B> + lam |B|^2 = lam |B - B*|^2 + const, so the rank-r optimum is the
   truncated SVD of B* (Eckart-Young). Its local gradient is dW^l = B P with
   P = (1/N) sum_i c_i (x_{i+1} - x_i)^T and B* = -W^l P' / (2 lam); for an
   orthogonal (square) W^l, P = -2 lam B*' W^l, so dW^l(B) = -2 lam B B*' W^l
   and, with s_k the singular values of B*,

       cos(local rank-r dW^l, BP dW^l) = sqrt(sum_{k<=r} s_k^4 / sum_k s_k^4),

   the share of B*'s fourth-power spectrum in its top r directions (the
   spectrum is the same at every layer: B^l* = M' B^L* M). For the other f
   no closed form is known; the experiment fits the rank-r B by L-BFGS on
   its factors ("measured") and reports the cosine alone.

``rank`` (``localssl theory rank``) reports per layer, for each r: the
measured cosine against dense BP, the closed form (linear f, shared B), and
the cosine against BP with the same rank limit at the top (1 by point 1).
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import DEFAULT_LAM, DTYPE, _one_thread, _seed_list
from .fit import _lbfgs, fit_b
from .loss import fit_objective, other_view
from .network import LinearNet, compare_gradients, init_weights
from .report import TheoryResult
from .views import _batches, make_views

__all__ = ["fit_b_rank", "rank", "rank_cosine_closed_form", "truncate"]


def truncate(b: Tensor, r: int) -> Tensor:
    """The best rank-``r`` approximation of ``b`` in Frobenius norm (truncated SVD, Eckart-Young)."""
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def fit_b_rank(z: Tensor, c: Tensor, f: str, r: int, *, lam: float = DEFAULT_LAM, shared: bool = True,
               negative: str = "context-b", method: str = "closed", seed: int = 0,
               max_iter: int = 2000) -> tuple[Tensor, ...]:
    """B at the optimum of the local fit objective over matrices of rank <= ``r`` (one per view unless shared).

    ``method="closed"``: the truncated SVD of the dense optimum, which is the
    rank-r optimum for the linear f (see the module docstring; refused for
    another f, where it is only a start). ``"lbfgs"``: L-BFGS on the factors
    U (d x r), V' (r x d') of every B, from the truncation for a non-linear f
    and from a small random init for the linear f (so that a test can check
    the closed form against an independent fit).
    """
    dense = fit_b(z, c, f, lam=lam, shared=shared, negative=negative)
    if r >= min(dense[0].shape):
        return dense
    if method == "closed":
        if f != "linear":
            raise ValueError(f"the truncated SVD is the rank-r optimum for f=linear only, got f={f!r}: "
                             "use method='lbfgs'")
        return tuple(truncate(b, r) for b in dense)
    if method != "lbfgs":
        raise ValueError(f"unknown rank fit {method!r}; valid: closed, lbfgs")
    g = torch.Generator().manual_seed(int(seed))
    init: list[Tensor] = []
    for b in dense:
        if f == "linear":
            init += [0.1 * torch.randn(b.shape[0], r, generator=g, dtype=DTYPE),
                     0.1 * torch.randn(r, b.shape[1], generator=g, dtype=DTYPE)]
        else:
            uu, s, vh = torch.linalg.svd(b, full_matrices=False)
            init += [uu[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]]
    zd, cd = z.detach().to(DTYPE), c.detach().to(DTYPE)

    def objective(fs: list[Tensor]) -> Tensor:
        return fit_objective(zd, cd, [fs[2 * k] @ fs[2 * k + 1] for k in range(len(fs) // 2)], f, lam, negative)

    fs = _lbfgs(objective, init, lr=1.0, max_iter=max_iter, tolerance_grad=1e-14, tolerance_change=1e-18,
                history_size=100)
    return tuple(fs[2 * k] @ fs[2 * k + 1] for k in range(len(fs) // 2))


def rank_cosine_closed_form(b_dense: Tensor, r: int) -> float:
    """sqrt(sum_{k<=r} s_k^4 / sum_k s_k^4): the predicted cosine of a rank-r local gradient with dense BP's
    (linear f, one shared B, orthogonal square W; the module docstring derives it)."""
    s4 = torch.linalg.svdvals(b_dense).pow(4)
    return float((s4[:r].sum() / s4.sum()).sqrt())


@_one_thread
def rank(*, f: str = "linear", seeds: int | Sequence[int] = 2, mnist_dir: str | Path | None = None,
         ranks: Sequence[int] | None = None, n_batches: int = 2, batch_size: int = 32, width: int = 32,
         depth: int = 4, lam: float = DEFAULT_LAM, shared_b: bool = True, preprocess: str = "normalize",
         columns: str = "alternate", fit: str = "auto") -> TheoryResult:
    """Theorem 3.1 with B limited to rank r: local vs BP gradient cosine per layer, for each r in ``ranks``.

    Orthogonal W, equal widths (synthetic ``width``-d views; MNIST patches with
    ``mnist_dir``, W^1 then rectangular and the closed form only approximate
    at layer 1). ``fit``: ``"auto"`` or ``"newton"`` (closed form for the
    linear f, L-BFGS on the factors otherwise), ``"closed"`` or ``"lbfgs"``. Settings, one per r:
    ``r=<r>`` with metrics ``cos_vs_dense_bp`` (measured), ``closed_form``
    (linear f with a shared B: sqrt(sum_{k<=r} s_k^4 / sum s^4)) and
    ``cos_vs_rank_r_bp`` (BP's top B limited to the same rank: 1 by the
    theory). Mean over batches and seeds.
    """
    t0 = time.perf_counter()
    in_dim = 196 if mnist_dir is not None else width
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_batches * batch_size, dim=in_dim,
                              preprocess=preprocess, columns=columns)
    widths = [in_dim] + [width] * depth
    ranks = sorted(set(ranks or [1, 2, 4, 8, width // 2, width]))
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {list(ranks)}")
    # "newton" (the other experiments' exact fit, `localssl theory --fit`) means: exact where it can be.
    method = ("closed" if f == "linear" else "lbfgs") if fit in ("auto", "newton") else fit
    seed_list = _seed_list(seeds)
    res = TheoryResult("rank", primary="cos_vs_dense_bp",
                       config=dict(f=f, seeds=seed_list, n_batches=n_batches, batch_size=batch_size, widths=widths,
                                   init="orthogonal", lam=lam, shared_b=shared_b, ranks=ranks, fit=method, data=data))
    for r in ranks:
        acc: dict[str, list[list[float]]] = {"dense": [], "closed": [], "same": []}
        for seed in seed_list:
            net = LinearNet(init_weights(widths, "orthogonal", seed))
            for x in _batches(v1, v2, batch_size):
                def low(key, z, c, r=r):
                    return fit_b_rank(z, c, f, r, lam=lam, shared=shared_b, method=method)

                def dense_top(key, z, c):
                    return fit_b(z, c, f, lam=lam, shared=shared_b) if key == "top" else low(key, z, c)

                # The top layer's local loss is the global one (compare_gradients): with a dense top B it is
                # exact by construction, so layers 1..L-1 carry the rank limit's effect.
                cmp_dense = compare_gradients(net, x, f=f, lam=lam, shared_b=shared_b, fitter=dense_top)
                cmp_same = compare_gradients(net, x, f=f, lam=lam, shared_b=shared_b, fitter=low)
                acc["dense"].append([e["cosine"] for e in cmp_dense.errors()])
                acc["same"].append([e["cosine"] for e in cmp_same.errors()])
                if f == "linear" and shared_b:
                    full = [fit_b(z, other_view(z), f, lam=lam, shared=True)[0]
                            for z in cmp_dense.reps]
                    acc["closed"].append([rank_cosine_closed_form(b, r) for b in full[:-1]] + [1.0])
        res.add(f"r={r}", "cos_vs_dense_bp", np.mean(acc["dense"], 0))
        if acc["closed"]:
            res.add(f"r={r}", "closed_form", np.mean(acc["closed"], 0))
        res.add(f"r={r}", "cos_vs_rank_r_bp", np.mean(acc["same"], 0))
    res.notes.append("B limited to rank r at every local loss; cos_vs_dense_bp: BP's top B dense (the top layer is "
                     "then the global loss itself, cosine 1); cos_vs_rank_r_bp: BP's top B limited to rank r too "
                     "(Theorem 3.1 extends: 1 at every r). closed_form (linear f, shared B): "
                     "sqrt(sum_{k<=r} s_k^4 / sum_k s_k^4), s the dense optimum's singular values.")
    res.runtime_s = time.perf_counter() - t0
    return res
