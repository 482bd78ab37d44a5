"""Fitting B to its optimum for fixed W: exact Newton, L-BFGS, the authors' float32 fit (METHODS 3).

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
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import AUTHORS_LAM, DEFAULT_LAM, DTYPE
from .loss import LOSS_FUNCTIONS, _check_negative, _row_groups, fit_objective

__all__ = ["channel_atoms", "fit_b", "fit_b_authors"]


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


def channel_atoms(t: _Terms, positions: int) -> _Terms:
    """The terms of ``B = B_ch (x) I_P`` as terms of ``B_ch`` (C_z x C_c), with few atoms.

    With channel-major rows (index ``c * P + p``, as ``h.flatten(1)`` of a
    (N, C, H, W) map lays them out), ``p' (B_ch (x) I_P) q = sum_j p_j' B_ch q_j
    = <B_ch, R>`` with ``p_j`` the channel vector at position j and
    ``R = sum_j p_j q_j'``. Each atom becomes ``min(P, C_z)`` atoms of B_ch
    with the same term, coefficient and B: one per position ``(p_j, q_j)``,
    or one per row of R ``(e_i, R_i)`` when there are fewer channels than
    positions (the Gram matrix is the square of the atom count).
    ``|B|^2 = P |B_ch|^2``, so the penalty on B_ch is P lam (:func:`fit_b`).
    """
    m, cz, cc = len(t.w), t.p.shape[1] // positions, t.q.shape[1] // positions
    pp, qq = t.p.reshape(m, cz, positions), t.q.reshape(m, cc, positions)
    if positions <= cz:
        p, q, k = pp.transpose(1, 2).reshape(-1, cz), qq.transpose(1, 2).reshape(-1, cc), positions
    else:
        r = torch.einsum("mjp,mkp->mjk", pp, qq)  # R of every atom
        p, q, k = torch.eye(cz, dtype=t.p.dtype).repeat(m, 1), r.reshape(-1, cc), cz
    return _Terms(p, q, t.w.repeat_interleave(k), t.term.repeat_interleave(k), t.group.repeat_interleave(k),
                  t.a, t.s, t.phi)


def fit_b(z: Tensor, c: Tensor, f: str = "logistic", *, lam: float = DEFAULT_LAM, shared: bool = False,
          negative: str = "context-b", method: str = "newton", lr: float = 0.2, max_iter: int = 1000,
          tolerance_grad: float = 1e-12, tolerance_change: float = 1e-16,
          history_size: int = 100, positions: int | None = None) -> tuple[Tensor, ...]:
    """B at the optimum of ``unified_loss(z, c, B, f, negative) + lam sum_g |B_g|^2`` for fixed z, c (METHODS 3).

    ``z`` (2B, d), ``c`` (2B, d') detached; ``lam`` is per B. Returns ``(B,)``
    if ``shared`` else ``(B_1, B_2)`` for view-1 / view-2 samples, each
    (d, d'). ``method``: ``"newton"`` (exact, see the module docstring; for
    the hinge an exact dual solve) or ``"lbfgs"`` (lr, strong Wolfe,
    ``max_iter`` iterations, tolerances as given, from B = 0).
    ``positions`` P: the optimum over ``B = B_ch (x) I_P`` only (one channel
    map at every position, CLAPP++'s ``b_structure=shared`` on equal grids;
    rows channel-major, :func:`channel_atoms`), by the same solvers on B_ch.
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
    d_z, d_c = z.shape[1], c.shape[1]
    if positions is not None:
        if positions < 1 or d_z % positions or d_c % positions:
            raise ValueError(f"positions={positions} must divide both dims {d_z} and {d_c}")
        terms = channel_atoms(terms, positions)
        d_z, d_c, lam = d_z // positions, d_c // positions, lam * positions
    out = [torch.zeros(d_z, d_c, dtype=DTYPE) for _ in range(n_groups)]
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
    if positions is not None:
        return tuple(torch.kron(bg, torch.eye(positions, dtype=DTYPE)) for bg in out)
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
