"""The unified local loss of METHODS 2 for one layer of a deep linear network (METHODS 2 and 3).

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
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import DEFAULT_LAM

__all__ = ["LOSS_FUNCTIONS", "NEGATIVES", "fit_objective", "other_view", "scores", "unified_loss"]

LOSS_FUNCTIONS = ("logistic", "hinge", "linear", "type1")

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
