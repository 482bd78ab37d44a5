"""Losses on a grid of patch codes: CPC's InfoNCE (Greedy InfoMax) and CLAPP's hinge (METHODS 5.3).

Pure functions: tensors and the random draws in, a scalar out (the rules in
`localssl.rules.patches` draw the negatives and updates and pass them in, so
a test fixes them). Both read a grid of codes ``(B, C, Y, X)`` (one code per
patch, Y rows of X patches) as the reference code does
(loeweX/Greedy_InfoMax ``vision/models/InfoNCE_Loss.py``;
EPFL-LCN/pub-illing2021-neurips ``vision/CLAPPVision/vision/models/ContrastiveLoss.py``):

- prediction step k = 1..K: the context c at row y predicts the target z
  at row ``y + k + skip``, same column, *downwards only*. The reference calls
  its loss with ``skip_step=1``, so its step k reaches ``k + 1`` rows down
  (``z[:, :, k + skip_step:]`` against ``c[:, :, :-(k + skip_step)]``): at
  stride 8 the next row's 16 px patch half overlaps the context's, so it is
  skipped. Only the context rows with a target that far down take part.
- score: ``c^T W_k z`` with one bias-free W_k per step (the reference's
  1x1 ``nn.Conv2d`` applied to z, so ``W_k`` maps z's channels to c's).
- the loss is the mean over the K steps of each step's loss.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def offsets(rows: int, steps: int, skip: int) -> list[int]:
    """The row offsets ``k + skip`` (k = 1..steps) that leave at least one context row on a grid of ``rows``."""
    return [k + skip for k in range(1, steps + 1) if k + skip < rows]


def _pairs(context: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, offset: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Context codes (B, Y', X, C_c) at rows 0..Y-offset-1 and W z (B, Y', X, C_c) of the targets ``offset`` rows
    below them, in float32 at least (scores of wide codes lose their ranking in bf16)."""
    if context.shape[2] <= offset:
        raise ValueError(f"a grid of {context.shape[2]} rows has no target {offset} rows below any context row")
    c = context[:, :, : context.shape[2] - offset].permute(0, 2, 3, 1)
    z = target[:, :, offset:].permute(0, 2, 3, 1)
    if c.dtype in (torch.float16, torch.bfloat16):
        c, z = c.float(), z.float()
    return c, z @ weight.to(z.dtype).t()


def cpc_info_nce(context: torch.Tensor, target: torch.Tensor, weights: Sequence[torch.Tensor], skip: int,
                 negatives: Sequence[torch.Tensor]) -> torch.Tensor:
    """CPC's InfoNCE on a patch grid (van den Oord et al. 2018, eq. 4; GIM's per-module loss).

    context, target: ``(B, C_c, Y, X)`` and ``(B, C_z, Y, X)`` codes (GIM: the
    same tensor, gradient through both). ``weights[k-1]``: W_k, ``(C_c, C_z)``.
    ``negatives[k-1]``: ``(P_k, N)`` indices into the ``P_k = B * (Y - k -
    skip) * X`` targets of step k, flattened in (b, y, x) order: row p's
    negatives. The reference draws them uniformly from all targets of the
    step, every image and position, with replacement and without excluding
    the positive (`draw_cpc_negatives`). Per context position: cross-entropy
    of the positive among [positive, N negatives] (softmax over their
    scores); mean over positions, then over steps. (The reference takes
    ``log(softmax + 1e-11)``; we take log-softmax, equal but where the
    positive's probability is below 1e-11.)
    """
    losses = []
    for k, (w, neg) in enumerate(zip(weights, negatives), start=1):
        c, wz = _pairs(context, target, w, k + skip)
        c, wz = c.reshape(-1, c.shape[-1]), wz.reshape(-1, wz.shape[-1])
        pos = (c * wz).sum(-1, keepdim=True)
        neg_scores = torch.einsum("pc,pnc->pn", c, wz[neg])
        logits = torch.cat([pos, neg_scores], dim=1)
        losses.append(-F.log_softmax(logits, dim=1)[:, 0].mean())
    if not losses:
        raise ValueError("no prediction step fits this grid")
    return torch.stack(losses).mean()


def draw_cpc_negatives(shape: Sequence[int], steps: Sequence[int], n: int, device: torch.device | None = None
                       ) -> list[torch.Tensor]:
    """GIM's negatives: for each offset in ``steps``, ``(P, n)`` indices uniform over its P targets of a
    ``(B, C, Y, X)`` grid (``torch.randint`` with replacement, as the reference; the global torch RNG)."""
    b, _, y, x = shape
    return [torch.randint(b * (y - o) * x, (b * (y - o) * x, n), device=device) for o in steps]


def clapp_hinge(context: torch.Tensor, target: torch.Tensor, weights: Sequence[torch.Tensor], skip: int,
                negative_image: torch.Tensor | None, positive: torch.Tensor | None = None,
                negatives: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """CLAPP's hinge on a patch grid (Illing et al. 2021, eq. 3; the reference's ``CLAPPHingeLoss``).

    For step k and context position (b, y, x): u+ = c_b^T W_k z_b at the
    target position (y + k + skip, x); u- = c_b^T W_k z_j at the *same*
    target position of image ``j = negative_image[b]`` (the reference's
    ``sample_negs_locally_same_everywhere``: one other image per sample, the
    same for every position and step). Or, with ``negatives`` (``(P_k, N)``
    flat target indices per step, as `cpc_info_nce`; ``negative_image``
    None), N negatives drawn anywhere (the reference's CLAPP-s script).
    Per sample: l+_b = mean_{y,x} relu(1 - u+), l-_b = mean_{y,x(,n)} relu(1 + u-).

    ``positive``: None (CLAPP-s, synchronous) gives mean_b l+ + mean_b l-;
    a bool ``(B,)`` mask (CLAPP) takes sample b's positive term where it is
    True and its negative term where it is False: mean of l+ over the
    positive samples + mean of l- over the others (an empty set adds 0), as
    the reference's ``_add_losses``. Mean over steps.
    """
    if (negative_image is None) == (negatives is None):
        raise ValueError("give either negative_image (one other image per sample) or negatives (indices)")
    losses = []
    for k, w in enumerate(weights, start=1):
        c, wz = _pairs(context, target, w, k + skip)
        l_pos = F.relu(1 - (c * wz).sum(-1)).mean(dim=(1, 2))
        if negatives is None:
            l_neg = F.relu(1 + (c * wz[negative_image]).sum(-1)).mean(dim=(1, 2))
        else:
            flat = wz.reshape(-1, wz.shape[-1])[negatives[k - 1]]  # (P, N, C)
            u_neg = torch.einsum("pc,pnc->pn", c.reshape(-1, c.shape[-1]), flat)
            l_neg = F.relu(1 + u_neg).reshape(c.shape[0], -1).mean(1)
        if positive is None:
            losses.append(l_pos.mean() + l_neg.mean())
        else:
            term = l_pos.new_zeros(())
            if positive.any():
                term = term + l_pos[positive].mean()
            if (~positive).any():
                term = term + l_neg[~positive].mean()
            losses.append(term)
    if not losses:
        raise ValueError("no prediction step fits this grid")
    return torch.stack(losses).mean()


def draw_other_images(b: int, device: torch.device | None = None) -> torch.Tensor:
    """For each of ``b`` images another one, uniform over the other b - 1 (the reference's ``randint(b)``
    may draw the image itself, 1 time in b; a negative that is the positive makes no sense here)."""
    if b < 2:
        raise ValueError(f"a negative from another image needs >= 2 images per batch, got {b}")
    return (torch.arange(b, device=device) + torch.randint(1, b, (b,), device=device)) % b


def draw_updates(b: int, p: float = 0.5, device: torch.device | None = None) -> torch.Tensor:
    """CLAPP's either-or update: True (the positive term) with probability ``p`` per sample, else the negative."""
    return torch.rand(b, device=device) < p
