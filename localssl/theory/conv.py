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

One channel map at every position (issue 14; CLAPP++'s ``b_structure=shared``
on equal grids): ``B^l = B_ch (x) I_P``, a ``C x C`` map applied at each of
the P = HW positions (rows channel-major, index ``c P + p``, as
``h.flatten(1)`` lays them out), fitted at its optimum over that set
(:func:`.fit.fit_b` with ``positions``). Two settings:

- ``kernel1-chanB``: every local B^l restricted (the top layer's too), BP's
  top B dense. Not exact: the local optimum would need ``M' B^L M``, and the
  unrolled 3x3 operators couple neighbouring positions.
- ``kernel1-chanB/chanBP``: BP's top B restricted too. Rank.py's point 1
  would make it exact if ``B -> M' B M`` mapped the set ``{B_ch (x) I_P}``
  onto itself. It does not: ``M = sum_o K_o (x) T_o`` (block-circulant, the
  3x3 taps K_o times the circular shifts T_o), so ``M^T (A (x) I) M =
  sum_{o,o'} (K_o^T A K_{o'}) (x) T_{o'-o}`` has blocks at shifts ``o'-o != 0``
  whose sum does not cancel for a generic A; equivalently the top statistic
  ``sum_p z^L_p c^L_p'`` reads the layer's cross-correlations at non-zero
  shifts, which the layer's own ``sum_p z_p c_p'`` does not see. The setting
  reports the measured relative distance of ``M' B^L M`` from the set
  (``dist_MBM_from_set``: 0 would mean invariance) next to the cosine. Two
  special cases do stay in the set: ``A = a I`` (``M'M = I``), and any A when
  every conv is 1x1 (M = K (x) I_P), where chanBP is then exact.

"chanB" means one channel map shared by all positions (b_structure=shared); the experiments' ``shared_b``
(one B for both views) is another choice and combines with it.

For the linear f the fit objective is ``lam |B - B*|^2 + const`` (rank.py),
so the restricted optimum is the Frobenius projection of the dense optimum
B* onto the set: ``B_ch[a, b] = (1/P) sum_p B*[a P + p, b P + p]``, the mean
of the diagonals of B*'s P x P blocks (:func:`shared_projection`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .fit import fit_b
from .linear import DEFAULT_LAM, DTYPE, _one_thread, _seed_list, compare_gradients
from .report import TheoryResult

__all__ = ["ConvNet", "conv", "distance_from_shared", "orthogonal_conv_kernel", "shared_fitter",
           "shared_projection", "unrolled_operator"]


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


def _spatial_bp(h: Tensor) -> Tensor:
    """:func:`_spatial` as the top readout of a setting whose local B's differ from BP's top B: a distinct
    function, so that :func:`compare_gradients` fits the top layer's local B instead of reusing BP's."""
    return h.flatten(1)


def _global(h: Tensor) -> Tensor:  # global average pooling (original CLAPP)
    return h.mean((2, 3))


def shared_projection(b: Tensor, positions: int) -> Tensor:
    """``B_ch (x) I_P`` nearest to ``b`` in Frobenius norm: B_ch = the mean diagonal of b's P x P blocks.

    The restricted optimum for the linear f (module docstring); rows and
    columns channel-major (index ``c P + p``).
    """
    cz, cc = b.shape[0] // positions, b.shape[1] // positions
    b_ch = torch.einsum("apbp->ab", b.reshape(cz, positions, cc, positions)) / positions
    return torch.kron(b_ch, torch.eye(positions, dtype=b.dtype))


def shared_fitter(restrict: str, positions: int, *, f: str, lam: float = DEFAULT_LAM, shared_b: bool = False,
                  fit: str = "newton") -> Callable[[Any, Tensor, Tensor], tuple[Tensor, ...]] | None:
    """A :func:`compare_gradients` fitter with B = B_ch (x) I_P at the local losses (``restrict="local"``)
    or everywhere, BP's top B too (``"all"``); ``"none"``: None, every B dense."""
    if restrict not in ("none", "local", "all"):
        raise ValueError(f"unknown restriction {restrict!r}; valid: none, local, all")
    if restrict == "none":
        return None

    def fitter(key: Any, z: Tensor, c: Tensor) -> tuple[Tensor, ...]:
        restricted = restrict == "all" or key != "top"
        return fit_b(z, c, f, lam=lam, shared=shared_b, method=fit, positions=positions if restricted else None)
    return fitter


def distance_from_shared(b: Tensor, positions: int) -> float:
    """|b - its projection onto {B_ch (x) I_P}| / |b|: 0 iff b is one channel map at every position."""
    return float(torch.linalg.norm(b - shared_projection(b, positions)) / torch.linalg.norm(b))


@_one_thread
def conv(*, f: str = "logistic", seeds: int | Sequence[int] = 3, n_batches: int = 4, batch_size: int = 16,
         channels: int = 4, size: int = 6, depth: int = 3, lam: float = DEFAULT_LAM, shared_b: bool = False,
         fit: str = "newton") -> TheoryResult:
    """Proposition 3.5 on a linear CNN with exactly orthogonal 3x3 circular convs (synthetic views).

    Settings (cosine and errors of local vs BP dW per layer, over batches and seeds):
    - ``kernel1``: local loss with pooling kernel 1 vs BP of the kernel-1 top loss (exact);
    - ``global``: local loss with global pooling vs the same BP (not exact);
    - ``global/globalBP``: global pooling for both (exact here, see the module doc);
    - ``kernel1-zeropad``: kernel 1 but zero padding (operator not orthogonal: not exact);
    - ``kernel1-chanB``: kernel 1 with every local B = B_ch (x) I_P at its optimum over that set, BP's
      top B dense (not exact);
    - ``kernel1-chanB/chanBP``: BP's top B restricted too (not exact either: the module doc), with
      ``dist_MBM_from_set``, the relative distance of the effective ``M' B^L M`` from the set.
    """
    t0 = time.perf_counter()
    seed_list = _seed_list(seeds)
    shape = (channels, size, size)
    gd = torch.Generator().manual_seed(12345)
    n = n_batches * batch_size
    s = torch.randn(n, *shape, generator=gd, dtype=DTYPE)
    v1 = s + 0.5 * torch.randn(n, *shape, generator=gd, dtype=DTYPE)
    v2 = s + 0.5 * torch.randn(n, *shape, generator=gd, dtype=DTYPE)
    positions = size * size
    # name: (padding, local readout, top readout, which B's are B_ch (x) I_P: none, the local ones, all)
    settings = {
        "kernel1": ("circular", _spatial, _spatial, "none"),
        "global": ("circular", _global, _spatial, "none"),
        "global/globalBP": ("circular", _global, _global, "none"),
        "kernel1-zeropad": ("zeros", _spatial, _spatial, "none"),
        "kernel1-chanB": ("circular", _spatial, _spatial_bp, "local"),
        "kernel1-chanB/chanBP": ("circular", _spatial, _spatial, "all"),
    }
    res = TheoryResult("conv", primary="cosine_mean",
                       config=dict(f=f, seeds=seed_list, n_batches=n_batches, batch_size=batch_size,
                                   input=list(shape), depth=depth, kernel="3x3 block-orthogonal, stride 1",
                                   lam=lam, shared_b=shared_b, fit=fit,
                                   data="synthetic Gaussian views s + 0.5 e (C, H, W)"))
    orth_err = 0.0
    acc: dict[str, list[list[dict]]] = {k: [] for k in settings}
    dist_from_set: list[list[float]] = []
    for seed in seed_list:
        g = torch.Generator().manual_seed(int(seed))
        weights = [orthogonal_conv_kernel(channels, generator=g) for _ in range(depth)]
        net = ConvNet(weights, "circular")
        ops = [unrolled_operator(net, l, shape) for l in range(depth)]
        for m in ops:
            orth_err = max(orth_err, float((m.T @ m - torch.eye(m.shape[0], dtype=DTYPE)).abs().max()))
        above = [torch.eye(ops[0].shape[0], dtype=DTYPE)]  # M = W^L ... W^{l+1}, from the top down
        for m in reversed(ops[1:]):
            above.insert(0, above[0] @ m)
        for i in range(n_batches):
            x = torch.cat([v1[i * batch_size:(i + 1) * batch_size], v2[i * batch_size:(i + 1) * batch_size]])
            for name, (padding, ro, top, restrict) in settings.items():
                cmp = compare_gradients(ConvNet(weights, padding), x, f=f, readout=ro, top_readout=top,
                                        lam=lam, fit=fit, shared_b=shared_b,
                                        fitter=shared_fitter(restrict, positions, f=f, lam=lam,
                                                             shared_b=shared_b, fit=fit))
                acc[name].append(cmp.errors())
                if restrict == "all":  # the B that BP effectively applies at layer l: M' B^L M
                    dist_from_set.append([max(distance_from_shared(m.T @ b @ m, positions) for b in cmp.b_top)
                                          for m in above])
    for name, rows in acc.items():
        cos = np.array([[e["cosine"] for e in r] for r in rows])
        res.add(name, "cosine_mean", cos.mean(0))
        res.add(name, "1-cos_max", (1 - cos).max(0))
        res.add(name, "max_rel_err", np.array([[e["max_rel_err"] for e in r] for r in rows]).max(0))
        res.add(name, "rel_frob_err", np.array([[e["rel_frob_err"] for e in r] for r in rows]).mean(0))
    res.add("kernel1-chanB/chanBP", "dist_MBM_from_set", np.max(dist_from_set, 0))
    res.config["max|M'M-I| (circular)"] = orth_err
    res.notes.append("BP reference = the same loss at the top with the pooling named after the '/' "
                     "(kernel 1 unless stated). Circular padding makes the unrolled 3x3 operators exactly "
                     "orthogonal; global pooling is then exact against a global-pooling top loss too.")
    res.notes.append("chanB: every local B = B_ch (x) I_P (one channel map at every position, "
                     "b_structure=shared) at its optimum over that set, BP's top B dense; chanBP: BP's top B "
                     "restricted too. dist_MBM_from_set: max |M'B^L M - nearest B_ch (x) I| / |M'B^L M| "
                     "(0 would make chanBP exact, as a rank limit at the top is).")
    res.runtime_s = time.perf_counter() - t0
    return res
