"""The SCFF paper's CIFAR-10 encoder (Chen et al., Nat. Commun. 2025; METHODS 5.3).

Every fact from the reference code, neurophysics-cnrsthales/contrastive-forward-forward
(``config.json`` ``CIFAR.layer_configs`` and ``ContrastFF_CIFAR.py``):

- three conv layers of 96, 384 and 1536 channels, kernels 5, 3, 3, each on
  its input reflect-padded by 2, 1, 1 (``pad``, ``padding_mode: reflect``),
  so the conv keeps the map size; bias on; Xavier-uniform weights
  (``init.xavier_uniform_``), torch's default bias init;
- before the conv, the padded input is standardised per sample over
  (C, H, W) (``standardnorm``: ``(x - mean) / (1e-10 + std)``, torch's
  unbiased std);
- activation "triangle" on layers 1 and 2 (``triangle``: ``relu(x - mean
  over channels)``, at each position), ReLU on layer 3;
- then max-pool 4, stride 2, padding 1 (layers 1, 2) and average-pool 2,
  stride 2 (layer 3), all ``ceil_mode=True``: 32 px -> 16, 8, 4;
- the linear probe reads every layer through a further 2 x 2 average pool
  (``extra_pool_size: 2``): grids 8, 4, 2 at 32 px (`DEFAULT_GRIDS` here).

One block per layer (conv, activation, pool), so a local rule trains each
layer on its own, as SCFF does. The first layer takes the mean of SCFF's two
input halves (`localssl.data.pairs`: W*x1 + b + W*x2 + b = 2W*mean + 2b):
its weights start at twice the reference's Xavier draw and its bias at
twice torch's default, so that at initialisation it computes what the
reference's shared conv computes on the concatenation.

The standardisation of the first layer's input (option ``first_norm``). The
reference standardises each half on its own (``stdnorm(x, dims_in)`` before
``get_pos_neg_batch_imgcats``) and then the padded concatenation jointly (in
``Conv2d.forward``), which on two standardised halves changes little. Here
the first block standardises the halves' mean, which is the same for a
single image and for a positive of one image with itself (both are the
image), but rescales a negative, the mean of two images, to unit variance:
in the reference that mixture keeps its lower energy, (1 + rho) / 2 of a
positive's for images correlated by rho. ``first_norm=false`` drops the
first block's standardisation: every input then keeps its energy as the
data's normalisation leaves it (dataset mean and std), the cost being that
images are not contrast-normalised one by one before layer 1. Layers 2 and 3
standardise their input in either case (the reference's in-layer
``standardnorm``; its second ``stdnorm`` before pairing is left out, it
only changes how the few padded border values weigh in the statistics).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from localssl.models.blocks import BlockEncoder, scale_channels
from localssl.models.registry import EncoderOptions, register_encoder
from localssl.models.vgg import DEFAULT_GRIDS

#: (channels, kernel, reflect padding, activation, pool) per layer (reference ``config.json``, CIFAR).
SCFF_CIFAR: list[tuple[int, int, int, str, str]] = [
    (96, 5, 2, "triangle", "max"),
    (384, 3, 1, "triangle", "max"),
    (1536, 3, 1, "relu", "avg"),
]

# The reference probe's grids: its extra 2x2 average pool on the 16, 8, 4 px layer outputs (32 px input).
DEFAULT_GRIDS["scff-cifar"] = [8, 4, 2]


@dataclass
class SCFFEncoderOptions(EncoderOptions):
    """Options of ``scff-cifar`` (``--encoder-opt first_norm=false``).

    first_norm: standardise the first block's input per sample (the
        reference's in-layer ``standardnorm``; see the module docstring for
        what it does to a negative's energy here). Layers 2 and 3 always do.
    """

    first_norm: bool = True


class StandardNorm(nn.Module):
    """Per-sample standardisation over (C, H, W): ``(x - mean) / (1e-10 + std)`` (reference ``standardnorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        x = x - x.mean(dim=dims, keepdim=True)
        return x / (1e-10 + x.std(dim=dims, keepdim=True))


class Triangle(nn.Module):
    """SCFF's "triangle" activation: ``relu(x - mean over channels)`` at every position (reference ``triangle``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x - x.mean(dim=1, keepdim=True))


def _conv(c_in: int, c_out: int, k: int, scale: float) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, bias=True)
    nn.init.xavier_uniform_(conv.weight)  # the reference's init; the bias keeps torch's default
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
    return conv


@register_encoder("scff-cifar", options=SCFFEncoderOptions)
def scff_cifar(width: float = 1.0, in_channels: int = 3, options: SCFFEncoderOptions | None = None) -> BlockEncoder:
    """SCFF's CIFAR-10 CNN (96-384-1536 channels, kernels 5-3-3, triangle on layers 1-2), scaled by ``width``."""
    options = options or SCFFEncoderOptions()
    blocks = []
    c_in = in_channels
    for k, (c, kernel, pad, act, pool) in enumerate(SCFF_CIFAR):
        c_out = scale_channels(c, width)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(pad),
            StandardNorm() if k > 0 or options.first_norm else nn.Identity(),
            # Layer 1 reads the mean of two halves that the reference convolves one by one and sums: 2W, 2b.
            _conv(c_in, c_out, kernel, scale=2.0 if k == 0 else 1.0),
            Triangle() if act == "triangle" else nn.ReLU(),
            nn.MaxPool2d(4, stride=2, padding=1, ceil_mode=True) if pool == "max"
            else nn.AvgPool2d(2, stride=2, ceil_mode=True),
        ]
        blocks.append(nn.Sequential(*layers))
        c_in = c_out
    return BlockEncoder(blocks, name="scff-cifar")


__all__ = ["SCFF_CIFAR", "SCFFEncoderOptions", "StandardNorm", "Triangle", "scff_cifar"]
