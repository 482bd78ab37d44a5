"""Loss functions: pure functions of tensors, no optimizer, config or logger.

METHODS 2: at every layer a score u = z . (B c) is computed for a positive pair
(z and c from two views of the same image) and for a negative (z of another
image, with the same context c). A decreasing function f turns the two scores
into a loss. The reference implementation takes as the negative for row i of
the stacked 2B batch the row (i + 1) mod 2B; for B >= 2 that is always another
image.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from localssl.registry import Registry

# f(u_pos, u_neg) -> per-sample loss. Each is decreasing in u_pos and
# increasing in u_neg.
CONTRASTIVE_F: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("loss function f")


@CONTRASTIVE_F.register("hinge")
def hinge(u_pos: torch.Tensor, u_neg: torch.Tensor) -> torch.Tensor:
    """CLAPP's hinge: relu(1 - u_pos) + relu(1 + u_neg)."""
    return F.relu(1 - u_pos) + F.relu(1 + u_neg)


@CONTRASTIVE_F.register("softplus")
def softplus(u_pos: torch.Tensor, u_neg: torch.Tensor) -> torch.Tensor:
    """Logistic loss: softplus(1 - u_pos) + softplus(1 + u_neg)."""
    return F.softplus(1 - u_pos) + F.softplus(1 + u_neg)


CONTRASTIVE_F.register("logistic")(softplus)


@CONTRASTIVE_F.register("linear")
def linear(u_pos: torch.Tensor, u_neg: torch.Tensor) -> torch.Tensor:
    """u_neg - u_pos; unbounded below, so it needs an L2 penalty on B."""
    return u_neg - u_pos


@CONTRASTIVE_F.register("type1")
def type1(u_pos: torch.Tensor, u_neg: torch.Tensor) -> torch.Tensor:
    """'Type-1' (PhyLL) loss: softplus(u_neg - u_pos)."""
    return F.softplus(u_neg - u_pos)


def swap_views(x: torch.Tensor) -> torch.Tensor:
    """Row i of view 1 <-> row i of view 2 in a [view1; view2] stacked batch."""
    n = x.shape[0]
    if n % 2:
        raise ValueError(f"a two-view batch has an even number of rows, got {n}")
    return torch.roll(x, shifts=n // 2, dims=0)


def scores(z: torch.Tensor, bc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative scores of METHODS 2.

    z: (2B, D) representations (gradient flows through them), bc: (2B, D) the
    mapped context B c of each row. Positive: z_i . (B c_i). Negative: the
    next row's representation with the same context, z_{(i+1) mod 2B} . (B c_i).
    """
    u_pos = (z * bc).sum(dim=1)
    u_neg = (torch.roll(z, shifts=-1, dims=0) * bc).sum(dim=1)
    return u_pos, u_neg


def contrastive_loss(z: torch.Tensor, bc: torch.Tensor, f: str = "hinge") -> torch.Tensor:
    """Mean over the batch of f(u_pos, u_neg) (METHODS 2, L^l)."""
    u_pos, u_neg = scores(z, bc)
    return CONTRASTIVE_F.get(f)(u_pos, u_neg).mean()


def spatial_pool(h: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool a (N, C, H, W) map to a grid x grid map and flatten (METHODS 2.2).

    grid 1 is CLAPP's global pooling; a finer grid keeps spatial dependence,
    so B couples positions. The kernel is H / grid with stride equal to the
    kernel, exactly as in the reference.
    """
    if h.dim() == 2:
        return h
    H, W = h.shape[-2:]
    if H % grid or W % grid:
        raise ValueError(f"pooling grid {grid} does not divide the {H}x{W} feature map")
    if grid == H and grid == W:
        return h.flatten(1)
    return _BlockMean.apply(h, H // grid, W // grid).flatten(1)


class _BlockMean(torch.autograd.Function):
    """``avg_pool2d`` with kernel == stride, whose backward keeps only the input's shape.

    ``F.avg_pool2d`` saves the whole block output for backward (only to read
    its shape) and returns a contiguous gradient into a channels_last conv.
    Saving nothing here lowers a local block's activation memory by the size
    of its output (``localssl bench`` measures it) with bitwise-equal results.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        channels_last = h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last)
        ctx.meta = (tuple(h.shape), kh, kw, channels_last)
        return F.avg_pool2d(h, kernel_size=(kh, kw))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (n, c, H, W), kh, kw, channels_last = ctx.meta
        gh, gw = H // kh, W // kw
        g = g / (kh * kw)
        if gh == 1 and gw == 1:
            # Global pooling: a broadcast view (stride 0 over H, W) is enough.
            # The next backward op (the block's ReLU, or a conv) reads it as
            # it is, so no full-size map is written here.
            return g.expand(n, c, H, W), None, None
        if channels_last:
            gi = g.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, gh, kh, gw, kw, c)
            gi = gi.reshape(n, H, W, c).permute(0, 3, 1, 2)
            return gi.contiguous(memory_format=torch.channels_last), None, None
        gi = g[:, :, :, None, :, None].expand(n, c, gh, kh, gw, kw).reshape(n, c, H, W)
        return gi.contiguous(), None, None


def info_nce(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE over the B x B view-1-vs-view-2 cosine similarity matrix (METHODS 2.3).

    logits_ij = cos(p1_i, p2_j) / T; the positive of row i is column i. The
    loss is symmetrised over the two directions (view 1 -> 2 and 2 -> 1)
    *(inferred)*: METHODS names only the B x B matrix.
    """
    # bf16 logits / T would lose the ranking precision the softmax needs.
    if p1.dtype in (torch.float16, torch.bfloat16):
        p1, p2 = p1.float(), p2.float()
    p1 = F.normalize(p1, dim=1)
    p2 = F.normalize(p2, dim=1)
    logits = p1 @ p2.t() / temperature
    target = torch.arange(p1.shape[0], device=p1.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
