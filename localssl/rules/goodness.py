"""Forward-Forward goodness and SCFF's loss on it: pure functions of tensors (METHODS 5.3).

Facts from SCFF's reference code (neurophysics-cnrsthales/contrastive-forward-forward,
``ContrastFF_CIFAR.py``, ``train``):
- goodness at every position: the *mean* over channels of the squared
  (rectified) activity, ``relu(x).pow(2).mean([1])``, a (B, H, W) map (the
  paper's Fig. 2: "computed across the channel dimension and then averaged
  along the height and width dimensions");
- loss = mean over samples and positions of softplus(theta_pos - G_pos)
  + mean of softplus(G_neg - theta_neg) + lamda * mean over samples of the
  L2 norm of the positive goodness map over positions
  (``log(1 + exp(a * (-G_pos + th1)))`` + ``log(1 + exp(b * (G_neg - th2)))``
  + ``lamda * norm(G_pos, p=2, dim=(1, 2)).mean()``, with a = b = 1);
- each layer has its own theta_pos (``th1``), theta_neg (``th2``) and lamda
  (``config.json``, CIFAR: 0/1/0.0012, 5/9/0.0007, 6/10/0.0005).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def goodness(h: torch.Tensor) -> torch.Tensor:
    """Per-position goodness, row by row: mean over channels of ``h`` squared, flattened to (N, positions).

    ``h``: (N, C, H, W) -> (N, H * W); (N, D) (a layer without positions) -> (N, 1). At least float32:
    squares of bf16 activations lose the goodness's small differences.
    """
    if h.dtype in (torch.float16, torch.bfloat16):
        h = h.float()
    if h.dim() == 2:
        return h.pow(2).mean(dim=1, keepdim=True)
    if h.dim() != 4:
        raise ValueError(f"goodness takes (N, C, H, W) or (N, D) activities, got shape {tuple(h.shape)}")
    return h.pow(2).mean(dim=1).flatten(1)


def scff_loss(g_pos: torch.Tensor, g_neg: torch.Tensor, theta_pos: float, theta_neg: float,
              lamda: float = 0.0) -> torch.Tensor:
    """SCFF's layer loss from the goodness maps (N, P) of the positive and the negative rows.

    softplus(theta_pos - G_pos) and softplus(G_neg - theta_neg), each averaged over rows and positions,
    plus ``lamda`` times the mean over positive rows of the L2 norm of their goodness map.
    """
    loss = F.softplus(theta_pos - g_pos).mean() + F.softplus(g_neg - theta_neg).mean()
    if lamda:
        loss = loss + lamda * g_pos.norm(p=2, dim=1).mean()
    return loss


__all__ = ["goodness", "scff_loss"]
