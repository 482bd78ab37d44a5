"""Deep linear networks: when does a local rule compute the BP gradient? (METHODS 3)

Everything here runs in float64 on the CPU.

Setting (METHODS 2 and 3). A batch holds 2B views: view 1 of B samples
stacked on view 2 of the same samples. Layer l computes
``h^l = act(W^l h^{l-1})`` with no bias (``act`` = identity, or ReLU where an
experiment says so). Its *local* loss is the unified loss of METHODS 2:

- ``z^l`` = readout of ``h^l`` (identity for MLPs; pooling + flatten for CNNs),
  gradient flows into W^l only (the layer input is detached);
- context ``c_i`` = the other view of sample i, *detached*: ``z^l`` of the other
  view (same-layer context, CLAPP++) or ``z^L`` of the other view (direct
  feedback, DFB);
- ``u_pos_i = z_i . (B c_i)`` and ``u_neg_i = z_{(i+1) mod 2B} . (B c_i)``
  (the reference implementation's negative: the next sample of the stacked
  batch, with the same context);
- loss ``L = mean_i l(u_pos_i, u_neg_i)`` with ``f`` one of
  logistic ``softplus(1-u_pos) + softplus(1+u_neg)``,
  hinge ``relu(1-u_pos) + relu(1+u_neg)``,
  linear ``u_neg - u_pos``, type-1 ``softplus(u_neg - u_pos)``.

Like the authors (METHODS 3) we use *separate* B for the two views by
default: samples of view 1 (contexts from view 2) use ``B_1``, samples of
view 2 use ``B_2`` (``shared_b=True`` uses one B for both). Each B is fitted
to the optimum of ``L + lam * sum_g |B_g|_F^2`` (lam = 0.01) for fixed W.

The global (BP) loss is the same loss at the top layer only, with its own
fitted ``B^L``, back-propagated to every W^l. The local gradient of W^l is
the gradient of L^l with respect to W^l alone.

Theorem 3.1: with M = W^L ... W^{l+1}, the top score is
``z^l' (M' B^L M) c^l``, so BP equals the local rule with B^l = M' B^L M. If
M is orthogonal, B -> M' B M is a bijection that preserves the Frobenius
norm (so the L2 penalty too), hence it maps the (unique, strictly convex)
top optimum onto the local optimum: local gradient == BP gradient.

Fitting B exactly (``fit="newton"``, the default). Every loss term is
``phi(a_k + s_k t_k)`` with ``t_k = p_k' B q_k`` for a left vector p_k (a
layer representation) and a right vector q_k (a context). By the
representer theorem the optimum lies in the span of the ``p_k q_k'``:
``B = sum_k beta_k p_k q_k'``, so ``t = K beta`` with the Gram matrix
``K_km = (p_k . p_m)(q_k . q_m)`` and ``|B|^2 = beta' K beta``. Stationarity
in B reads ``F(beta) = s * phi'(a + s K beta) / N + 2 lam beta = 0``, an
n-dimensional system (n = number of terms, 2B per view group for the
logistic loss) that damped Newton solves to machine precision in a few
steps, whatever the layer width. It is the Newton step in B space (push-
through identity), so the primal objective decreases monotonically. For
the linear f the solution is closed-form; for the hinge (not smooth) we
solve the SVM dual by coordinate descent and polish on the active set.
Under Theorem 3.1's assumptions K is the same at layer l and at the top,
so the local and top problems are the same n-dimensional problem.

``fit="lbfgs"`` reproduces the authors' procedure instead: torch L-BFGS on
B itself (lr 0.2, strong-Wolfe line search, up to 1000 iterations).
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
    "LOSS_FUNCTIONS",
    "GradientComparison",
    "LinearNet",
    "add_theory_parser",
    "broken",
    "compare_gradients",
    "dfb",
    "fit_b",
    "fit_objective",
    "init_weights",
    "make_views",
    "mnist_patch_views",
    "other_view",
    "projection",
    "single_thread",
    "synthetic_views",
    "theorem31",
    "theory_main",
    "unified_loss",
]

DTYPE = torch.float64
LOSS_FUNCTIONS = ("logistic", "hinge", "linear", "type1")
DEFAULT_LAM = 0.01

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


def other_view(h: Tensor) -> Tensor:
    """Row i -> row (i + B) mod 2B of a stacked (view 1; view 2) batch: the positive partner."""
    n = h.shape[0]
    if n % 2:
        raise ValueError(f"a stacked batch has an even number of rows, got {n}")
    return h.roll(n // 2, 0)


def _groups(n: int, shared: bool) -> list[Tensor]:
    """Sample indices per B: one group (shared B) or view 1 / view 2 (separate B, the authors')."""
    idx = torch.arange(n)
    return [idx] if shared else [idx[: n // 2], idx[n // 2:]]


def _context_map(c: Tensor, b: Sequence[Tensor]) -> Tensor:
    """Row i = B_{g(i)} c_i, with g(i) the group of sample i (B maps context space to layer space)."""
    n = c.shape[0]
    if len(b) == 1:
        return c @ b[0].T
    if len(b) != 2:
        raise ValueError(f"expected 1 (shared) or 2 (per view) B matrices, got {len(b)}")
    h = n // 2
    return torch.cat([c[:h] @ b[0].T, c[h:] @ b[1].T], 0)


def unified_loss(z: Tensor, c: Tensor, b: Sequence[Tensor], f: str = "logistic") -> Tensor:
    """The unified local loss of METHODS 2 for one layer, mean over the 2B samples.

    ``z`` (2B, d): the layer's representations (gradient flows through them);
    ``c`` (2B, d'): the context of each sample (row i = other view of sample
    i, already detached); ``b``: ``(B,)`` shared or ``(B_1, B_2)`` per view,
    each (d, d'). Negative of sample i: z of sample (i+1) mod 2B with the same
    context. The L2 penalty on B is not included (it does not depend on W).
    """
    bc = _context_map(c, b)
    u_pos = (z * bc).sum(1)
    u_neg = (z.roll(-1, 0) * bc).sum(1)  # row i = z_{(i+1) mod 2B}
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
                  lam: float = DEFAULT_LAM) -> Tensor:
    """What :func:`fit_b` minimises over B: ``unified_loss + lam * sum_g |B_g|_F^2``."""
    return unified_loss(z, c, b, f) + lam * sum((bg ** 2).sum() for bg in b)


# ---------------------------------------------------------------------------
# Fitting B to its optimum for fixed W (METHODS 3)
# ---------------------------------------------------------------------------


@dataclass
class _Terms:
    """Loss terms phi(a_k + s_k p_k' B q_k) of one B (see the module docstring)."""

    p: Tensor  # (n, d) left vectors (layer representations)
    q: Tensor  # (n, d') right vectors (contexts)
    a: Tensor  # (n,) offsets
    s: Tensor  # (n,) signs
    phi: str  # "softplus" | "relu" | "identity"


def _terms(z: Tensor, c: Tensor, idx: Tensor, f: str) -> _Terms:
    n = z.shape[0]
    zp, zn, q = z[idx], z[(idx + 1) % n], c[idx]
    m = len(idx)
    one = torch.ones(m, dtype=z.dtype)
    if f in ("logistic", "hinge", "linear"):
        # f(u_pos) term: phi(1 - u_pos); f(-u_neg) term: phi(1 + u_neg) (offset 0 for linear).
        off = 0.0 if f == "linear" else 1.0
        phi = {"logistic": "softplus", "hinge": "relu", "linear": "identity"}[f]
        return _Terms(torch.cat([zp, zn]), torch.cat([q, q]), torch.cat([one, one]) * off,
                      torch.cat([-one, one]), phi)
    if f == "type1":
        # softplus(u_neg - u_pos) = softplus((z_neg - z_pos)' B c).
        return _Terms(zn - zp, q, 0 * one, one, "softplus")
    raise ValueError(f"unknown loss function f={f!r}; valid: {', '.join(LOSS_FUNCTIONS)}")


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
        jac = (d2 / n_norm)[:, None] * k + 2 * lam * eye  # s^2 = 1
        delta = torch.linalg.solve(jac, -res)
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


def _fit_group_lbfgs(t: _Terms, n_norm: int, lam: float, lr: float, max_iter: int,
                     tolerance_grad: float, tolerance_change: float, history_size: int) -> Tensor:
    """The authors' fit: torch L-BFGS with strong-Wolfe line search on B itself, from B = 0."""
    b = torch.zeros(t.p.shape[1], t.q.shape[1], dtype=t.p.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([b], lr=lr, max_iter=max_iter, max_eval=None if max_iter is None else 2 * max_iter,
                            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change,
                            history_size=history_size, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        tt = ((t.p @ b) * t.q).sum(1)
        loss = _phi(t.phi, t.a + t.s * tt)[0].sum() / n_norm + lam * (b ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return b.detach()


def fit_b(z: Tensor, c: Tensor, f: str = "logistic", *, lam: float = DEFAULT_LAM, shared: bool = False,
          method: str = "newton", lr: float = 0.2, max_iter: int = 1000, tolerance_grad: float = 1e-12,
          tolerance_change: float = 1e-16, history_size: int = 100) -> tuple[Tensor, ...]:
    """B at the optimum of ``unified_loss(z, c, B, f) + lam |B|^2`` for fixed z, c (METHODS 3).

    ``z`` (2B, d), ``c`` (2B, d') detached. Returns ``(B,)`` if ``shared``
    else ``(B_1, B_2)`` for view-1 / view-2 samples, each (d, d').
    ``method``: ``"newton"`` (exact, see the module docstring; for the hinge
    an exact dual solve) or ``"lbfgs"`` (the authors': lr, strong Wolfe,
    ``max_iter`` iterations, tolerances as given).
    """
    if lam <= 0:
        raise ValueError("fit_b needs an L2 penalty lam > 0 (the optimum is unbounded otherwise)")
    z = z.detach().to(DTYPE)
    c = c.detach().to(DTYPE)
    n = z.shape[0]
    out = []
    for idx in _groups(n, shared):
        t = _terms(z, c, idx, f)
        if method == "lbfgs":
            out.append(_fit_group_lbfgs(t, n, lam, lr, max_iter, tolerance_grad, tolerance_change, history_size))
            continue
        if method != "newton":
            raise ValueError(f"unknown fit method {method!r}; valid: newton, lbfgs")
        k = (t.p @ t.p.T) * (t.q @ t.q.T)
        if t.phi == "identity":
            beta = -t.s / (2 * lam * n)  # closed form: F = s/N + 2 lam beta = 0
        elif t.phi == "relu":
            beta = _hinge_beta(t, k, n, lam)
        else:
            beta = _newton_beta(t, k, n, lam)
        out.append(t.p.T @ (beta[:, None] * t.q))  # B = sum_k beta_k p_k q_k'
    return tuple(out)


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
                      fit_kwargs: dict | None = None) -> GradientComparison:
    """Per-layer local gradient (METHODS 2) and BP gradient (METHODS 3) of W^l on one batch.

    ``net`` has ``weights`` (list of tensors) and ``layer(l, h, w=None)``;
    ``x`` is the stacked (view 1; view 2) input batch. ``context``: ``"same"``
    (the other view's ``z^l``, CLAPP++) or ``"dfb"`` (the other view's top
    ``z^L``, direct feedback; B^l then maps top space to layer space).
    ``readout`` maps a layer output to z (identity/flatten for MLPs, pooling
    for CNNs); ``top_readout`` is the readout of the global loss (defaults to
    ``readout``). Samples and negatives are the same for local and BP.
    """
    if context not in ("same", "dfb"):
        raise ValueError(f"unknown context {context!r}; valid: same, dfb")
    top_readout = readout if top_readout is None else top_readout
    kw = dict(lam=lam, shared=shared_b, method=fit, **(fit_kwargs or {}))
    weights = [w.detach().to(DTYPE).requires_grad_(True) for w in net.weights]
    n_layers = len(weights)
    x = x.detach().to(DTYPE)

    with torch.no_grad():
        hs = [x]
        for l in range(n_layers):
            hs.append(net.layer(l, hs[-1], weights[l]))
    z_top = top_readout(hs[-1])
    b_top = fit_b(z_top, other_view(z_top), f, **kw)

    # Global loss: the same loss at the top only, back-propagated (context detached).
    with torch.enable_grad():
        h = x
        for l in range(n_layers):
            h = net.layer(l, h, weights[l])
        zt = top_readout(h)
        loss = unified_loss(zt, other_view(zt).detach(), b_top, f)
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
                b = fit_b(z.detach(), c, f, **kw)
            loss_l = unified_loss(z, c, b, f)
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


def mnist_patch_views(mnist_dir: str | Path, n_samples: int = 1024, *, columns: str = "alternate",
                      preprocess: str = "normalize", split: str = "train") -> tuple[Tensor, Tensor]:
    """The authors' MNIST setting (METHODS 3): positive pairs of 14x14 patches, 196-d inputs.

    Each 28x28 image is cut into four 14x14 patches; the top and bottom patch
    of one column form a positive pair (view 1 = top, view 2 = bottom).
    ``columns``: ``"alternate"`` (our default: image i of the first
    ``n_samples`` gives its left-column pair if i is even, its right-column
    pair if odd, so both pairs kinds are used, every sample is a different
    image and so is every negative), ``"left"`` or ``"right"``.
    ``preprocess``: ``"normalize"`` (default: ``(x/255 - 0.1307) / 0.3081``,
    the usual torchvision MNIST normalisation), ``"scale"`` (x/255) or
    ``"center"`` (x/255 minus the per-pixel mean over all patches used).
    """
    from ..data.mnist import load_mnist

    images, _ = load_mnist(mnist_dir, split)
    if n_samples > len(images):
        raise ValueError(f"asked for {n_samples} MNIST samples, split {split!r} has {len(images)}")
    x = torch.from_numpy(images[:n_samples].astype(np.float64))
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
    v1, v2 = top.reshape(n_samples, 196) / 255.0, bottom.reshape(n_samples, 196) / 255.0
    if preprocess == "normalize":
        v1, v2 = (v1 - MNIST_MEAN) / MNIST_STD, (v2 - MNIST_MEAN) / MNIST_STD
    elif preprocess == "center":
        mean = torch.cat([v1, v2]).mean(0)
        v1, v2 = v1 - mean, v2 - mean
    elif preprocess != "scale":
        raise ValueError(f"unknown preprocess {preprocess!r}; valid: {', '.join(MNIST_PREPROCESS)}")
    return v1.contiguous(), v2.contiguous()


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


@_one_thread
def broken(*, f: str = "logistic", seeds: int | Sequence[int] = 5, mnist_dir: str | Path | None = None,
           n_batches: int | None = None, batch_size: int = 32, width: int | None = None, depth: int = 6,
           in_dim: int | None = None, lam: float = DEFAULT_LAM, shared_b: bool = False,
           settings: Sequence[str] = tuple(BROKEN_SETTINGS), preprocess: str = "normalize",
           columns: str = "alternate", fit: str = "newton") -> TheoryResult:
    """Theorem 3.1 with broken assumptions: default init, ReLU (orthogonal / default init).

    Per setting and layer: cosine(local dW^l, BP dW^l) averaged over batches,
    then mean and std over init seeds (``cosine_mean``, ``cosine_std_seeds``),
    and the mean over seeds of the std over batches. ``orthogonal`` (linear)
    is the control where the theorem holds. With ``mnist_dir``: the authors'
    setting (1024 MNIST patch pairs, batch 32, 196 -> 128 x 6) and their
    single-run figures as reference; otherwise synthetic 64-d views.
    """
    t0 = time.perf_counter()
    if mnist_dir is not None:
        width, in_dim, n_batches = width or 128, in_dim or 196, n_batches or 32
    else:
        width, n_batches = width or 64, n_batches or 8
        in_dim = in_dim or width
    v1, v2, data = make_views(mnist_dir=mnist_dir, n_samples=n_batches * batch_size, dim=in_dim,
                              preprocess=preprocess, columns=columns)
    widths = [in_dim] + [width] * depth
    seed_list = _seed_list(seeds)
    res = TheoryResult("broken", primary="cosine_mean",
                       config=dict(f=f, seeds=seed_list, n_batches=n_batches, batch_size=batch_size,
                                   widths=widths, lam=lam, shared_b=shared_b, fit=fit, data=data))
    batches = list(_batches(v1, v2, batch_size))
    for name in settings:
        init, relu = BROKEN_SETTINGS[name]
        per_seed_mean, per_seed_bstd, per_seed_norm = [], [], []
        for seed in seed_list:
            net = LinearNet(init_weights(widths, init, seed), relu=relu)
            cos = []
            norms = []
            for x in batches:
                errs = compare_gradients(net, x, f=f, lam=lam, fit=fit, shared_b=shared_b).errors()
                cos.append([e["cosine"] for e in errs])
                norms.append([e["norm_bp"] for e in errs])
            cos = np.array(cos)
            per_seed_mean.append(cos.mean(0))
            per_seed_bstd.append(cos.std(0))
            per_seed_norm.append(np.median(np.array(norms), 0))
        m, s = _summ(per_seed_mean)
        res.add(name, "cosine_mean", m)
        res.add(name, "cosine_std_seeds", s)
        res.add(name, "cosine_std_batches", np.mean(per_seed_bstd, 0))
        res.add(name, "median|dW_bp|", np.median(per_seed_norm, 0))
        if len(seed_list) > 1:
            res.per_seed[name] = [list(map(float, r)) for r in per_seed_mean]
    if mnist_dir is not None and depth == 6:
        res.reference = {k: v for k, v in AUTHORS_FIGURES.items() if k in settings}
    res.notes.append("ReLU is applied at every layer, including the top. Default init = nn.Linear's "
                     "kaiming-uniform U(-1/sqrt(fan_in), 1/sqrt(fan_in)).")
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
