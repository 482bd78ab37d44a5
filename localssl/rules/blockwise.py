"""Blockwise SSL (Siddiqui et al. 2023, METHODS 5.1), LoCo (Xiong et al. 2020, 5.2) and their end-to-end twins.

Every group (a ResNet stage, by default) gets its own head and its own
two-view loss:
- head: "conv-based expansion" (a 1x1 or 3x3 conv to E channels + BatchNorm +
  ReLU) and global average pooling, then a projector MLP (Linear + BatchNorm
  + ReLU between layers, a bias-free Linear last), as blockwise SSL builds it
  on facebookresearch/barlowtwins. Published for ResNet-50: E = 2048 and a
  8192-8192-8192 projector: every stage is expanded to the width of the
  network's output (2048; here ``expansion=0`` does that for any encoder).
  The defaults (E = 256, a 512-512-512 projector) are sized for CPU runs: an
  expansion is held at the stage's resolution, and at the first stage a wide
  one costs more activation memory than blockwise training saves (README,
  bench on ResNet-18/50).
- loss: Barlow Twins, VICReg or SimCLR's NT-Xent on the two views' embeddings.
Options: Gaussian noise injection on every block output while training (std
= ``noise`` x the activation's std over (h, w), per channel or over all;
blockwise SSL uses 0.25), and simultaneous or sequential training.
LoCo is blockwise SimCLR whose groups overlap: loss k back-propagates through
blocks k .. k + overlap, so an upper block sends gradient one block down.
The ``bp-*`` rules put the same head and loss on the last block only, with
one group: end-to-end, as the papers' baselines.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from localssl.rules.base import Group, Rule, RuleOptions
from localssl.rules.losses import barlow_twins, nt_xent, vicreg
from localssl.rules.registry import register_rule

NOISE_MODES = ("hw", "channel", "all")
SCHEDULES = ("simultaneous", "sequential")


@dataclass
class HeadOptions(RuleOptions):
    """expansion: E, channels of the conv expansion (0: the last block's channel count, as the paper expands
    every ResNet-50 stage to its 2048 output channels); expansion_kernel: 1 or 3; projector: the MLP's widths."""

    expansion: int = 256
    expansion_kernel: int = 1
    projector: list[int] = field(default_factory=lambda: [512, 512, 512])

    def check(self) -> None:
        if self.expansion < 0:
            raise ValueError(f"expansion must be >= 1 channels (or 0: the last block's), got {self.expansion}")
        if self.expansion_kernel not in (1, 3):
            raise ValueError(f"expansion_kernel must be 1 or 3, got {self.expansion_kernel}")
        if not self.projector or min(self.projector) < 1:
            raise ValueError(f"projector must list one or more widths >= 1, got {self.projector}")


@dataclass
class BarlowOptions(HeadOptions):
    """lambd: weight of the off-diagonal term (0.0051, Zbontar et al. 2021)."""

    lambd: float = 0.0051

    def check(self) -> None:
        super().check()
        if not self.lambd >= 0:
            raise ValueError(f"lambd must be >= 0, got {self.lambd}")


@dataclass
class VICRegOptions(HeadOptions):
    """sim, var, cov: the weights of invariance, variance and covariance (25 / 25 / 1, Bardes et al. 2022)."""

    sim: float = 25.0
    var: float = 25.0
    cov: float = 1.0

    def check(self) -> None:
        super().check()
        if min(self.sim, self.var, self.cov) < 0:
            raise ValueError(f"sim, var and cov must be >= 0, got {self.sim}, {self.var}, {self.cov}")


@dataclass
class SimCLROptions(HeadOptions):
    """temperature: of NT-Xent (0.5, SimCLR's CIFAR-10 setting, Chen et al. 2020 app. B.9)."""

    temperature: float = 0.5

    def check(self) -> None:
        super().check()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class BlockwiseOptions(RuleOptions):
    """noise: std of the injected noise as a multiple of the activation's std (0: off; 0.25 published);
    noise_mode: over what that std is taken (hw: per sample and channel over positions; channel: per
    channel over the batch and positions; all: over everything); schedule: simultaneous or sequential."""

    noise: float = 0.0
    noise_mode: str = "hw"
    schedule: str = "simultaneous"

    def check(self) -> None:
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"unknown noise_mode {self.noise_mode!r}; valid: {', '.join(NOISE_MODES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")


@dataclass
class BlockwiseBarlowOptions(BarlowOptions, BlockwiseOptions):
    def check(self) -> None:
        BarlowOptions.check(self)
        BlockwiseOptions.check(self)


@dataclass
class BlockwiseVICRegOptions(VICRegOptions, BlockwiseOptions):
    def check(self) -> None:
        VICRegOptions.check(self)
        BlockwiseOptions.check(self)


@dataclass
class BlockwiseSimCLROptions(SimCLROptions, BlockwiseOptions):
    def check(self) -> None:
        SimCLROptions.check(self)
        BlockwiseOptions.check(self)


@dataclass
class LoCoOptions(BlockwiseSimCLROptions):
    """overlap: how many blocks above its own a loss back-propagates through (1 in LoCo; 0 = blockwise SimCLR)."""

    overlap: int = 1

    def check(self) -> None:
        super().check()
        if self.overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {self.overlap}")
        if self.overlap > 0 and self.schedule == "sequential":
            raise ValueError("sequential training freezes the blocks below the active one; overlapping groups "
                             "would move them: use overlap 0 or schedule simultaneous")


class Head(nn.Module):
    """Conv expansion + BatchNorm + ReLU + global average pooling, then the projector MLP (METHODS 5.1)."""

    def __init__(self, in_shape: Sequence[int], options: HeadOptions, expansion: int | None = None) -> None:
        super().__init__()
        c = int(in_shape[0])
        e = expansion or options.expansion or c
        if len(in_shape) == 3:
            k = options.expansion_kernel
            self.expand: nn.Module = nn.Sequential(
                nn.Conv2d(c, e, k, padding=k // 2, bias=False), nn.BatchNorm2d(e), nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:  # a vector output (an MLP block): the expansion is a linear layer
            self.expand = nn.Sequential(nn.Linear(c, e, bias=False), nn.BatchNorm1d(e), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        widths = [e, *options.projector]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b, bias=False))
            if i < len(widths) - 2:
                layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.projector = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.projector(self.expand(h))


def inject_noise(h: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    """h + N(0, (scale * std(h))^2), the std taken per (sample, channel) over positions ("hw"), per channel
    ("channel") or over everything ("all"); the std is a constant (no gradient through it)."""
    with torch.no_grad():
        if h.dim() == 2 or mode == "all":
            std = h.float().std()
        elif mode == "hw":
            std = h.float().std(dim=(2, 3), keepdim=True)
        else:
            std = h.float().std(dim=(0, 2, 3), keepdim=True)
    return h + torch.randn_like(h) * (scale * std).to(h.dtype)


LOSSES = {
    BarlowOptions: lambda z1, z2, o: barlow_twins(z1, z2, o.lambd),
    VICRegOptions: lambda z1, z2, o: vicreg(z1, z2, o.sim, o.var, o.cov),
    SimCLROptions: lambda z1, z2, o: nt_xent(z1, z2, o.temperature),
}


def _loss_of(options: HeadOptions):
    for cls, fn in LOSSES.items():
        if isinstance(options, cls):
            return fn
    raise TypeError(f"no loss for {type(options).__name__}")


class Blockwise(Rule):
    """One head and one two-view loss per group; groups of ``overlap + 1`` blocks (LoCo) or one block each.

    ``end_to_end``: one group of every block with the head on the last one (the ``bp-*`` rules).
    """

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: HeadOptions,
                 grids: Sequence[int] | None = None, end_to_end: bool = False) -> None:
        super().__init__(feature_shapes, options, grids)
        options.check()
        self.local = not end_to_end
        self.overlap = int(getattr(options, "overlap", 0))
        self.schedule = getattr(options, "schedule", "simultaneous")
        self.noise = float(getattr(options, "noise", 0.0))
        self.noise_mode = getattr(options, "noise_mode", "hw")
        self.perturbs = self.noise > 0
        self._loss = _loss_of(options)
        # expansion 0: every head expands to the encoder's output width (the paper's 2048 for ResNet-50).
        width = options.expansion or int(self.feature_shapes[-1][0])
        self.heads = nn.ModuleList([Head(self.feature_shapes[g.output], options, width) for g in self.groups()])

    def groups(self) -> list[Group]:
        n = self.num_blocks
        if not self.local:
            return [Group(tuple(range(n)))]
        return [Group(tuple(range(k, min(k + self.overlap, n - 1) + 1))) for k in range(n)]

    def handoff(self, block: int, h: torch.Tensor) -> torch.Tensor:
        # Noise on every block output while training: what the head and the next block both see.
        if self.perturbs and self.training:
            return inject_noise(h, self.noise, self.noise_mode)
        return h

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        p = self.heads[g](z)
        n = p.shape[0] // 2
        return self._loss(p[:n], p[n:], self.options)

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return list(self.heads[g].parameters())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={type(self.options).__name__}, overlap={self.overlap}"


# Registered with the options each takes (`localssl rules` lists them with their defaults).
register_rule("blockwise-barlow", BlockwiseBarlowOptions, counterpart="bp-barlow")(
    lambda shapes, opt, grids: Blockwise(shapes, opt, grids))
register_rule("blockwise-vicreg", BlockwiseVICRegOptions, counterpart="bp-vicreg")(
    lambda shapes, opt, grids: Blockwise(shapes, opt, grids))
register_rule("blockwise-simclr", BlockwiseSimCLROptions, counterpart="bp-simclr")(
    lambda shapes, opt, grids: Blockwise(shapes, opt, grids))
register_rule("loco", LoCoOptions, counterpart="bp-simclr")(lambda shapes, opt, grids: Blockwise(shapes, opt, grids))
register_rule("bp-barlow", BarlowOptions)(lambda shapes, opt, grids: Blockwise(shapes, opt, grids, end_to_end=True))
register_rule("bp-vicreg", VICRegOptions)(lambda shapes, opt, grids: Blockwise(shapes, opt, grids, end_to_end=True))
register_rule("bp-simclr", SimCLROptions)(lambda shapes, opt, grids: Blockwise(shapes, opt, grids, end_to_end=True))
