"""Greedy InfoMax's vision encoder (Löwe, O'Connor, Veeling 2019, sec. 4.2; METHODS 5.3), on patches.

Facts from the reference code (loeweX/Greedy_InfoMax, ``vision/models/FullModel.py``
and ``Resnet_Encoder.py``; defaults of ``arg_parser``: ``--resnet 50``,
``--model_splits 3``, ``--grayscale`` in ``vision_traineval.sh``):
- a ResNet-50-like stack of pre-activation bottlenecks *without* BatchNorm
  (``PreActBottleneckNoBN``: relu, 1x1, relu, 3x3 (strided), relu, 1x1 x4
  expansion; the shortcut is a strided 1x1 conv of the relu'd input where
  the shape changes, else the raw input), convs with biases;
- cut into 3 modules of 3, 4, 6 bottlenecks with 64, 128, 256 planes
  (outputs 256, 512, 1024 channels); module 1 starts with a 5x5 conv
  (stride 1, padding 2) to 64 channels, modules 2 and 3 halve the resolution
  in their first unit;
- every module runs on 16x16 patches at stride 8 of the (grayscale) image.
So a 16 px patch gives per-patch maps 16, 8, 4 (`tiles`). PyTorch's default
init (the reference's ``--weight_init`` is off by default).

Ours: ``grayscale`` (`PatchEncoderOptions`) converts RGB to luma inside the
first block; ``width`` scales the planes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from localssl.models.blocks import BlockEncoder, scale_channels
from localssl.models.patches import Luma, PatchEncoderOptions, patchify
from localssl.models.registry import register_encoder

#: Bottlenecks and planes per module (FullModel.py: block_dims [3, 4, 6], num_channels [64, 128, 256]).
MODULES = ((3, 64), (4, 128), (6, 256))


@dataclass
class GIMResNetOptions(PatchEncoderOptions):
    """Options of ``gim-resnet``: `PatchEncoderOptions` with GIM's grayscale input by default."""

    grayscale: bool = True


class PreActBottleneckNoBN(nn.Module):
    """GIM's unit: relu first, then 1x1, relu, 3x3 (strided), relu, 1x1 to 4x planes; plus the shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(planes, self.out_channels, 1)
        self.shortcut = (nn.Conv2d(c_in, self.out_channels, 1, stride=stride)
                         if stride != 1 or c_in != self.out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(x)
        # The reference takes the shortcut of the relu'd input where it has a conv, else of x itself.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.conv1(out)))
        return self.conv3(F.relu(out)) + shortcut


class GIMModule(nn.Sequential):
    """One of the three greedily trained modules."""

    def __init__(self, layers: list[nn.Module], out_channels: int) -> None:
        super().__init__(*layers)
        self.out_channels = out_channels


@register_encoder("gim-resnet", options=GIMResNetOptions)
def gim_resnet(width: float = 1.0, in_channels: int = 3, options: GIMResNetOptions | None = None) -> BlockEncoder:
    """GIM's 3-module pre-activation ResNet (no BatchNorm), run per patch unless ``patch=0``."""
    options = options or GIMResNetOptions()
    c = in_channels
    first: list[nn.Module] = []
    if options.grayscale and in_channels == 3:
        first.append(Luma())
        c = 1
    stem = scale_channels(64, width)
    first.append(nn.Conv2d(c, stem, 5, stride=1, padding=2))
    c = stem
    blocks = []
    for m, (depth, base) in enumerate(MODULES):
        planes = scale_channels(base, width)
        units: list[nn.Module] = first if m == 0 else []
        for i in range(depth):
            unit = PreActBottleneckNoBN(c, planes, stride=2 if m > 0 and i == 0 else 1)
            units.append(unit)
            c = unit.out_channels
        blocks.append(GIMModule(units, c))
    encoder = BlockEncoder(blocks, name="gim-resnet")
    if options.patch == 0:
        return encoder
    return patchify(encoder, options.patch, options.patch_stride, in_channels)
