"""Deep linear networks: when does a local rule compute the BP gradient? (METHODS 3)

Everything here runs in float64 on the CPU (the exceptions are named below).

Setting (METHODS 2 and 3). A batch holds 2B views: view 1 of B samples
stacked on view 2 of the same samples. Layer l computes
``h^l = act(W^l h^{l-1})`` with no bias (``act`` = identity, or ReLU where an
experiment says so). Its *local* loss is the unified loss of METHODS 2:

- ``z^l`` = readout of ``h^l`` (identity for MLPs; pooling + flatten for CNNs),
  gradient flows into W^l only (the layer input is detached);
- context ``c_i`` = the other view of sample i, *detached*: ``z^l`` of the other
  view (same-layer context, CLAPP++) or ``z^L`` of the other view (direct
  feedback, DFB);
- ``u_pos_i = z_i . (B_{g(i)} c_i)``, ``g(i)`` the view of sample i (below);
- the negative of sample i is the next row of the stacked batch, ``z_{i+1}``
  (indices mod 2B), scored against the same context ``c_i``. Which B scores
  it is a choice (``negative``):
  ``"projected"`` (the authors', METHODS 3): the next row of the *projected*
  batch, ``u_neg_i = (B_{g(i+1)}' z_{i+1}) . c_i``, so the last row of each
  half is scored with the other view's B;
  ``"context-b"`` (our earlier choice): ``u_neg_i = z_{i+1} . (B_{g(i)} c_i)``.
  The two differ only at the two rows where the batch wraps between halves;
- loss ``L = mean_i l(u_pos_i, u_neg_i)`` with ``f`` one of
  logistic ``softplus(1-u_pos) + softplus(1+u_neg)``,
  hinge ``relu(1-u_pos) + relu(1+u_neg)``,
  linear ``u_neg - u_pos``, type-1 ``softplus(u_neg - u_pos)``.

Like the authors (METHODS 3) we use *separate* B for the two views by
default: samples of view 1 (contexts from view 2) use ``B_1``, samples of
view 2 use ``B_2`` (``shared_b=True`` uses one B for both). Each B is fitted
to the optimum of ``L + lam * sum_g |B_g|_F^2`` for fixed W (``lam`` per B:
the authors' ``0.01 * (|B_1|^2 + |B_2|^2) / 2`` is lam = 0.005).

The global (BP) loss is the same loss at the top layer only, with its own
fitted ``B^L``, back-propagated to every W^l. The local gradient of W^l is
the gradient of L^l with respect to W^l alone.

Theorem 3.1: with M = W^L ... W^{l+1}, the top score is
``z^l' (M' B^L M) c^l``, so BP equals the local rule with B^l = M' B^L M. If
M is orthogonal, B -> M' B M is a bijection that preserves the Frobenius
norm (so the L2 penalty too), hence it maps the (unique, strictly convex)
top optimum onto the local optimum: local gradient == BP gradient.

Fitting B exactly (``fit="newton"``, the default). Every loss term is
``phi(a_k + s_k t_k)`` with ``t_k = <B, A_k>`` (B = all the B_g stacked,
A_k = sum of rank-1 atoms ``w p q'`` placed in the block of the B they use:
p a layer representation, q a context). By the representer theorem the
optimum lies in the span of the A_k: ``B = sum_k beta_k A_k``, so
``t = K beta`` with the Gram matrix ``K_km = <A_k, A_m>`` (atoms in
different B's are orthogonal; for one atom per term
``K_km = [g_k = g_m] (p_k . p_m)(q_k . q_m)``) and ``|B|^2 = beta' K beta``.
Terms that share no B are independent problems and are solved apart.
Stationarity in B reads ``F(beta) = s * phi'(a + s K beta) / N + 2 lam beta
= 0``, an n-dimensional system (n = number of terms, 2B per view group for
the logistic loss) that damped Newton solves to machine precision in a few
steps, whatever the layer width. It is the Newton step in B space (push-
through identity), so the primal objective decreases monotonically. For
the linear f the solution is closed-form; for the hinge (not smooth) we
solve the SVM dual by coordinate descent and polish on the active set.
Under Theorem 3.1's assumptions K is the same at layer l and at the top,
so the local and top problems are the same n-dimensional problem.

``fit="lbfgs"``: torch L-BFGS on B itself (the authors' lr 0.2,
strong-Wolfe line search, up to 1000 iterations) in float64 from B = 0 with
tight tolerances: the same optimum, less precisely. ``fit="lbfgs32"`` (only
in :func:`broken`) is the authors' procedure as run: float32, torch's
default tolerances, warm-started from their initial B (and then from the
previous batch), refitted 3 times per batch.

The authors' broken-assumption experiment (``broken(layout="authors")``,
read in their theory/ scripts, METHODS 3) analyses *untrained* weights: the
end-to-end (BP) model's encoder is frozen at its initialisation, and its
"3 epochs" per batch are 3 warm-started L-BFGS refits of B, W unchanged. Its
W are drawn from one torch RNG seeded with 42 *after* the layerwise model's
W and B (:func:`authors_draw` replays that order). Everything there is
float32; here only the draws (then cast exactly to float64) and
``fit="lbfgs32"`` are.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import cosine, grad_errors
from .report import TheoryResult

__all__ = [
    "AUTHORS_FIGURES",
    "AUTHORS_LAM",
    "AUTHORS_SEED",
    "BROKEN_LAYOUTS",
    "LOSS_FUNCTIONS",
    "NEGATIVES",
    "AuthorsDraw",
    "GradientComparison",
    "LinearNet",
    "add_theory_parser",
    "authors_draw",
    "broken",
    "broken_ablation",
    "compare_gradients",
    "dfb",
    "fit_b",
    "fit_b_authors",
    "fit_objective",
    "init_weights",
    "make_views",
    "mnist_patch_views",
    "mnist_quadrant_batches",
    "other_view",
    "projection",
    "scores",
    "single_thread",
    "synthetic_views",
    "theorem31",
    "theory_main",
    "unified_loss",
]

DTYPE = torch.float64
LOSS_FUNCTIONS = ("logistic", "hinge", "linear", "type1")
DEFAULT_LAM = 0.01
#: The authors' L2 on B: ``b_decay * (|B_1|^2 + |B_2|^2) / 2`` with b_decay 0.01, i.e. 0.005 per B (METHODS 3).
AUTHORS_LAM = 0.005
#: The authors' single run: torch.manual_seed(42) before the models are built (METHODS 3).
AUTHORS_SEED = 42

#: The authors' single-run figures (METHODS 3): MNIST patches, 196 -> 128 x 6,
#: logistic f, mean cosine(local dW^l, BP dW^l) over 32 batches, layers 1..6.
AUTHORS_FIGURES: dict[str, list[float]] = {
    "default": [0.250, 0.313, 0.403, 0.552, 0.711, 1.000],
    "relu-orthogonal": [0.198, 0.373, 0.506, 0.607, 0.670, 1.000],
}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, then restore the previous setting.

    Every tensor here is tiny (64 x 64 matmuls, 64-d solves): threading buys
    nothing, and on a shared, busy CPU the OpenMP threads of such small ops
    wait on each other, which measured 20x slower (16.6 s vs 0.7 s for one
    seed of ``broken`` with 2 threads on 2 loaded cores).
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _one_thread(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with single_thread():
            return fn(*args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------
# The unified local loss (METHODS 2)
# ---------------------------------------------------------------------------

#: Which B scores the negative of sample i (see the module docstring).
NEGATIVES = ("projected", "context-b")


def other_view(h: Tensor) -> Tensor:
    """Row i -> row (i + B) mod 2B of a stacked (view 1; view 2) batch: the positive partner."""
    n = h.shape[0]
    if n % 2:
        raise ValueError(f"a stacked batch has an even number of rows, got {n}")
    return h.roll(n // 2, 0)


def _row_groups(n: int, shared: bool) -> Tensor:
    """B index of every row: 0 (shared B), or 0 for view 1 and 1 for view 2 (separate B, the authors')."""
    g = torch.zeros(n, dtype=torch.long)
    if not shared:
        g[n // 2:] = 1
    return g


def _check_b(b: Sequence[Tensor]) -> None:
    if len(b) not in (1, 2):
        raise ValueError(f"expected 1 (shared) or 2 (per view) B matrices, got {len(b)}")


def _context_map(c: Tensor, b: Sequence[Tensor]) -> Tensor:
    """Row i = B_{g(i)} c_i, with g(i) the group of sample i (B maps context space to layer space)."""
    _check_b(b)
    if len(b) == 1:
        return c @ b[0].T
    h = c.shape[0] // 2
    return torch.cat([c[:h] @ b[0].T, c[h:] @ b[1].T], 0)


def _project(z: Tensor, b: Sequence[Tensor]) -> Tensor:
    """Row j = B_{g(j)}' z_j: the projected batch (the authors' ``proj(z)``, METHODS 3)."""
    _check_b(b)
    if len(b) == 1:
        return z @ b[0]
    h = z.shape[0] // 2
    return torch.cat([z[:h] @ b[0], z[h:] @ b[1]], 0)


def _check_negative(negative: str) -> None:
    if negative not in NEGATIVES:
        raise ValueError(f"unknown negative {negative!r}; valid: {', '.join(NEGATIVES)}")


def scores(z: Tensor, c: Tensor, b: Sequence[Tensor], negative: str = "context-b") -> tuple[Tensor, Tensor]:
    """``(u_pos, u_neg)`` per row of a stacked batch (the module docstring defines both negatives)."""
    _check_negative(negative)
    if negative == "projected":
        zb = _project(z, b)
        return (zb * c).sum(1), (zb.roll(-1, 0) * c).sum(1)  # row i of u_neg: projected row i+1
    bc = _context_map(c, b)
    return (z * bc).sum(1), (z.roll(-1, 0) * bc).sum(1)  # row i of u_neg: z_{(i+1) mod 2B}


def unified_loss(z: Tensor, c: Tensor, b: Sequence[Tensor], f: str = "logistic",
                 negative: str = "context-b") -> Tensor:
    """The unified local loss of METHODS 2 for one layer, mean over the 2B samples.

    ``z`` (2B, d): the layer's representations (gradient flows through them);
    ``c`` (2B, d'): the context of each sample (row i = other view of sample
    i, already detached); ``b``: ``(B,)`` shared or ``(B_1, B_2)`` per view,
    each (d, d'). Negative of sample i: z of sample (i+1) mod 2B with the same
    context, scored with the B that ``negative`` names (``"projected"``: the
    authors'; ``"context-b"``: sample i's). The L2 penalty on B is not
    included (it does not depend on W).
    """
    u_pos, u_neg = scores(z, c, b, negative)
    if f == "logistic":
        per = F.softplus(1 - u_pos) + F.softplus(1 + u_neg)
    elif f == "hinge":
        per = F.relu(1 - u_pos) + F.relu(1 + u_neg)
    elif f == "linear":
        per = u_neg - u_pos
    elif f == "type1":
        per = F.softplus(u_neg - u_pos)
    else:
        raise ValueError(f"unknown loss function f={f!r}; valid: {', '.join(LOSS_FUNCTIONS)}")
    return per.mean()


def fit_objective(z: Tensor, c: Tensor, b: Sequence[Tensor], f: str = "logistic",
                  lam: float = DEFAULT_LAM, negative: str = "context-b") -> Tensor:
    """What :func:`fit_b` minimises over B: ``unified_loss + lam * sum_g |B_g|_F^2``."""
    return unified_loss(z, c, b, f, negative) + lam * sum((bg ** 2).sum() for bg in b)


# ---------------------------------------------------------------------------
# Fitting B to its optimum for fixed W (METHODS 3)
# ---------------------------------------------------------------------------


@dataclass
class _Terms:
    """Loss terms ``phi(a_k + s_k t_k)``, ``t_k = sum_{atoms j of k} w_j p_j' B_{g_j} q_j`` (module docstring)."""

    p: Tensor  # (m, d) atoms' left vectors (layer representations)
    q: Tensor  # (m, d') atoms' right vectors (contexts)
    w: Tensor  # (m,) atoms' coefficients
    term: Tensor  # (m,) term of each atom
    group: Tensor  # (m,) B of each atom
    a: Tensor  # (n,) offsets
    s: Tensor  # (n,) signs
    phi: str  # "softplus" | "relu" | "identity"

    @property
    def n(self) -> int:
        return len(self.a)

    def select(self, terms: Tensor) -> _Terms:
        """The sub-problem made of the given terms (renumbered 0..len-1)."""
        keep = torch.isin(self.term, terms)
        new_id = torch.full((self.n,), -1, dtype=torch.long)
        new_id[terms] = torch.arange(len(terms))
        return _Terms(self.p[keep], self.q[keep], self.w[keep], new_id[self.term[keep]], self.group[keep],
                      self.a[terms], self.s[terms], self.phi)

    def t(self, b: Sequence[Tensor]) -> Tensor:
        """``t_k`` for given B matrices (indexed by group)."""
        groups = torch.unique(self.group)
        if len(groups) == 1 and len(self.w) == self.n and bool((self.term == torch.arange(self.n)).all()):
            return self.w * ((self.p @ b[int(groups[0])]) * self.q).sum(1)  # one atom per term, one B
        per_atom = torch.zeros(len(self.w), dtype=self.p.dtype)
        for g, bg in enumerate(b):
            m = self.group == g
            if m.any():
                per_atom = per_atom.masked_scatter(m, ((self.p[m] @ bg) * self.q[m]).sum(1))
        return torch.zeros(self.n, dtype=self.p.dtype).index_add(0, self.term, self.w * per_atom)

    def gram(self) -> Tensor:
        """K_km = <A_k, A_m>: atoms of different B are orthogonal."""
        same = (self.group[:, None] == self.group[None, :]).to(self.p.dtype)
        ga = same * (self.p @ self.p.T) * (self.q @ self.q.T) * (self.w[:, None] * self.w[None, :])
        if len(self.w) == self.n and bool((self.term == torch.arange(self.n)).all()):
            return ga  # one atom per term, in term order
        s = torch.zeros(self.n, len(self.w), dtype=self.p.dtype)
        s[self.term, torch.arange(len(self.w))] = 1.0
        return s @ ga @ s.T

    def b_from_beta(self, beta: Tensor, n_groups: int) -> list[Tensor]:
        """B_g = sum over atoms j in B_g of w_j beta_{k(j)} p_j q_j'."""
        coef = self.w * beta[self.term]
        out = []
        for g in range(n_groups):
            m = self.group == g
            out.append(self.p[m].T @ (coef[m, None] * self.q[m]))
        return out


def _terms(z: Tensor, c: Tensor, f: str, groups: Tensor, negative: str) -> _Terms:
    """The loss terms of a whole stacked batch (row groups ``groups``, negative as in :func:`scores`)."""
    _check_negative(negative)
    n = z.shape[0]
    idx = torch.arange(n)
    nxt = (idx + 1) % n
    one = torch.ones(n, dtype=z.dtype)
    g_neg = groups[nxt] if negative == "projected" else groups  # the B scoring row i's negative
    if f in ("logistic", "hinge", "linear"):
        # f(u_pos) term: phi(1 - u_pos); f(-u_neg) term: phi(1 + u_neg) (offset 0 for linear).
        off = 0.0 if f == "linear" else 1.0
        phi = {"logistic": "softplus", "hinge": "relu", "linear": "identity"}[f]
        return _Terms(torch.cat([z, z[nxt]]), torch.cat([c, c]), torch.cat([one, one]), torch.arange(2 * n),
                      torch.cat([groups, g_neg]), torch.cat([one, one]) * off, torch.cat([-one, one]), phi)
    if f == "type1":
        # softplus(u_neg - u_pos): one term, two atoms (z_{i+1}, c_i, +1) and (z_i, c_i, -1).
        return _Terms(torch.cat([z[nxt], z]), torch.cat([c, c]), torch.cat([one, -one]), torch.cat([idx, idx]),
                      torch.cat([g_neg, groups]), 0 * one, one, "softplus")
    raise ValueError(f"unknown loss function f={f!r}; valid: {', '.join(LOSS_FUNCTIONS)}")


def _components(t: _Terms, n_groups: int) -> list[Tensor]:
    """Term sets that share no B (independent problems): one per B unless a term spans two B's."""
    spans = torch.zeros(t.n, n_groups, dtype=torch.bool)
    spans[t.term, t.group] = True
    if bool((spans.sum(1) <= 1).all()):
        return [torch.nonzero(spans[:, g]).reshape(-1) for g in range(n_groups) if spans[:, g].any()]
    return [torch.arange(t.n)]


def _phi(name: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """phi, phi', phi'' elementwise."""
    if name == "softplus":
        sig = torch.sigmoid(x)
        return F.softplus(x), sig, sig * (1 - sig)
    if name == "identity":
        return x, torch.ones_like(x), torch.zeros_like(x)
    if name == "relu":
        return F.relu(x), (x > 0).to(x.dtype), torch.zeros_like(x)
    raise ValueError(name)


def _newton_beta(t: _Terms, k: Tensor, n_norm: int, lam: float, max_iter: int = 200) -> Tensor:
    """Solve F(beta) = s phi'(a + s K beta)/N + 2 lam beta = 0 by damped Newton (smooth phi)."""
    n = k.shape[0]
    beta = torch.zeros(n, dtype=k.dtype)
    eye = torch.eye(n, dtype=k.dtype)

    def obj(bt: Tensor) -> float:
        kb = k @ bt
        return float(_phi(t.phi, t.a + t.s * kb)[0].sum() / n_norm + lam * (bt @ kb))

    cur = obj(beta)
    for _ in range(max_iter):
        _, d1, d2 = _phi(t.phi, t.a + t.s * (k @ beta))
        res = t.s * d1 / n_norm + 2 * lam * beta
        # Newton step: (D K + 2 lam I) delta = -res with D = diag(phi''/N) >= 0 (s^2 = 1). With
        # S = D^(1/2): (D K + 2 lam I)^-1 = (I - S (S K S + 2 lam I)^-1 S K) / (2 lam), so one
        # Cholesky of the SPD matrix S K S + 2 lam I replaces a general LU solve (2x fewer flops).
        sq = (d2 / n_norm).sqrt()
        chol, info = torch.linalg.cholesky_ex(sq[:, None] * k * sq[None, :] + 2 * lam * eye)
        if int(info) == 0:
            y = torch.cholesky_solve((sq * (k @ res))[:, None], chol)[:, 0]
            delta = -(res - sq * y) / (2 * lam)
        else:  # K not numerically PSD: plain solve
            delta = torch.linalg.solve((d2 / n_norm)[:, None] * k + 2 * lam * eye, -res)
        slope = float((k @ res) @ delta)  # directional derivative of the objective (<= 0)
        step = 1.0
        if -slope > 1e-15 * (1.0 + abs(cur)):
            # Armijo backtracking; in the quadratic-convergence zone the full step is taken.
            while step > 1e-12:
                new = obj(beta + step * delta)
                if new <= cur + 1e-4 * step * slope:
                    break
                step *= 0.5
        beta = beta + step * delta
        cur = obj(beta)
        if step == 1.0 and float(delta.abs().max()) <= 1e-14 * max(float(beta.abs().max()), 1e-300):
            break
    return beta


def _hinge_beta(t: _Terms, k: Tensor, n_norm: int, lam: float, max_sweeps: int = 20000,
                tol: float = 1e-13) -> Tensor:
    """Hinge: SVM dual max sum(alpha) - alpha'Q alpha / 2, 0 <= alpha <= 1/(2 lam N), beta = alpha * y.

    Dual coordinate descent (Hsieh et al. 2008), then an exact solve on the
    active set to remove the coordinate-descent tolerance.
    """
    y = (-t.s).numpy()
    qm = (y[:, None] * y[None, :]) * k.numpy()
    n = len(y)
    cap = 1.0 / (2 * lam * n_norm)
    alpha = np.zeros(n)
    grad = -np.ones(n)  # Q alpha - 1
    diag = np.diag(qm).copy()
    for _ in range(max_sweeps):
        worst = 0.0
        for i in range(n):
            if diag[i] <= 0:
                continue
            g = grad[i]
            pg = min(g, 0.0) if alpha[i] <= 0 else (max(g, 0.0) if alpha[i] >= cap else g)
            worst = max(worst, abs(pg))
            if pg != 0.0:
                new = min(max(alpha[i] - g / diag[i], 0.0), cap)
                grad += qm[:, i] * (new - alpha[i])
                alpha[i] = new
        if worst <= tol * max(1.0, float(np.abs(grad).max())):
            break
    # Polish: free set satisfies (Q alpha)_F = 1 exactly.
    lo, hi = alpha <= 1e-12 * cap, alpha >= cap * (1 - 1e-12)
    free = ~(lo | hi)
    if free.any():
        a2 = alpha.copy()
        a2[lo], a2[hi] = 0.0, cap
        rhs = 1.0 - qm[np.ix_(free, hi)] @ a2[hi]
        sol = np.linalg.lstsq(qm[np.ix_(free, free)], rhs, rcond=None)[0]
        if np.all(sol > 0) and np.all(sol < cap):
            a2[free] = sol
            alpha = a2
    return torch.from_numpy(alpha * y).to(k.dtype)


def _lbfgs(objective: Callable[[list[Tensor]], Tensor], init: Sequence[Tensor], *, lr: float, max_iter: int,
           tolerance_grad: float, tolerance_change: float, history_size: int) -> list[Tensor]:
    """torch L-BFGS with strong-Wolfe line search on the B matrices (the authors' optimiser)."""
    bs = [b.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True) for b in init]
    opt = torch.optim.LBFGS(bs, lr=lr, max_iter=max_iter, max_eval=None if max_iter is None else 2 * max_iter,
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                            history_size=history_size, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(bs)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return [b.detach() for b in bs]


def fit_b(z: Tensor, c: Tensor, f: str = "logistic", *, lam: float = DEFAULT_LAM, shared: bool = False,
          negative: str = "context-b", method: str = "newton", lr: float = 0.2, max_iter: int = 1000,
          tolerance_grad: float = 1e-12, tolerance_change: float = 1e-16,
          history_size: int = 100) -> tuple[Tensor, ...]:
    """B at the optimum of ``unified_loss(z, c, B, f, negative) + lam sum_g |B_g|^2`` for fixed z, c (METHODS 3).

    ``z`` (2B, d), ``c`` (2B, d') detached; ``lam`` is per B. Returns ``(B,)``
    if ``shared`` else ``(B_1, B_2)`` for view-1 / view-2 samples, each
    (d, d'). ``method``: ``"newton"`` (exact, see the module docstring; for
    the hinge an exact dual solve) or ``"lbfgs"`` (lr, strong Wolfe,
    ``max_iter`` iterations, tolerances as given, from B = 0).
    """
    if lam <= 0:
        raise ValueError("fit_b needs an L2 penalty lam > 0 (the optimum is unbounded otherwise)")
    if method not in ("newton", "lbfgs"):
        raise ValueError(f"unknown fit method {method!r}; valid: newton, lbfgs")
    z = z.detach().to(DTYPE)
    c = c.detach().to(DTYPE)
    n = z.shape[0]
    n_groups = 1 if shared else 2
    terms = _terms(z, c, f, _row_groups(n, shared), negative)
    out = [torch.zeros(z.shape[1], c.shape[1], dtype=DTYPE) for _ in range(n_groups)]
    for comp in _components(terms, n_groups):
        t = terms.select(comp)
        if method == "lbfgs":
            # Each independent problem on its own: L-BFGS on a separable sum converges more slowly.
            used = sorted(set(t.group.tolist()))

            def objective(bs: list[Tensor], t: _Terms = t, used: list[int] = used) -> Tensor:
                full = [torch.zeros_like(out[0])] * n_groups
                for g, bg in zip(used, bs):
                    full[g] = bg
                return (_phi(t.phi, t.a + t.s * t.t(full))[0].sum() / n
                        + lam * sum((bg ** 2).sum() for bg in bs))

            fitted = _lbfgs(objective, [out[g] for g in used], lr=lr, max_iter=max_iter,
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                            history_size=history_size)
            for g, bg in zip(used, fitted):
                out[g] = bg
            continue
        k = t.gram()
        if t.phi == "identity":
            beta = -t.s / (2 * lam * n)  # closed form: F = s/N + 2 lam beta = 0
        elif t.phi == "relu":
            beta = _hinge_beta(t, k, n, lam)
        else:
            beta = _newton_beta(t, k, n, lam)
        for g, bg in enumerate(t.b_from_beta(beta, n_groups)):
            out[g] = out[g] + bg  # components touch disjoint B's
    return tuple(out)


def fit_b_authors(z: Tensor, c: Tensor, init: Sequence[Tensor], f: str = "logistic", *,
                  lam: float = AUTHORS_LAM, negative: str = "projected", refits: int = 3) -> tuple[Tensor, ...]:
    """The authors' fit of B as run (METHODS 3): float32 L-BFGS, warm-started, ``refits`` times.

    torch L-BFGS (lr 0.2, strong Wolfe, ``max_iter`` 1000, history 100,
    torch's default tolerances 1e-7 / 1e-9) on all B's of the layer jointly,
    from ``init`` (their initial B, or the previous batch's), restarted
    ``refits`` times on the same batch (their 3 "epochs"). Returns float64.
    """
    z32 = z.detach().to(torch.float32)
    c32 = c.detach().to(torch.float32)
    bs = [b.detach().to(torch.float32) for b in init]
    for _ in range(refits):
        bs = _lbfgs(lambda b: fit_objective(z32, c32, b, f, lam, negative), bs, lr=0.2, max_iter=1000,
                    tolerance_grad=1e-7, tolerance_change=1e-9, history_size=100)
    return tuple(b.to(DTYPE) for b in bs)


# ---------------------------------------------------------------------------
# Networks and the local-vs-BP gradient comparison
# ---------------------------------------------------------------------------


def init_weights(widths: Sequence[int], init: str = "orthogonal", seed: int = 0) -> list[Tensor]:
    """Weights W^l of shape (widths[l+1], widths[l]) in float64.

    ``init``: ``"orthogonal"`` (``nn.init.orthogonal_``: orthogonal for square,
    semi-orthogonal with orthonormal rows or columns otherwise) or
    ``"default"`` (PyTorch ``nn.Linear``'s default, kaiming-uniform with
    a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
    """
    g = torch.Generator().manual_seed(int(seed))
    ws = []
    for din, dout in zip(widths[:-1], widths[1:]):
        w = torch.empty(dout, din, dtype=DTYPE)
        if init == "orthogonal":
            torch.nn.init.orthogonal_(w, generator=g)
        elif init == "default":
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        else:
            raise ValueError(f"unknown init {init!r}; valid: orthogonal, default")
        ws.append(w)
    return ws


@dataclass
class LinearNet:
    """Bias-free MLP ``h^l = act(W^l h^{l-1})`` (act = ReLU if ``relu`` else identity)."""

    weights: list[Tensor]
    relu: bool = False

    def layer(self, l: int, h: Tensor, w: Tensor | None = None) -> Tensor:
        a = h @ (self.weights[l] if w is None else w).T
        return F.relu(a) if self.relu else a

    def __len__(self) -> int:
        return len(self.weights)


class LayeredNet(Protocol):
    """What :func:`compare_gradients` needs: the weights and one layer's forward with a given W."""

    weights: list[Tensor]

    def layer(self, l: int, h: Tensor, w: Tensor | None = None) -> Tensor: ...


def _flat(h: Tensor) -> Tensor:
    return h.flatten(1)


@dataclass
class GradientComparison:
    """Local and BP weight gradients of one batch, with the fitted B matrices."""

    local: list[Tensor]
    bp: list[Tensor]
    b_local: list[tuple[Tensor, ...]]
    b_top: tuple[Tensor, ...]
    reps: list[Tensor] = field(default_factory=list)  # detached readouts z^l, l = 1..L

    def errors(self) -> list[dict[str, float]]:
        """:func:`grad_errors` per layer (layer 1 first)."""
        return [grad_errors(a, b) for a, b in zip(self.local, self.bp)]


def compare_gradients(net: LayeredNet, x: Tensor, *, f: str = "logistic", context: str = "same",
                      readout: Callable[[Tensor], Tensor] = _flat,
                      top_readout: Callable[[Tensor], Tensor] | None = None,
                      lam: float = DEFAULT_LAM, fit: str = "newton", shared_b: bool = False,
                      negative: str = "context-b", fit_kwargs: dict | None = None,
                      fitter: Callable[[Any, Tensor, Tensor], tuple[Tensor, ...]] | None = None
                      ) -> GradientComparison:
    """Per-layer local gradient (METHODS 2) and BP gradient (METHODS 3) of W^l on one batch.

    ``net`` has ``weights`` (list of tensors) and ``layer(l, h, w=None)``;
    ``x`` is the stacked (view 1; view 2) input batch. ``context``: ``"same"``
    (the other view's ``z^l``, CLAPP++) or ``"dfb"`` (the other view's top
    ``z^L``, direct feedback; B^l then maps top space to layer space).
    ``readout`` maps a layer output to z (identity/flatten for MLPs, pooling
    for CNNs); ``top_readout`` is the readout of the global loss (defaults to
    ``readout``). Samples and negatives are the same for local and BP;
    ``negative`` says which B scores a negative (:func:`scores`).
    ``fitter(key, z, c)``, if given, returns the B's instead of
    :func:`fit_b` (key ``"top"`` for the global loss, ``l`` for layer l's
    local loss): :func:`broken` passes the authors' warm-started float32 fit.
    """
    if context not in ("same", "dfb"):
        raise ValueError(f"unknown context {context!r}; valid: same, dfb")
    top_readout = readout if top_readout is None else top_readout
    kw = dict(lam=lam, shared=shared_b, method=fit, negative=negative, **(fit_kwargs or {}))
    if fitter is None:
        def fitter(key: Any, z: Tensor, c: Tensor) -> tuple[Tensor, ...]:
            return fit_b(z, c, f, **kw)
    weights = [w.detach().to(DTYPE).requires_grad_(True) for w in net.weights]
    n_layers = len(weights)
    x = x.detach().to(DTYPE)

    with torch.no_grad():
        hs = [x]
        for l in range(n_layers):
            hs.append(net.layer(l, hs[-1], weights[l]))
    z_top = top_readout(hs[-1])
    b_top = fitter("top", z_top, other_view(z_top))

    # Global loss: the same loss at the top only, back-propagated (context detached).
    with torch.enable_grad():
        h = x
        for l in range(n_layers):
            h = net.layer(l, h, weights[l])
        zt = top_readout(h)
        loss = unified_loss(zt, other_view(zt).detach(), b_top, f, negative)
        bp = list(torch.autograd.grad(loss, weights))

    top_ctx = other_view(readout(hs[-1]))  # DFB context: top representation of the other view
    local, b_local, reps = [], [], []
    for l in range(n_layers):
        with torch.enable_grad():
            # Detached input: the gradient of L^l reaches W^l only.
            z = readout(net.layer(l, hs[l].detach(), weights[l]))
            c = other_view(z.detach()) if context == "same" else top_ctx
            if l == n_layers - 1 and top_readout is readout:
                b = b_top  # the top layer's local loss *is* the global loss
            else:
                b = fitter(l, z.detach(), c)
            loss_l = unified_loss(z, c, b, f, negative)
            local.append(torch.autograd.grad(loss_l, weights[l])[0])
        b_local.append(b)
        reps.append(z.detach())
    return GradientComparison(local, bp, b_local, b_top, reps)


# ---------------------------------------------------------------------------
# Data: synthetic Gaussian views, or the authors' MNIST patches
# ---------------------------------------------------------------------------


def synthetic_views(n: int, dim: int, *, seed: int = 0, noise: float = 0.5) -> tuple[Tensor, Tensor]:
    """Two Gaussian views ``s + noise * e1``, ``s + noise * e2`` of ``n`` shared signals s ~ N(0, I)."""
    g = torch.Generator().manual_seed(int(seed))
    s = torch.randn(n, dim, generator=g, dtype=DTYPE)
    return (s + noise * torch.randn(n, dim, generator=g, dtype=DTYPE),
            s + noise * torch.randn(n, dim, generator=g, dtype=DTYPE))


#: Standard torchvision MNIST normalisation (mean, std of the training pixels / 255).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_PREPROCESS = ("normalize", "scale", "center")


def _preprocess(parts: list[Tensor], preprocess: str) -> list[Tensor]:
    """Pixel preprocessing of patches already divided by 255 (see :func:`mnist_patch_views`)."""
    if preprocess == "normalize":
        return [(v - MNIST_MEAN) / MNIST_STD for v in parts]
    if preprocess == "center":
        mean = torch.cat(parts).mean(0)
        return [v - mean for v in parts]
    if preprocess != "scale":
        raise ValueError(f"unknown preprocess {preprocess!r}; valid: {', '.join(MNIST_PREPROCESS)}")
    return list(parts)


def _mnist_images(mnist_dir: str | Path, n: int, split: str) -> Tensor:
    from ..data.mnist import load_mnist

    images, _ = load_mnist(mnist_dir, split)
    if n > len(images):
        raise ValueError(f"asked for {n} MNIST images, split {split!r} of {mnist_dir} has {len(images)}")
    return torch.from_numpy(images[:n].astype(np.float64))


def mnist_patch_views(mnist_dir: str | Path, n_samples: int = 1024, *, columns: str = "alternate",
                      preprocess: str = "normalize", split: str = "train") -> tuple[Tensor, Tensor]:
    """One positive pair of 14x14 patches (196-d) per MNIST image: the ``one-pair`` layout.

    Each 28x28 image is cut into four 14x14 patches; the top and bottom patch
    of one column form a positive pair (view 1 = top, view 2 = bottom).
    ``columns``: ``"alternate"`` (image i of the first ``n_samples`` gives its
    left-column pair if i is even, its right-column pair if odd, so both
    pair kinds are used, every sample is a different image and so is every
    negative), ``"left"`` or ``"right"``. (The authors use both columns of
    every image: :func:`mnist_quadrant_batches`.)
    ``preprocess``: ``"normalize"`` (default: ``(x/255 - 0.1307) / 0.3081``,
    the usual torchvision MNIST normalisation, as the authors), ``"scale"``
    (x/255) or ``"center"`` (x/255 minus the per-pixel mean over all patches
    used).
    """
    x = _mnist_images(mnist_dir, n_samples, split)
    left = (x[:, :14, :14], x[:, 14:, :14])
    right = (x[:, :14, 14:], x[:, 14:, 14:])
    if columns == "left":
        top, bottom = left
    elif columns == "right":
        top, bottom = right
    elif columns == "alternate":
        even = (torch.arange(n_samples) % 2 == 0)[:, None, None]
        top, bottom = torch.where(even, left[0], right[0]), torch.where(even, left[1], right[1])
    else:
        raise ValueError(f"unknown columns {columns!r}; valid: alternate, left, right")
    v1, v2 = _preprocess([top.reshape(n_samples, 196) / 255.0, bottom.reshape(n_samples, 196) / 255.0],
                         preprocess)
    return v1.contiguous(), v2.contiguous()


def mnist_quadrant_batches(mnist_dir: str | Path, n_batches: int = 32, batch_size: int = 32, *,
                           preprocess: str = "normalize", split: str = "train") -> list[Tensor]:
    """The authors' batches (METHODS 3): both columns of every image, 2 x ``batch_size`` pairs.

    Batch b holds images ``b*batch_size ... (b+1)*batch_size - 1`` of the
    split (no shuffling) as rows ``[TL x bs, TR x bs | BL x bs, BR x bs]``
    (top-left, top-right, bottom-left, bottom-right 14x14 patches, 196-d):
    view 1 = the top patches, view 2 = the bottom ones, so row i's positive
    is row ``i + 2 bs`` (:func:`other_view`), the patch below it. This is
    the row order of their patch unfolding of a (bs, 1, 28, 28) batch.
    ``preprocess`` as in :func:`mnist_patch_views` (``"center"``: mean over
    all quadrants used).
    """
    n = n_batches * batch_size
    x = _mnist_images(mnist_dir, n, split) / 255.0
    quads = [x[:, :14, :14], x[:, :14, 14:], x[:, 14:, :14], x[:, 14:, 14:]]  # TL, TR, BL, BR
    quads = _preprocess([q.reshape(n, 196) for q in quads], preprocess)
    out = []
    for b in range(n_batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        out.append(torch.cat([q[sl] for q in quads]).contiguous())
    return out


def make_views(*, mnist_dir: str | Path | None, n_samples: int, dim: int, data_seed: int = 0,
               preprocess: str = "normalize", columns: str = "alternate") -> tuple[Tensor, Tensor, str]:
    """MNIST patches if ``mnist_dir`` is given, synthetic Gaussian views otherwise; also a description."""
    if mnist_dir is not None:
        v1, v2 = mnist_patch_views(mnist_dir, n_samples, columns=columns, preprocess=preprocess)
        return v1, v2, f"MNIST patches ({n_samples} train samples, columns={columns}, preprocess={preprocess})"
    v1, v2 = synthetic_views(n_samples, dim, seed=data_seed)
    return v1, v2, f"synthetic Gaussian views (n={n_samples}, dim={dim}, noise 0.5, data seed {data_seed})"


def _batches(v1: Tensor, v2: Tensor, batch_size: int):
    for i in range(0, len(v1) - batch_size + 1, batch_size):
        yield torch.cat([v1[i:i + batch_size], v2[i:i + batch_size]])


def _seed_list(seeds: int | Sequence[int]) -> list[int]:
    return list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]


def _summ(per_seed: list[list[float]]) -> tuple[list[float], list[float]]:
    """Mean and (population) std over seeds, per layer."""
    a = np.asarray(per_seed, dtype=np.float64)
    return a.mean(0).tolist(), a.std(0).tolist()


# ---------------------------------------------------------------------------
# Experiments (METHODS 3)
# ---------------------------------------------------------------------------


@_one_thread
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
    if mnist_dir is not None:
        width = width or 128
        in_dim = in_dim or 196
    else:
        width = width or 64
        in_dim = in_dim or width
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_batches * batch_size, dim=in_dim,
                              preprocess=preprocess, columns=columns)
    widths = [in_dim] + [width] * depth
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


BROKEN_SETTINGS = {
    # name: (init, relu)
    "orthogonal": ("orthogonal", False),
    "default": ("default", False),
    "relu-orthogonal": ("orthogonal", True),
    "relu-default": ("default", True),
}

#: Presets of :func:`broken` (METHODS 3). ``authors``: both columns of every
#: image (a batch of bs images = 2 bs pairs), L2 0.005 per B, the next row of
#: the projected batch as negative, the BP model's weights in the authors'
#: draw order. ``one-pair``: our earlier setting (one pair per image, the
#: columns alternating, L2 0.01 per B, negative scored with the context's B,
#: plain float64 init).
BROKEN_LAYOUTS: dict[str, dict[str, Any]] = {
    "authors": dict(columns="both", lam=AUTHORS_LAM, negative="projected", draw="authors"),
    "one-pair": dict(columns="alternate", lam=DEFAULT_LAM, negative="context-b", draw="plain"),
}
#: Where the weights of :func:`broken` come from (see :func:`authors_draw`).
DRAWS = ("authors", "authors-layerwise", "plain")
BROKEN_FITS = ("newton", "lbfgs", "lbfgs32")


@dataclass
class AuthorsDraw:
    """What the authors' script draws from one seeded torch RNG, in its order, as float64.

    Their script (METHODS 3) builds the layerwise model, then the end-to-end
    (BP) model, from one RNG seeded once; each model draws its encoder W
    (``nn.Linear`` default init, float32), then the B of its losses (also
    ``nn.Linear`` default init: B_1 of every loss, then B_2 of every loss),
    then, for the orthogonal init, one Gaussian matrix per W (QR-
    orthogonalised). The BP model's W are then copied into the layerwise
    model and frozen: ``bp`` are the weights analysed. B are in this
    module's orientation (``u = z . (B c)``, the transpose of their
    ``nn.Linear`` weight) and are only the starting points of their L-BFGS.
    """

    bp: list[Tensor]
    layerwise: list[Tensor]
    b_layerwise: list[tuple[Tensor, Tensor]]
    b_top: tuple[Tensor, Tensor]


def authors_draw(widths: Sequence[int], init: str = "default", seed: int = AUTHORS_SEED) -> AuthorsDraw:
    """Replay the authors' draw order (see :class:`AuthorsDraw`) from ``torch.manual_seed(seed)``.

    Uniform draws are made in float32 exactly as theirs (a torch.Generator
    seeded with ``seed`` gives the same stream as the global RNG) and cast
    to float64 without change. For ``init="orthogonal"`` the float32
    Gaussian matrix is theirs but its QR is done in float64, so W is
    orthogonal to float64 precision (theirs: to float32, ~1e-7).
    """
    if init not in ("default", "orthogonal"):
        raise ValueError(f"unknown init {init!r}; valid: orthogonal, default")
    g = torch.Generator().manual_seed(int(seed))

    def linear(d_out: int, d_in: int) -> Tensor:  # nn.Linear(d_in, d_out).weight, float32
        w = torch.empty(d_out, d_in, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        return w.to(DTYPE)

    def orthogonal(rows: int, cols: int) -> Tensor:  # nn.init.orthogonal_ with its float32 Gaussian
        a = torch.empty(rows, cols, dtype=torch.float32).normal_(0, 1, generator=g).to(DTYPE)
        a = a.T if rows < cols else a
        q, r = torch.linalg.qr(a)
        q = q * torch.diagonal(r).sign()
        return q.T.contiguous() if rows < cols else q

    def model(loss_dims: Sequence[int]) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
        ws = [linear(dout, din) for din, dout in zip(widths[:-1], widths[1:])]
        b1 = [linear(d, d).T.contiguous() for d in loss_dims]
        b2 = [linear(d, d).T.contiguous() for d in loss_dims]
        if init == "orthogonal":
            ws = [orthogonal(*w.shape) for w in ws]
        return ws, list(zip(b1, b2))

    lw, b_lw = model(widths[1:])
    bp, b_top = model(widths[-1:])
    return AuthorsDraw(bp=bp, layerwise=lw, b_layerwise=b_lw, b_top=b_top[0])


def _broken_weights(widths: Sequence[int], init: str, seed: int, draw: str) -> tuple[list[Tensor], AuthorsDraw | None]:
    if draw == "plain":
        return init_weights(widths, init, seed), None
    if draw not in DRAWS:
        raise ValueError(f"unknown draw {draw!r}; valid: {', '.join(DRAWS)}")
    d = authors_draw(widths, init, seed)
    return (d.bp if draw == "authors" else d.layerwise), d


class _AuthorsFitter:
    """:func:`fit_b_authors` with the authors' warm starts: their initial B, then the previous batch's."""

    def __init__(self, draw: AuthorsDraw | None, widths: Sequence[int], *, f: str, lam: float, negative: str,
                 shared: bool, refits: int = 3):
        def zeros(d: int, d2: int) -> tuple[Tensor, Tensor]:
            return (torch.zeros(d, d2, dtype=DTYPE), torch.zeros(d, d2, dtype=DTYPE))

        n_layers = len(widths) - 1
        top = draw.b_top if draw is not None else zeros(widths[-1], widths[-1])
        local = draw.b_layerwise if draw is not None else [zeros(d, d) for d in widths[1:]]
        self.state: dict[Any, tuple[Tensor, ...]] = {"top": top, **{l: local[l] for l in range(n_layers)}}
        if shared:
            self.state = {k: v[:1] for k, v in self.state.items()}
        self.kw = dict(f=f, lam=lam, negative=negative, refits=refits)

    def __call__(self, key: Any, z: Tensor, c: Tensor) -> tuple[Tensor, ...]:
        b = fit_b_authors(z, c, self.state[key], **self.kw)
        self.state[key] = b
        return b


def _broken_batches(mnist_dir: str | Path | None, columns: str, n_batches: int, batch_size: int, dim: int,
                    preprocess: str) -> tuple[list[Tensor], str]:
    if columns == "both":
        if mnist_dir is not None:
            return (mnist_quadrant_batches(mnist_dir, n_batches, batch_size, preprocess=preprocess),
                    f"MNIST quadrants ({n_batches * batch_size} train images; a batch stacks "
                    f"[TL x {batch_size}, TR x {batch_size} | BL x {batch_size}, BR x {batch_size}]: "
                    f"{2 * batch_size} pairs; preprocess={preprocess})")
        v1, v2 = synthetic_views(2 * n_batches * batch_size, dim)
        return (list(_batches(v1, v2, 2 * batch_size)),
                f"synthetic Gaussian views ({2 * batch_size} pairs per batch, dim={dim}, noise 0.5, data seed 0)")
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_batches * batch_size, dim=dim,
                              preprocess=preprocess, columns=columns)
    return list(_batches(v1, v2, batch_size)), data


def _broken_run(net: LinearNet, batches: Sequence[Tensor], fitter: Any, **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per batch and layer: cosine(local, BP) and |dW_bp|."""
    cos, norms = [], []
    for x in batches:
        errs = compare_gradients(net, x, fitter=fitter, **kw).errors()
        cos.append([e["cosine"] for e in errs])
        norms.append([e["norm_bp"] for e in errs])
    return np.array(cos), np.array(norms)


@_one_thread
def broken(*, f: str = "logistic", seeds: int | Sequence[int] = 5, mnist_dir: str | Path | None = None,
           n_batches: int | None = None, batch_size: int = 32, width: int | None = None, depth: int = 6,
           in_dim: int | None = None, layout: str = "authors", lam: float | None = None,
           negative: str | None = None, columns: str | None = None, draw: str | None = None,
           authors_seed: int | None = AUTHORS_SEED, shared_b: bool = False,
           settings: Sequence[str] = tuple(BROKEN_SETTINGS), preprocess: str = "normalize",
           fit: str = "newton") -> TheoryResult:
    """Theorem 3.1 with broken assumptions: default init, ReLU (orthogonal / default init).

    ``layout`` (:data:`BROKEN_LAYOUTS`): ``"authors"`` (default: their
    experiment as read in their scripts, METHODS 3) or ``"one-pair"``;
    ``lam`` (per B), ``negative``, ``columns`` (``"both"`` or one pair per
    image: ``"alternate"``, ``"left"``, ``"right"``) and ``draw``
    (:data:`DRAWS`) override single choices of the layout. ``batch_size``
    is images per batch (2 pairs each with ``columns="both"``).
    ``fit``: ``"newton"`` (exact B), ``"lbfgs"`` (float64, from B = 0) or
    ``"lbfgs32"`` (the authors' warm-started float32 L-BFGS, 3 refits).

    Per setting and layer: cosine(local dW^l, BP dW^l) averaged over batches,
    then mean and std over the init seeds ``seeds`` (``cosine_mean``,
    ``cosine_std_seeds``), the same for ``authors_seed`` alone
    (``cosine_seed42``: the authors' single run), and the mean over seeds of
    the std over batches. ``orthogonal`` (linear) is the control where the
    theorem holds. With ``mnist_dir``: 32 batches, 196 -> 128 x 6, and the
    authors' figures as reference; otherwise synthetic 64-d views.
    """
    t0 = time.perf_counter()
    if layout not in BROKEN_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(BROKEN_LAYOUTS)}")
    if fit not in BROKEN_FITS:
        raise ValueError(f"unknown fit {fit!r}; valid: {', '.join(BROKEN_FITS)}")
    lay = dict(BROKEN_LAYOUTS[layout])
    for key, val in dict(lam=lam, negative=negative, columns=columns, draw=draw).items():
        if val is not None:
            lay[key] = val
    _check_negative(lay["negative"])
    if lay["draw"] not in DRAWS:
        raise ValueError(f"unknown draw {lay['draw']!r}; valid: {', '.join(DRAWS)}")
    unknown = [s for s in settings if s not in BROKEN_SETTINGS]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid: {', '.join(BROKEN_SETTINGS)}")
    seed_list = _seed_list(seeds)
    if not seed_list and authors_seed is None:
        raise ValueError("broken needs init seeds (seeds >= 1) or authors_seed")
    if mnist_dir is not None:
        width, in_dim, n_batches = width or 128, in_dim or 196, n_batches or 32
    else:
        width, n_batches = width or 64, n_batches or 8
        in_dim = in_dim or width
    batches, data = _broken_batches(mnist_dir, lay["columns"], n_batches, batch_size, in_dim, preprocess)
    widths = [in_dim] + [width] * depth
    res = TheoryResult("broken", primary="cosine_mean",
                       config=dict(f=f, layout=layout, seeds=seed_list, authors_seed=authors_seed,
                                   n_batches=n_batches, batch_size=batch_size,
                                   pairs_per_batch=batches[0].shape[0] // 2, widths=widths, lam=lay["lam"],
                                   negative=lay["negative"], draw=lay["draw"], shared_b=shared_b, fit=fit,
                                   data=data))
    kw = dict(f=f, lam=lay["lam"], negative=lay["negative"], shared_b=shared_b,
              fit="newton" if fit == "lbfgs32" else fit)
    seed42 = f"cosine_seed{authors_seed}"
    if authors_seed is not None:
        res.secondary.append(seed42)
    for name in settings:
        init, relu = BROKEN_SETTINGS[name]
        runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for seed in dict.fromkeys(seed_list + ([authors_seed] if authors_seed is not None else [])):
            weights, drawn = _broken_weights(widths, init, seed, lay["draw"])
            fitter = (_AuthorsFitter(drawn, widths, f=f, lam=lay["lam"], negative=lay["negative"], shared=shared_b)
                      if fit == "lbfgs32" else None)
            runs[seed] = _broken_run(LinearNet(weights, relu=relu), batches, fitter, **kw)
        if seed_list:
            per_seed = [runs[s][0].mean(0) for s in seed_list]
            m, s = _summ(per_seed)
            res.add(name, "cosine_mean", m)
            res.add(name, "cosine_std_seeds", s)
        if authors_seed is not None:
            res.add(name, seed42, runs[authors_seed][0].mean(0))
        used = seed_list or [authors_seed]
        res.add(name, "cosine_std_batches", np.mean([runs[s][0].std(0) for s in used], 0))
        res.add(name, "median|dW_bp|", np.median([np.median(runs[s][1], 0) for s in used], 0))
        if len(seed_list) > 1:
            res.per_seed[name] = [list(map(float, runs[s][0].mean(0))) for s in seed_list]
    if mnist_dir is not None and depth == 6:
        res.reference = {k: v for k, v in AUTHORS_FIGURES.items() if k in settings}
    if lay["columns"] == "both":
        res.notes.append("Both columns of every image: row i's positive is the patch below it, its negative "
                         "the next row of the batch (wrapping at the end).")
    res.notes.append(f"negative={lay['negative']}: " + (
        "the next row of the *projected* batch (B_{g(i+1)}' z_{i+1}) . c_i, the authors'"
        if lay["negative"] == "projected" else "z_{i+1} . (B_{g(i)} c_i), scored with the context's B"))
    res.notes.append({"authors": "W = the authors' BP model's initial weights (they freeze W; its '3 epochs' "
                                 "refit B only), replayed from torch.manual_seed(seed) in their draw order.",
                      "authors-layerwise": "W = the authors' layerwise model's initial weights (drawn first "
                                           "from the seed; they overwrite them with the BP model's).",
                      "plain": "W = init_weights(seed) in float64."}[lay["draw"]])
    res.notes.append("ReLU is applied at every layer, including the top. Default init = nn.Linear's "
                     "kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)).")
    if fit == "lbfgs32":
        res.notes.append("fit=lbfgs32: B fitted as the authors run it (float32 L-BFGS, default tolerances, "
                         "warm-started, 3 refits per batch); gradients then compared in float64.")
    res.runtime_s = time.perf_counter() - t0
    return res


#: Variants of :func:`broken_ablation`: one choice of the ``authors`` layout changed at a time.
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "authors": {},
    "lam=0.01": dict(lam=DEFAULT_LAM),
    "neg=context-b": dict(negative="context-b"),
    "one-pair/image": dict(columns="alternate"),
    "one-pair layout": dict(layout="one-pair"),
    "draw=plain": dict(draw="plain"),
    "draw=layerwise": dict(draw="authors-layerwise"),
}
#: The variants :func:`broken_ablation` runs by default (the draws only reshuffle W: same distribution).
ABLATION_DEFAULT = ("authors", "lam=0.01", "neg=context-b", "one-pair/image", "one-pair layout")


@_one_thread
def broken_ablation(*, f: str = "logistic", seeds: int | Sequence[int] = 5, mnist_dir: str | Path | None = None,
                    n_batches: int | None = None, settings: Sequence[str] = ("default", "relu-orthogonal"),
                    variants: Sequence[str] = ABLATION_DEFAULT, lbfgs32: bool = True,
                    preprocess: str = "normalize") -> TheoryResult:
    """Which choice of the authors' layout moves :func:`broken`'s cosines, and by how much.

    Each variant changes one choice of ``layout="authors"``
    (:data:`ABLATION_VARIANTS`); rows ``"<setting> <variant>"`` hold
    ``cosine_mean`` / ``cosine_std_seeds`` over ``seeds`` and
    ``cosine_seed42``. With ``lbfgs32`` a last row fits B as the authors run
    it (float32 L-BFGS, warm-started, 3 refits), for seed 42 only (it is
    ~15x slower than the exact fit). About 5 minutes on one core.
    """
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if unknown:
        raise ValueError(f"unknown ablation variant(s) {unknown}; valid: {', '.join(ABLATION_VARIANTS)}")
    t0 = time.perf_counter()
    res = TheoryResult("ablation", primary="cosine_mean", config=dict(f=f, seeds=_seed_list(seeds)))
    res.secondary.append(f"cosine_seed{AUTHORS_SEED}")
    runs = [(v, ABLATION_VARIANTS[v], seeds) for v in variants]
    if lbfgs32:
        runs.append(("fit=lbfgs32", dict(fit="lbfgs32"), []))
    res.config["variants"] = {}
    for name, over, sd in runs:
        r = broken(f=f, seeds=sd, mnist_dir=mnist_dir, n_batches=n_batches, settings=settings,
                   preprocess=preprocess, **over)
        for setting in settings:
            for metric, vals in r.metrics[setting].items():
                if metric in ("cosine_mean", "cosine_std_seeds", f"cosine_seed{AUTHORS_SEED}"):
                    res.add(f"{setting} {name}", metric, vals)
            if setting in r.reference and name == "authors":
                res.reference[f"{setting} {name}"] = r.reference[setting]
        res.config.setdefault("variants", {})[name] = over
        if name == "authors":
            res.config["authors_layout"] = {k: r.config[k] for k in ("lam", "negative", "draw", "fit", "data")}
    res.notes.append("Each row changes one choice of the authors' layout (config: variants); 'one-pair "
                     "layout' changes all of them (our earlier default); fit=lbfgs32 is for seed 42 only.")
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
    if mnist_dir is not None:
        width, in_dim = width or 128, in_dim or 196
    else:
        width = width or 64
        in_dim = in_dim or width
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_batches * batch_size, dim=in_dim,
                              preprocess=preprocess, columns=columns)
    widths = [in_dim] + [width] * depth
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


# ---------------------------------------------------------------------------
# CLI hooks (implemented in .cli; re-exported here, imported lazily because
# .cli imports this module)
# ---------------------------------------------------------------------------


def add_theory_parser(subparsers: Any) -> Any:
    """Add the ``localssl theory`` subcommand; see :func:`localssl.theory.cli.add_theory_parser`."""
    from .cli import add_theory_parser as _add

    return _add(subparsers)


def theory_main(args: Any) -> int:
    """Run ``localssl theory``; see :func:`localssl.theory.cli.theory_main`."""
    from .cli import theory_main as _main

    return _main(args)
