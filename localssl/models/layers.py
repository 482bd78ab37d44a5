"""Pooling ops whose autograd keeps less for backward than torch's own, with identical results.

Torch's pooling ops save their whole *input* for backward, although their
backward reads only its shape and layout. Both ops here keep only what the
gradient needs, and return it laid out as the input was (channels_last in,
channels_last out), so it enters the conv's backward without a layout change.

`MaxPool2d` (the encoders' max-pool): for non-overlapping windows (stride
equal to the kernel, no padding) every input position is picked by at most
one output, so scattering the output gradient to the saved indices *is* the
gradient: bitwise what torch's backward computes (tests/test_models.py).
Saving only the indices drops the pre-pool map from the saved activations of
every rule (``localssl bench``, table 2/3): in VGG-6 that map is the largest
tensor of each pooled block.

`block_mean` (the losses' spatial pooling, `rules.losses.spatial_pool`):
``avg_pool2d`` with kernel == stride saving nothing, which lowers a local
block's activation memory by the size of its output, with bitwise-equal
gradients (tests/test_losses.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class _MaxPoolSaveIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int) -> torch.Tensor:
        y, idx = F.max_pool2d(x, k, return_indices=True)
        ctx.save_for_backward(idx)
        ctx.meta = (tuple(x.shape), _is_channels_last(x))
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (idx,) = ctx.saved_tensors
        (n, c, H, W), channels_last = ctx.meta
        # idx holds flat positions h * W + w within each (sample, channel)
        # plane: scatter along that axis, in the input's layout.
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


class _BlockMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
        ctx.meta = (tuple(h.shape), kh, kw, _is_channels_last(h))
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


def block_mean(h: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``F.avg_pool2d(h, (kh, kw))`` (stride = kernel) that saves nothing for backward."""
    return _BlockMean.apply(h, kh, kw)
