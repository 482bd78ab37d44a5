"""Replay of the authors' broken-assumption run: their draw order and warm-started B fits (METHODS 3).

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

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .common import AUTHORS_SEED, DTYPE
from .fit import fit_b_authors

__all__ = ["AuthorsDraw", "authors_draw"]


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
