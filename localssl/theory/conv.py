"""Proposition 3.5: spatial dependence in a linear CNN (METHODS 2.2 and 3).

A linear CNN is a deep linear network whose matrices are the unrolled
convolution operators. With pooling kernel 1 the local loss sees the whole
flattened map ``z^l = vec(h^l)`` and ``B^l`` is a dense ``CHW x CHW`` matrix,
so Theorem 3.1 applies verbatim: if every unrolled operator ``M`` between
layer l and the top is orthogonal, ``B^l = M' B^L M`` is the local optimum
and the local gradient of the conv kernel equals the BP gradient of the same
(spatial, kernel-1) loss at the top. With global pooling ``z^l`` is the
channel mean and ``B^l`` is ``C x C``: it cannot represent ``M' B^L M``,
which couples positions, so the local gradient (the same at every position)
differs from the BP gradient.

Construction whose assumptions hold exactly (documented choice): 3x3
convolutions with *circular* padding, equal channel counts, built as a
product of orthogonal factors

    K = Q0 * prod_j [(I - P_j) + P_j T_{o_j}],   o_j in {(0,+1), (0,-1), (+1,0), (-1,0)}

where Q0 is a random orthogonal C x C matrix, P_j random rank-C/2
orthogonal projections and T_o the circular shift by o. Each factor is
orthogonal because ``P(I - P) = 0`` and ``T`` is a permutation that
commutes with channel mixing; the product of the four shift polynomials has
offsets in {-1, 0, 1}^2, i.e. a 3x3 kernel. (This is the block-orthogonal
convolution construction of Xiao et al. 2018 / BCOP.) The experiment checks
``|M'M - I|`` of the unrolled operator numerically.

Side result, reported too: with circular padding everything is translation-
equivariant and global pooling commutes with the convolutions (pooled
top = K(1) pooled layer-l, with K(1) = sum of the kernel taps, orthogonal as
the zero-frequency block of an orthogonal circular operator), so a
global-pooling local loss *is* exact against a global-pooling top loss. The
non-exactness of global pooling is with respect to the spatial BP loss.
Zero padding breaks orthogonality and with it the exactness of kernel 1.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import DEFAULT_LAM, DTYPE, _one_thread, _seed_list, compare_gradients
from .report import TheoryResult

__all__ = ["ConvNet", "conv", "orthogonal_conv_kernel", "unrolled_operator"]


def _random_orthogonal(n: int, g: torch.Generator) -> Tensor:
    w = torch.empty(n, n, dtype=DTYPE)
    return torch.nn.init.orthogonal_(w, generator=g)


def orthogonal_conv_kernel(channels: int, *, generator: torch.Generator | None = None) -> Tensor:
    """A (C, C, 3, 3) kernel whose circular-padding conv operator is exactly orthogonal (see module doc)."""
    g = generator or torch.Generator().manual_seed(0)
    eye = torch.eye(channels, dtype=DTYPE)
    poly: dict[tuple[int, int], Tensor] = {(0, 0): _random_orthogonal(channels, g)}
    for off in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        u = _random_orthogonal(channels, g)[:, : max(1, channels // 2)]
        p = u @ u.T  # orthogonal projection
        factor = {(0, 0): eye - p, off: p}
        out: dict[tuple[int, int], Tensor] = {}
        for (a0, a1), ma in poly.items():  # polynomial product in the shift operators
            for (b0, b1), mb in factor.items():
                key = (a0 + b0, a1 + b1)
                out[key] = out.get(key, 0) + ma @ mb
        poly = out
    w = torch.zeros(channels, channels, 3, 3, dtype=DTYPE)
    for (oy, ox), m in poly.items():
        # conv2d is a cross-correlation: tap (ky, kx) reads x(p + (ky-1, kx-1)), i.e. applies T_(ky-1, kx-1).
        w[:, :, oy + 1, ox + 1] = m
    return w


@dataclass
class ConvNet:
    """Bias-free CNN of 3x3 convs, stride 1, padding 1 (``"circular"`` or ``"zeros"``), optional ReLU."""

    weights: list[Tensor]
    padding: str = "circular"
    relu: bool = False

    def layer(self, l: int, h: Tensor, w: Tensor | None = None) -> Tensor:
        w = self.weights[l] if w is None else w
        if self.padding == "circular":
            a = F.conv2d(F.pad(h, (1, 1, 1, 1), mode="circular"), w)
        elif self.padding == "zeros":
            a = F.conv2d(h, w, padding=1)
        else:
            raise ValueError(f"unknown padding {self.padding!r}; valid: circular, zeros")
        return F.relu(a) if self.relu else a

    def __len__(self) -> int:
        return len(self.weights)


def unrolled_operator(net: ConvNet, l: int, shape: tuple[int, int, int]) -> Tensor:
    """The (CHW x CHW) matrix of layer ``l``'s convolution (linear nets only)."""
    d = int(np.prod(shape))
    basis = torch.eye(d, dtype=DTYPE).reshape(d, *shape)
    with torch.no_grad():
        return net.layer(l, basis).reshape(d, -1).T


def _spatial(h: Tensor) -> Tensor:  # pooling kernel 1: the whole map, flattened
    return h.flatten(1)


def _global(h: Tensor) -> Tensor:  # global average pooling (original CLAPP)
    return h.mean((2, 3))


@_one_thread
def conv(*, f: str = "logistic", seeds: int | Sequence[int] = 3, n_batches: int = 4, batch_size: int = 16,
         channels: int = 4, size: int = 6, depth: int = 3, lam: float = DEFAULT_LAM, shared_b: bool = False,
         fit: str = "newton") -> TheoryResult:
    """Proposition 3.5 on a linear CNN with exactly orthogonal 3x3 circular convs (synthetic views).

    Settings (cosine and errors of local vs BP dW per layer, over batches and seeds):
    - ``kernel1``: local loss with pooling kernel 1 vs BP of the kernel-1 top loss (exact);
    - ``global``: local loss with global pooling vs the same BP (not exact);
    - ``global/globalBP``: global pooling for both (exact here, see the module doc);
    - ``kernel1-zeropad``: kernel 1 but zero padding (operator not orthogonal: not exact).
    """
    t0 = time.perf_counter()
    seed_list = _seed_list(seeds)
    shape = (channels, size, size)
    gd = torch.Generator().manual_seed(12345)
    n = n_batches * batch_size
    s = torch.randn(n, *shape, generator=gd, dtype=DTYPE)
    v1 = s + 0.5 * torch.randn(n, *shape, generator=gd, dtype=DTYPE)
    v2 = s + 0.5 * torch.randn(n, *shape, generator=gd, dtype=DTYPE)
    settings = {
        "kernel1": ("circular", _spatial, _spatial),
        "global": ("circular", _global, _spatial),
        "global/globalBP": ("circular", _global, _global),
        "kernel1-zeropad": ("zeros", _spatial, _spatial),
    }
    res = TheoryResult("conv", primary="cosine_mean",
                       config=dict(f=f, seeds=seed_list, n_batches=n_batches, batch_size=batch_size,
                                   input=list(shape), depth=depth, kernel="3x3 block-orthogonal, stride 1",
                                   lam=lam, shared_b=shared_b, fit=fit,
                                   data="synthetic Gaussian views s + 0.5 e (C, H, W)"))
    orth_err = 0.0
    acc: dict[str, list[list[dict]]] = {k: [] for k in settings}
    for seed in seed_list:
        g = torch.Generator().manual_seed(int(seed))
        weights = [orthogonal_conv_kernel(channels, generator=g) for _ in range(depth)]
        for padding in ("circular",):
            net = ConvNet(weights, padding)
            for l in range(depth):
                m = unrolled_operator(net, l, shape)
                orth_err = max(orth_err, float((m.T @ m - torch.eye(m.shape[0], dtype=DTYPE)).abs().max()))
        for i in range(n_batches):
            x = torch.cat([v1[i * batch_size:(i + 1) * batch_size], v2[i * batch_size:(i + 1) * batch_size]])
            for name, (padding, ro, top) in settings.items():
                cmp = compare_gradients(ConvNet(weights, padding), x, f=f, readout=ro, top_readout=top,
                                        lam=lam, fit=fit, shared_b=shared_b)
                acc[name].append(cmp.errors())
    for name, rows in acc.items():
        cos = np.array([[e["cosine"] for e in r] for r in rows])
        res.add(name, "cosine_mean", cos.mean(0))
        res.add(name, "1-cos_max", (1 - cos).max(0))
        res.add(name, "max_rel_err", np.array([[e["max_rel_err"] for e in r] for r in rows]).max(0))
        res.add(name, "rel_frob_err", np.array([[e["rel_frob_err"] for e in r] for r in rows]).mean(0))
    res.config["max|M'M-I| (circular)"] = orth_err
    res.notes.append("BP reference = the same loss at the top with the pooling named after the '/' "
                     "(kernel 1 unless stated). Circular padding makes the unrolled 3x3 operators exactly "
                     "orthogonal; global pooling is then exact against a global-pooling top loss too.")
    res.runtime_s = time.perf_counter() - t0
    return res
