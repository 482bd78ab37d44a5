"""Layers whose autograd keeps less for backward than torch's own, with identical results.

`MaxPool2d`: torch's max-pool saves its whole *input* for backward, although
its backward reads only that tensor's shape and layout; the gradient goes
where the saved indices point. For non-overlapping windows (stride equal to
the kernel, no padding) every input position is picked by at most one
output, so scattering the output gradient to the indices *is* the gradient:
bitwise what torch's backward computes (tests/test_models.py). Saving only
the indices drops the pre-pool map from the saved activations of every rule
(``localssl bench``, table 2/3): in VGG-6 that map is the largest tensor of
each pooled block.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _MaxPoolSaveIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        y, idx = F.max_pool2d(x, k, return_indices=True)
        ctx.save_for_backward(idx)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        ctx.meta = (tuple(x.shape), channels_last)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (idx,) = ctx.saved_tensors
        (n, c, H, W), channels_last = ctx.meta
        # idx holds flat positions h * W + w within each (sample, channel)
        # plane. Scatter along that axis, laid out as the input was, so the
        # gradient enters the conv's backward without a layout change.
        if channels_last:
            gi = g.new_zeros((n, H * W, c))
            gi.scatter_(1, idx.permute(0, 2, 3, 1).reshape(n, -1, c), g.permute(0, 2, 3, 1).reshape(n, -1, c))
            return gi.view(n, H, W, c).permute(0, 3, 1, 2), None
        gi = g.new_zeros((n, c, H * W))
        gi.scatter_(2, idx.reshape(n, c, -1), g.reshape(n, c, -1))
        return gi.view(n, c, H, W), None


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(k)`` (stride = kernel, no padding) that saves only its indices for backward."""

    def __init__(self, kernel_size: int) -> None:
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"MaxPool2d here takes one int kernel size (stride = kernel), got {kernel_size!r}")
        super().__init__(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return _MaxPoolSaveIndices.apply(x, self.kernel_size)
