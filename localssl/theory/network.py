"""The deep linear network, its init, and the local-vs-BP gradient of every W^l (METHODS 2 and 3).

Layer l computes ``h^l = act(W^l h^{l-1})`` with no bias (``act`` = identity,
or ReLU where an experiment says so); its local loss is :func:`.loss.unified_loss`
with B fitted by :func:`.fit.fit_b`.

The global (BP) loss is the same loss at the top layer only, with its own
fitted ``B^L``, back-propagated to every W^l. The local gradient of W^l is
the gradient of L^l with respect to W^l alone.

Theorem 3.1: with M = W^L ... W^{l+1}, the top score is
``z^l' (M' B^L M) c^l``, so BP equals the local rule with B^l = M' B^L M. If
M is orthogonal, B -> M' B M is a bijection that preserves the Frobenius
norm (so the L2 penalty too), hence it maps the (unique, strictly convex)
top optimum onto the local optimum: local gradient == BP gradient.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import DEFAULT_LAM, DTYPE
from .fit import fit_b
from .loss import other_view, unified_loss
from .metrics import grad_errors

__all__ = ["GradientComparison", "LayeredNet", "LinearNet", "compare_gradients", "init_weights"]


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
