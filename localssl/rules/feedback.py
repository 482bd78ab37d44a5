"""The feedback map B of the CLAPP++ family (METHODS 2): dense, low-rank, shared across positions, fp32 or bf16.

The score is u = z . (B c) with B a bias-free map from context space (d_c)
to layer space (d_z). With spatial dependence (METHODS 2.2) B is up to
8192 x 8192 per layer at full width, and its matmuls, gradient and AdamW
state cost more than the input-gradient pass that local training saves
(METHODS 2.2b). Two cheaper forms, both options, neither a default:

- low rank, B = U V^T with U (d_z x r) and V^T (r x d_c): r (d_z + d_c)
  parameters instead of d_z d_c, computed as U (V^T c) so that one sample
  costs 2 r (d_z + d_c) FLOPs forward instead of 2 d_z d_c;
- shared across positions ("shared"): one C_z x C_c channel map applied at
  every pooled cell, i.e. B = B_ch (x) M with M the fixed map from the
  context's grid to the layer's (identity on same-layer context), plus,
  with a rank r, a low-rank U V^T that couples positions. C_z C_c + r (d_z +
  d_c) parameters; the score still depends on where a feature sits (the
  gradient into z at cell p is B_ch c_p, not one vector for every cell as
  with global pooling), which is the spatial dependence of METHODS 2.2 in
  its cheapest form;
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
#: The forms of B (``b_structure``): any matrix (or U V^T with a rank), or a channel map shared by every cell.
B_STRUCTURES = ("dense", "shared")


def _grid_map(g_c: int, g_z: int) -> tuple[int, int]:
    """(down, up): the context grid g_c reaches the layer grid g_z by mean-pooling ``down`` x ``down`` cells
    and then repeating each cell ``up`` x ``up`` times (one of the two is 1); ValueError if neither divides."""
    if g_z % g_c == 0:
        return 1, g_z // g_c
    if g_c % g_z == 0:
        return g_c // g_z, 1
    raise ValueError(f"b_structure=shared maps a {g_c}x{g_c} context grid onto the layer's {g_z}x{g_z} grid: "
                     "one must divide the other")


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

    ``structure`` "shared" (with ``c_layout`` and ``z_layout``, each
    (channels, grid) of the pooled, channel-major flattened vectors): B =
    B_ch (x) M (+ U V^T with ``rank`` r), ``channel`` = B_ch (C_z x C_c,
    nn.Linear's init: at every cell (B c) has the dense init's scale at step
    0) and M (`position_map`) the fixed map from the context grid to the
    layer grid: identity when they are equal (same-layer context), each
    layer cell reading the context cell it lies in when the context is
    coarser (DFB's top layer), the mean of the context cells it covers when
    finer. With a coupling, the channel map and U each start at the scale
    above times 1/sqrt(2), so that B c keeps the dense init's variance.
    On grids of one cell a channel map is every matrix: the dense B is kept.

    ``dtype`` "bf16": B c is computed in bfloat16 from the fp32 master
    parameters (each cast per call, gradients cast back to fp32 by
    autograd), and returned in the context's dtype. On a CPU without native
    bf16 (no avx512_bf16 / amx_bf16) torch emulates the bf16 matmul: it runs
    correctly but slower than fp32, so this option only pays where bf16 is
    native (recent x86 CPUs, CUDA).
    """

    def __init__(self, d_c: int, d_z: int, kind: str = "trainable", rank: int = 0, dtype: str = "fp32",
                 structure: str = "dense", c_layout: tuple[int, int] | None = None,
                 z_layout: tuple[int, int] | None = None) -> None:
        super().__init__()
        if structure not in B_STRUCTURES:
            raise ValueError(f"unknown b_structure {structure!r}; valid: {', '.join(B_STRUCTURES)}")
        if structure == "shared" and c_layout is not None and z_layout is not None \
                and int(c_layout[1]) == int(z_layout[1]) == 1:
            structure = "dense"  # one cell: a channel map is every matrix, so this is the dense B (or U V^T)
        if structure == "shared":
            self._init_shared(d_c, d_z, kind, rank, dtype, c_layout, z_layout)
            return
        self.structure = "dense"
        self.channel: nn.Parameter | None = None
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

    def _init_shared(self, d_c: int, d_z: int, kind: str, rank: int, dtype: str,
                     c_layout: tuple[int, int] | None, z_layout: tuple[int, int] | None) -> None:
        """B = B_ch (x) M + U V^T (the class docstring of `Feedback`; ``structure`` "shared")."""
        if kind not in FEEDBACK_KINDS:
            raise ValueError(f"unknown feedback {kind!r}; valid: {', '.join(FEEDBACK_KINDS)}")
        if kind == "identity":
            raise ValueError("b_structure=shared needs a B matrix; feedback=identity has none")
        if c_layout is None or z_layout is None:
            raise ValueError("b_structure=shared needs the (channels, grid) layout of the context and the layer")
        (cc, gc), (cz, gz) = (tuple(int(v) for v in c_layout), tuple(int(v) for v in z_layout))
        if cc * gc * gc != d_c or cz * gz * gz != d_z:
            raise ValueError(f"layouts {c_layout} -> {z_layout} do not give the dims {d_c} -> {d_z}")
        if dtype not in B_DTYPES:
            raise ValueError(f"unknown b_dtype {dtype!r}; valid: {', '.join(B_DTYPES)}")
        if rank < 0:
            raise ValueError(f"b_rank must be >= 0 (0: no coupling term), got {rank}")
        self.structure = "shared"
        self.kind, self.dtype, self.asked_rank = kind, dtype, rank
        self.d_c, self.d_z = d_c, d_z
        self.c_layout, self.z_layout = (cc, gc), (cz, gz)
        self.down, self.up = _grid_map(gc, gz)
        trainable = kind == "trainable"
        self.rank = rank if 0 < rank < min(d_c, d_z) else 0
        if rank and self.rank == 0:
            raise ValueError(f"b_rank={rank} with b_structure=shared: a coupling of rank >= min(d_c, d_z) "
                             f"= {min(d_c, d_z)} is a dense B; use b_structure=dense")
        # The channel map: nn.Linear(C_c, C_z)'s init, so that (B c) at a cell has the dense B's scale at
        # step 0; with a coupling, each of the two terms gets half that variance (both random: a zero factor
        # would leave the other without gradient on the first step).
        split = 0.5 ** 0.5 if self.rank else 1.0
        lin = nn.Linear(cc, cz, bias=False)
        self.channel = nn.Parameter(lin.weight.detach().clone() * split, requires_grad=trainable)
        self.weight = None
        self.u = self.v = None
        if self.rank:  # the low-rank B's init (dense variance; class docstring), times the split
            v = nn.Linear(d_c, self.rank, bias=False).weight.detach().clone()
            bound = math.sqrt(3.0 / self.rank)
            u = torch.empty(d_z, self.rank).uniform_(-bound, bound) * split
            self.u = nn.Parameter(u, requires_grad=trainable)
            self.v = nn.Parameter(v, requires_grad=trainable)

    def _shared(self, c: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
        """(B_ch (x) M) c for rows c of d_c = C_c g_c^2 numbers (channel-major, as `spatial_pool` flattens)."""
        (cc, gc), (cz, gz) = self.c_layout, self.z_layout
        x = self._down(c.reshape(-1, cc, gc, gc))
        # The channel map at every cell of the smaller grid, before any repeat (the two commute).
        x = self._up(torch.einsum("oc,nchw->nohw", channel, x))
        return x.reshape(c.shape[0], cz * gz * gz)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """Context finer than the layer: the mean over the context cells each layer cell covers."""
        return nn.functional.avg_pool2d(x, self.down) if self.down > 1 else x

    def _up(self, x: torch.Tensor) -> torch.Tensor:
        """Context coarser than the layer: each layer cell reads the context cell it lies in."""
        if self.up == 1:
            return x
        return x.repeat_interleave(self.up, dim=2).repeat_interleave(self.up, dim=3)

    def _forward_shared(self, c: torch.Tensor) -> torch.Tensor:
        ws = [self.channel] if self.rank == 0 else [self.channel, self.v, self.u]
        out_dtype = c.dtype
        if self.dtype == "bf16":
            c = c.to(torch.bfloat16)
            ws = [w.to(torch.bfloat16) for w in ws]
        out = self._shared(c, ws[0])
        if self.rank:
            out = out + nn.functional.linear(nn.functional.linear(c, ws[1]), ws[2])
        return out.to(out_dtype) if self.dtype == "bf16" else out

    def position_map(self) -> torch.Tensor:
        """M (g_z^2 x g_c^2): how each layer cell reads the context's cells (structure "shared")."""
        gc, gz = self.c_layout[1], self.z_layout[1]
        cells = torch.eye(gc * gc).reshape(gc * gc, 1, gc, gc)  # each context cell alone, as one channel
        m = self._up(self._down(cells)).reshape(gc * gc, gz * gz).t()
        return torch.empty(m.shape, dtype=self.channel.dtype, device=self.channel.device).copy_(m)  # plain strides

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return c
        if self.structure == "shared":
            return self._forward_shared(c)
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
        if self.structure == "shared":
            # Channel-major rows (o, p_z) and columns (c, p_c): B_ch[o, c] M[p_z, p_c] is torch.kron's order.
            b = torch.kron(self.channel, self.position_map())
            return b if self.rank == 0 else b + self.u @ self.v
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
        if self.structure == "shared":
            # |B_ch (x) M + U V^T|^2 = |B_ch|^2 |M|^2 + 2 <B_ch (x) M, U V^T> + |U V^T|^2, and the cross
            # term is sum_k u_k . ((B_ch (x) M) v_k): the shared map applied to the rows of V^T.
            m2 = self.position_map().pow(2).sum()
            pen = self.channel.pow(2).sum() * m2
            if self.rank:
                pen = pen + 2 * (self._shared(self.v, self.channel) * self.u.t()).sum()
                pen = pen + ((self.u.t() @ self.u) * (self.v @ self.v.t())).sum()
            return pen
        if self.rank == 0:
            return self.weight.pow(2).sum()
        return ((self.u.t() @ self.u) * (self.v @ self.v.t())).sum()

    def extra_repr(self) -> str:
        if self.structure == "shared":
            (cc, gc), (cz, gz) = self.c_layout, self.z_layout
            couple = f" + rank-{self.rank} coupling" if self.rank else ""
            return (f"{self.d_c} -> {self.d_z}, kind={self.kind}, shared {cc} -> {cz} channel map over "
                    f"{gc}x{gc} -> {gz}x{gz} cells{couple}, dtype={self.dtype}")
        form = f", rank={self.rank}" if self.rank else (f", rank={self.asked_rank} >= min dim: dense"
                                                        if self.asked_rank else "")
        return f"{self.d_c} -> {self.d_z}, kind={self.kind}{form}, dtype={self.dtype}"


def feedback_numel(d_c: int, d_z: int, rank: int = 0, channels: tuple[int, int] | None = None) -> int:
    """Parameters of a B from d_c to d_z (``rank`` as `Feedback` takes it): d_z d_c dense, r (d_z + d_c) low-rank;
    ``channels`` (C_c, C_z) for b_structure=shared: C_z C_c for the channel map, plus r (d_z + d_c) with a rank."""
    r = rank if 0 < rank < min(d_c, d_z) else 0
    if channels is not None:
        return channels[0] * channels[1] + r * (d_z + d_c)
    return d_z * d_c if r == 0 else r * (d_z + d_c)


def shared_feedback_flops(c_layout: tuple[int, int], z_layout: tuple[int, int], rank: int = 0,
                          trainable: bool = True) -> int:
    """FLOPs per sample of a shared B (b_structure=shared) forward plus, trainable, its weight gradients.

    The channel map runs at the smaller of the two grids (P = min(g_c, g_z)^2 cells; the repeat or the mean
    to the other grid is not a matmul): 2 C_z C_c P forward, as much again for dB_ch; the coupling U V^T
    costs what `feedback_flops` says of a rank-r B.
    """
    (cc, gc), (cz, gz) = c_layout, z_layout
    cells = min(gc, gz) ** 2
    d_c, d_z = cc * gc * gc, cz * gz * gz
    flops = 2 * cz * cc * cells * (2 if trainable else 1)
    return flops + (feedback_flops(d_c, d_z, rank, trainable) if 0 < rank < min(d_c, d_z) else 0)


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


__all__ = ["Feedback", "B_DTYPES", "B_STRUCTURES", "feedback_numel", "feedback_flops", "shared_feedback_flops"]
