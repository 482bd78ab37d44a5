"""ResNet-18 and ResNet-50 cut into local blocks (He et al. 2016, "Deep Residual Learning for Image Recognition").

The trunks of torchvision's ``resnet18`` / ``resnet50`` without the fc layer:
11,176,512 and 23,508,032 parameters at width 1 (torchvision's 11,689,512 and
25,557,032 minus fc; tests/test_models.py). Written here, not imported:
torchvision's PyPI wheels do not import beside the torch this project uses.

- Residual units: BasicBlock (ResNet-18, two 3x3 convs) and Bottleneck
  (ResNet-50, 1x1 - 3x3 - 1x1 with 4x expansion), He et al. 2016, Fig. 5.
  BN after every conv, ReLU after the residual sum. A downsampling
  bottleneck strides its 3x3 conv, not its first 1x1 as in the paper: that
  is torchvision's "ResNet v1.5" (NVIDIA's name), the ResNet-50 that SSL
  papers (SimCLR, Barlow Twins, Siddiqui et al. 2024) train.
- Shortcut: identity, or a strided 1x1 conv + BN where the shape changes
  (the paper's option B, section 3.3).
- Stems: ImageNet = 7x7/2 conv + BN + ReLU + 3x3/2 max-pool (Table 1);
  CIFAR = 3x3/1 conv + BN + ReLU, no max-pool (SimCLR, Chen et al. 2020,
  Appendix B.9), so that a 32 px image enters layer1 at 32x32 rather than 8x8.
  ``stem: auto`` takes the ImageNet stem from 96 px up (STL-10 and larger).
- Width multiplier: the stem's 64 and the stage widths 64, 128, 256, 512
  scaled and rounded (at least 1 channel); a bottleneck outputs 4x its width.
- Cut (STYLE principle 3, every rule sees the same blocks): ``stages``, the
  four stages with the stem in the first block (stem + layer1, layer2,
  layer3, layer4), as Siddiqui et al. 2024 and LoCo cut ResNet-50 (METHODS
  5.1, 5.2); or ``units``, every residual unit its own block, the stem with
  the first one. Both give the same function (tests/test_models.py).

Every block (and unit) has ``out_channels``; `BlockEncoder.feature_shapes`
gives each block's (C, H, W), and global pooling of the last block gives the
encoder's 512 (ResNet-18) or 2048 (ResNet-50) features at width 1.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from localssl.config import ConfigError
from localssl.models.blocks import BlockEncoder, scale_channels
from localssl.models.registry import EncoderOptions, register_encoder

STEMS = ("auto", "cifar", "imagenet")
CUTS = ("stages", "units")
#: From this input side (px) up, ``stem: auto`` takes the ImageNet stem (issue 11): its 4x
#: downsampling brings 96 px (STL-10) to layer4 at 3x3 rather than 12x12, at 1/16 of the FLOPs per stage.
IMAGENET_STEM_MIN_SIZE = 96
#: Base widths of the stem and of the four stages (He et al. 2016, Table 1).
STEM_WIDTH = 64
STAGE_WIDTHS = (64, 128, 256, 512)


@dataclass
class ResNetOptions(EncoderOptions):
    """Options of ``resnet18`` and ``resnet50`` (YAML ``encoder_options:``, CLI ``--encoder-opt key=value``).

    stem: ``auto`` (ImageNet stem from `IMAGENET_STEM_MIN_SIZE` px up, else
        CIFAR), ``cifar`` or ``imagenet``.
    cut: ``stages`` (4 blocks) or ``units`` (one block per residual unit).
    zero_init: start the last BN of every residual unit at gamma = 0, so each
        residual branch starts at zero (Goyal et al. 2017, "Accurate, Large
        Minibatch SGD"; torchvision's ``zero_init_residual``). Off by
        default, as in torchvision.
    """

    stem: str = "auto"
    cut: str = "stages"
    zero_init: bool = False

    def __post_init__(self) -> None:
        for key, value, valid in (("stem", self.stem, STEMS), ("cut", self.cut, CUTS)):
            if value not in valid:
                raise ConfigError(f"unknown ResNet {key} {value!r}; valid: {', '.join(valid)}")

    def resolved(self, image_size: int | None) -> ResNetOptions:
        if self.stem != "auto" or image_size is None:
            return self
        return dataclasses.replace(self, stem="imagenet" if image_size >= IMAGENET_STEM_MIN_SIZE else "cifar")


class _Conv(nn.Conv2d):
    """A bias-free conv (BN follows every one) with torchvision's ResNet initialisation.

    Kaiming-normal, fan_out mode (He et al. 2015, "Delving Deep into
    Rectifiers"), drawn by ``reset_parameters``: the init a run starts from is
    then also the one `evaluation.random_init_like` redraws for the
    random-init baseline.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")


class _LastBN(nn.BatchNorm2d):
    """The BN that ends a residual branch: gamma starts at 0 with ``zero_init`` (`ResNetOptions`)."""

    def __init__(self, channels: int, zero_init: bool) -> None:
        self.zero_init = zero_init  # read by reset_parameters, which nn.BatchNorm2d.__init__ calls
        super().__init__(channels)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.weight)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """Option B of He et al. 2016 (3.3): a strided 1x1 conv + BN where the shape changes, else identity."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_Conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first strided) and the shortcut; ResNet-18's unit (He et al. 2016, Fig. 5 left)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, zero_init: bool = False) -> None:
        super().__init__()
        self.out_channels = planes * self.expansion
        # Created in the order they run: `random_init_like` redraws modules in registration order.
        self.conv1 = _Conv(c_in, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _Conv(planes, planes, 3)
        self.bn2 = _LastBN(planes, zero_init)
        self.shortcut = _shortcut(c_in, self.out_channels, stride)
        # In place as in torchvision: BN's backward reads its input, not its output.
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided: ResNet v1.5), 1x1 expand x4, and the shortcut; ResNet-50's unit (Fig. 5 right)."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, zero_init: bool = False) -> None:
        super().__init__()
        self.out_channels = planes * self.expansion
        self.conv1 = _Conv(c_in, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _Conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _Conv(planes, self.out_channels, 1)
        self.bn3 = _LastBN(self.out_channels, zero_init)
        self.shortcut = _shortcut(c_in, self.out_channels, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _stem(kind: str, c_in: int, c_out: int) -> nn.Sequential:
    if kind == "cifar":
        return nn.Sequential(_Conv(c_in, c_out, 3), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
    return nn.Sequential(_Conv(c_in, c_out, 7, 2), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1))


class ResNetBlock(nn.Sequential):
    """Consecutive parts of a ResNet (stem, residual units) that train as one local block."""

    def __init__(self, parts: OrderedDict[str, nn.Module], out_channels: int) -> None:
        super().__init__(parts)
        self.out_channels = out_channels


# Unit type and units per stage (He et al. 2016, Table 1).
ARCHITECTURES: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def _resnet(name: str, width: float, in_channels: int, options: ResNetOptions) -> BlockEncoder:
    if options.stem == "auto":
        raise ValueError(
            f"{name}: stem 'auto' picks the stem from the input size; build it with "
            "build_encoder(..., image_size=...) or choose encoder_options stem: cifar or imagenet"
        )
    unit_cls, depths = ARCHITECTURES[name]
    c = scale_channels(STEM_WIDTH, width)
    stem = _stem(options.stem, in_channels, c)
    stages: list[list[tuple[str, nn.Module]]] = []
    for s, (base, depth) in enumerate(zip(STAGE_WIDTHS, depths), start=1):
        planes = scale_channels(base, width)
        units = []
        for i in range(depth):
            # layer1 keeps the stem's resolution; every later stage halves it in its first unit.
            unit = unit_cls(c, planes, stride=2 if s > 1 and i == 0 else 1, zero_init=options.zero_init)
            units.append((f"layer{s}_{i}", unit))
            c = unit.out_channels
        stages.append(units)
    groups = stages if options.cut == "stages" else [[u] for units in stages for u in units]
    blocks = [
        ResNetBlock(OrderedDict([("stem", stem)] * (k == 0) + group), out_channels=group[-1][1].out_channels)
        for k, group in enumerate(groups)
    ]
    return BlockEncoder(blocks, name=name)


@register_encoder("resnet18", options=ResNetOptions)
def resnet18(width: float = 1.0, in_channels: int = 3, options: ResNetOptions | None = None) -> BlockEncoder:
    """ResNet-18 without fc (BasicBlock, 2-2-2-2 units), cut as ``options.cut`` says."""
    return _resnet("resnet18", width, in_channels, options or ResNetOptions())


@register_encoder("resnet50", options=ResNetOptions)
def resnet50(width: float = 1.0, in_channels: int = 3, options: ResNetOptions | None = None) -> BlockEncoder:
    """ResNet-50 v1.5 without fc (Bottleneck, 3-4-6-3 units), cut as ``options.cut`` says."""
    return _resnet("resnet50", width, in_channels, options or ResNetOptions())
