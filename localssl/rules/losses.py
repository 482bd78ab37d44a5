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

from localssl.models.layers import block_mean
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


def contrastive_loss(z: torch.Tensor, bc: torch.Tensor, f: str = "hinge", threshold: float = 0.0) -> torch.Tensor:
    """Mean over the batch of f(u_pos - threshold, u_neg - threshold) (METHODS 2, L^l).

    ``threshold`` 0 is the unified loss; a threshold shifts both scores, as
    Forward-Forward's goodness threshold does (Hinton 2022), for a rule with
    B = identity, whose scores nothing else rescales (`localssl.rules.fixed_feedback`).
    """
    u_pos, u_neg = scores(z, bc)
    if threshold:
        u_pos, u_neg = u_pos - threshold, u_neg - threshold
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
    return block_mean(h, H // grid, W // grid).flatten(1)  # saves nothing for backward (models/layers.py)


def _at_least_float32(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


def _cosine_logits(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(p1_i, p2_j) / T for every pair of rows, in float32 at least.

    bf16 logits / T would lose the ranking precision the softmax needs.
    """
    p1, p2 = _at_least_float32(p1, p2)
    return F.normalize(p1, dim=1) @ F.normalize(p2, dim=1).t() / temperature


def info_nce(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE over the B x B view-1-vs-view-2 cosine matrix, one direction (METHODS 2.3).

    S_ij = cos(p1_i, p2_j) / T; loss = -mean_i log_softmax(S, dim=1)_ii: each
    view-1 row must pick its own view-2 column among the B view-2 columns.
    This is exactly the reference code's BP-InfoNCE (zihan-wu/local-SSL,
    ``vision/models/SSLLoss.py``, ``contrast_mode='infonce'``): rows are view
    1, nothing is detached, and gradients reach both views through S.
    """
    logits = _cosine_logits(p1, p2, temperature)
    return -torch.diagonal(F.log_softmax(logits, dim=1)).mean()


def info_nce_symmetric(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """The mean of :func:`info_nce` in both directions (view 1 -> 2 and 2 -> 1).

    Not the reference's loss (its gradients differ from it by a few to tens
    of percent); offered under its own rule name, ``bp-infonce-sym``.
    """
    logits = _cosine_logits(p1, p2, temperature)
    return -0.5 * (torch.diagonal(F.log_softmax(logits, dim=1)).mean()
                   + torch.diagonal(F.log_softmax(logits, dim=0)).mean())


def nt_xent(p1: torch.Tensor, p2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1): 2N-2 negatives per anchor.

    Over the 2N stacked rows [p1; p2], row i's positive is its other view and
    its negatives are the 2N - 2 other rows of both views (itself excluded);
    the loss is the mean over all 2N anchors.
    """
    z = torch.cat([p1, p2])
    logits = _cosine_logits(z, z, temperature)
    n = p1.shape[0]
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


#: The InfoNCE-family losses by name: what ``BPInfoNCE`` computes at the top.
INFONCE_LOSSES: Registry[Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = Registry("InfoNCE loss")
INFONCE_LOSSES.register("infonce")(info_nce)
INFONCE_LOSSES.register("infonce-symmetric")(info_nce_symmetric)
INFONCE_LOSSES.register("nt-xent")(nt_xent)


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened."""
    n = m.shape[0]
    return m.masked_select(~torch.eye(n, dtype=torch.bool, device=m.device))


def barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1): sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2.

    C is the D x D cross-correlation of the two views' embeddings, each
    standardised over the batch as the reference does it (a BatchNorm1d
    without affine in training mode: biased variance, eps 1e-5, in
    facebookresearch/barlowtwins), summed over the N rows and divided by N.
    lambda 0.0051 is the published value (METHODS 5.1). Float32 at least: the
    D x D sums lose too much in bf16.
    """
    z1, z2 = _at_least_float32(z1, z2)
    n = z1.shape[0]
    if n < 2:
        raise ValueError(f"Barlow Twins standardises over the batch: it needs >= 2 rows, got {n}")
    a = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    b = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    c = a.t() @ b / n
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()


def vicreg(z1: torch.Tensor, z2: torch.Tensor, sim: float = 25.0, var: float = 25.0, cov: float = 1.0,
           eps: float = 1e-4) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 6): sim * invariance + var * variance + cov * covariance.

    As the reference computes them (facebookresearch/vicreg): invariance = the
    mean squared difference of the two embeddings; variance = mean_d
    relu(1 - sqrt(Var_d + 1e-4)) per view, averaged over the views (unbiased
    variance); covariance = the squared off-diagonal entries of each view's
    covariance matrix (divided by N - 1), summed, divided by D, summed over
    the views. Weights 25 / 25 / 1 are the published ones (METHODS 5.1).
    """
    z1, z2 = _at_least_float32(z1, z2)
    n, d = z1.shape
    if n < 2:
        raise ValueError(f"VICReg's variance and covariance need >= 2 rows, got {n}")
    invariance = F.mse_loss(z1, z2)
    a, b = z1 - z1.mean(0), z2 - z2.mean(0)
    std_a, std_b = torch.sqrt(a.var(0) + eps), torch.sqrt(b.var(0) + eps)
    variance = F.relu(1 - std_a).mean() / 2 + F.relu(1 - std_b).mean() / 2
    covariance = (_off_diagonal(a.t() @ a / (n - 1)).pow(2).sum() + _off_diagonal(b.t() @ b / (n - 1)).pow(2).sum()) / d
    return sim * invariance + var * variance + cov * covariance
