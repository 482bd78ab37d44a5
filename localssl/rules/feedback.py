"""The feedback map B of the CLAPP++ family (METHODS 2): dense, low-rank, in fp32 or bf16.

The score is u = z . (B c) with B a bias-free map from context space (d_c)
to layer space (d_z). With spatial dependence (METHODS 2.2) B is up to
8192 x 8192 per layer at full width, and its matmuls, gradient and AdamW
state cost more than the input-gradient pass that local training saves
(METHODS 2.2b). Two cheaper forms, both options, neither a default:

- low rank, B = U V^T with U (d_z x r) and V^T (r x d_c): r (d_z + d_c)
  parameters instead of d_z d_c, computed as U (V^T c) so that one sample
  costs 2 r (d_z + d_c) FLOPs forward instead of 2 d_z d_c;
- bf16: the matmul in bfloat16 from an fp32 master weight (cast on the way
  in; autograd casts the gradient back, so ``.grad`` and the optimizer's
  state stay fp32).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from localssl.rules.base import FEEDBACK_KINDS

#: The precisions the B matmul can run in (``b_dtype``), by name.
B_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Feedback(nn.Module):
    """The bias-free map B from context space (d_c) to layer space (d_z).

    ``kind``: trainable, identity or fixed (frozen at its random init).

    ``rank`` r > 0 with r < min(d_c, d_z): B = U V^T, stored as ``u`` (d_z x r)
    and ``v`` (r x d_c, i.e. V^T) and applied as U (V^T c). A rank of at least
    min(d_c, d_z) constrains nothing (U V^T then spans every d_z x d_c
    matrix) and saves nothing (r (d_z + d_c) >= d_z d_c once r >= d_z d_c /
    (d_z + d_c), i.e. from half the smaller dim on square B), so such a layer
    keeps the dense B: ``self.rank`` says which (0: dense).

    Init of the low-rank factors: V^T as the dense B's own init applied to
    d_c -> r (nn.Linear's Kaiming-uniform, U(-1/sqrt(d_c), 1/sqrt(d_c)),
    variance 1 / (3 d_c)) and U ~ U(-sqrt(3/r), sqrt(3/r)) (variance 1/r).
    An entry of U V^T is a sum of r independent products, so its variance is
    r (1/r) (1 / (3 d_c)) = 1 / (3 d_c): that of the dense init's entries,
    hence the same scale of B c and of the scores u at step 0. (The split
    keeps V^T c at the dense B c's per-coordinate scale and makes U
    variance-preserving; a Kaiming-uniform U, variance 1/(3r), would start B
    three times smaller in variance.)

    ``dtype`` "bf16": B c is computed in bfloat16 from the fp32 master
    parameters (each cast per call, gradients cast back to fp32 by
    autograd), and returned in the context's dtype. On a CPU without native
    bf16 (no avx512_bf16 / amx_bf16) torch emulates the bf16 matmul: it runs
    correctly but slower than fp32, so this option only pays where bf16 is
    native (recent x86 CPUs, CUDA).
    """

    def __init__(self, d_c: int, d_z: int, kind: str = "trainable", rank: int = 0, dtype: str = "fp32") -> None:
        super().__init__()
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"unknown feedback {kind!r}; valid: {', '.join(FEEDBACK_KINDS)}")
        if dtype not in B_DTYPES:
            raise ValueError(f"unknown b_dtype {dtype!r}; valid: {', '.join(B_DTYPES)}")
        if rank < 0:
            raise ValueError(f"b_rank must be >= 0 (0: dense B), got {rank}")
        self.kind = kind
        self.d_c, self.d_z = d_c, d_z
        self.dtype = dtype
        self.asked_rank = rank
        self.rank = rank if 0 < rank < min(d_c, d_z) else 0
        self.weight: nn.Parameter | None = None
        self.u: nn.Parameter | None = None
        self.v: nn.Parameter | None = None
        trainable = kind == "trainable"
        if kind == "identity":
            if d_c != d_z:
                raise ValueError(f"identity feedback needs equal dims, got context {d_c} and layer {d_z}")
            if rank:
                raise ValueError(f"b_rank={rank} needs a B matrix; feedback=identity has none")
        elif self.rank == 0:
            lin = nn.Linear(d_c, d_z, bias=False)  # default (Kaiming-uniform) init, as the reference
            self.weight = nn.Parameter(lin.weight.detach().clone(), requires_grad=trainable)
        else:
            v = nn.Linear(d_c, self.rank, bias=False).weight.detach().clone()  # variance 1 / (3 d_c)
            bound = math.sqrt(3.0 / self.rank)  # variance 1 / r: see the class docstring
            u = torch.empty(d_z, self.rank).uniform_(-bound, bound)
            self.u = nn.Parameter(u, requires_grad=trainable)
            self.v = nn.Parameter(v, requires_grad=trainable)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return c
        factors = [self.weight] if self.rank == 0 else [self.v, self.u]  # applied in this order
        out_dtype = c.dtype
        if self.dtype == "bf16":
            c = c.to(torch.bfloat16)
            factors = [w.to(torch.bfloat16) for w in factors]
        for w in factors:
            c = nn.functional.linear(c, w)  # low rank: V^T c (r numbers per sample), then U (V^T c)
        return c.to(out_dtype) if self.dtype == "bf16" else c

    def matrix(self) -> torch.Tensor:
        """B as a dense d_z x d_c matrix (U V^T for a low-rank B); for analysis, never in a training step."""
        if self.kind == "identity":
            return torch.eye(self.d_z)
        return self.weight if self.rank == 0 else self.u @ self.v

    def set_trainable(self, trainable: bool) -> None:
        """Freeze or free B (all its factors)."""
        for p in self.parameters():
            p.requires_grad_(trainable)
        self.kind = "trainable" if trainable else "fixed"

    def l2(self) -> torch.Tensor:
        """|B|_F^2, the penalty of ``b_l2``, on B itself whatever its form.

        Low rank: |U V^T|_F^2 = sum((U^T U) * (V^T V)^T) with r x r Gram
        matrices, O(r^2 (d_z + d_c)) instead of forming B; the same number as
        the dense penalty of the matrix U V^T.
        """
        if self.kind == "identity" or not any(p.requires_grad for p in self.parameters()):
            return torch.zeros(())
        if self.rank == 0:
            return self.weight.pow(2).sum()
        return ((self.u.t() @ self.u) * (self.v @ self.v.t())).sum()

    def extra_repr(self) -> str:
        form = f", rank={self.rank}" if self.rank else (f", rank={self.asked_rank} >= min dim: dense"
                                                        if self.asked_rank else "")
        return f"{self.d_c} -> {self.d_z}, kind={self.kind}{form}, dtype={self.dtype}"


def feedback_numel(d_c: int, d_z: int, rank: int = 0) -> int:
    """Parameters of a B from d_c to d_z (``rank`` as `Feedback` takes it): d_z d_c dense, r (d_z + d_c) low-rank."""
    r = rank if 0 < rank < min(d_c, d_z) else 0
    return d_z * d_c if r == 0 else r * (d_z + d_c)


def feedback_flops(d_c: int, d_z: int, rank: int = 0, trainable: bool = True) -> int:
    """FLOPs per sample of B c forward plus, for a trainable B, its weight gradient (a multiply-add is 2).

    Dense: 2 d_z d_c forward, 2 d_z d_c for dB = g c^T. Low rank, U (V^T c):
    2 r (d_c + d_z) forward; backward dU = g (V^T c)^T (2 d_z r), U^T g
    (2 d_z r) and dV^T = (U^T g) c^T (2 r d_c): 2 r (2 d_z + d_c). The
    gradient into c costs nothing: the context is detached. (The gradient
    into z of u = z . (B c) is B c itself, already computed.)
    """
    r = rank if 0 < rank < min(d_c, d_z) else 0
    if r == 0:
        return 2 * d_z * d_c * (2 if trainable else 1)
    return 2 * r * (d_c + d_z) + (2 * r * (2 * d_z + d_c) if trainable else 0)


__all__ = ["Feedback", "B_DTYPES", "feedback_numel", "feedback_flops"]
