"""Patch-based rules: Greedy InfoMax (``gim``, ``bp-cpc``) and CLAPP 2021 (``clapp2021``, ``bp-clapp2021``).

METHODS 5.3. Both rules predict, from a patch's pooled code (the context),
the codes of the patches k rows below it (k = 1..5, one W_k each), against
negatives: GIM with CPC's InfoNCE over 16 negatives drawn from every image
and position (Löwe, O'Connor, Veeling 2019), CLAPP with a hinge loss and the
same location of another image as the one negative (Illing, Ventura, Bellec,
Gerstner 2021). Both train every block on its own loss, ``detach`` between
blocks; the ``bp-`` twins put the same loss on the last block only, one group
(GIM's end-to-end CPC, here without its PixelCNN autoregressor; CLAPP's
"Hinge Loss CPC", ``vision_traineval_HingeLossCPC.sh``).

The patches come from the encoder (`localssl.models.patches`: a patched
encoder tiles every patch's map into a mosaic), and the rule reads a grid of
codes by average-pooling each block's output with a kernel of one tile:
``tile = H / grid`` from the run's grids and shapes (a patched encoder's
default grid is its patch grid, so a tile is one patch). The kernel, not the
grid, is fixed: a 64 px training crop of a 96 px image gives a 7x7 grid of
the same 16 px patches as the probe's 11x11 on the whole image. On an
encoder without patches the rule pools to the run's grid as any spatial rule
does (regions, not independent patches).

The recipe (GIM ``vision/data/get_dataloader.py``, CLAPP's the same): one
view per image, a random 64x64 crop of the 96 px STL-10 image (the test's is
the centre crop; our probes encode the whole image), horizontal flip,
grayscale (the encoder's ``grayscale`` option, `models.gim_resnet`);
16x16 patches at stride 8 (7x7). On CIFAR-10 (32 px) ours: 8x8 patches at
stride 4 of the 32 px image after a 4 px reflected pad and random 32 px
crop (again 7x7), ``--encoder-opt patch=8 patch_stride=4 --rule-opt crop=32
crop_padding=4``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localssl.data.augment import ViewLayout
from localssl.models.layers import block_mean
from localssl.rules.base import Rule, RuleOptions
from localssl.rules.patch_losses import (
    clapp_hinge,
    cpc_info_nce,
    draw_cpc_negatives,
    draw_other_images,
    draw_updates,
    offsets,
)
from localssl.rules.registry import register_rule


@dataclass
class PatchOptions(RuleOptions):
    """Options shared by the patch rules.

    steps: prediction steps K (GIM/CLAPP ``--prediction_step 5``); skip: rows
      skipped before the first target (the reference's ``skip_step=1``: step
      k predicts k + 1 rows down); crop / crop_padding: the training view, a
      random ``crop`` px square after ``crop_padding`` px of reflection, and a
      flip (GIM: 64 of 96, no padding).
    """

    steps: int = 5
    skip: int = 1
    crop: int = 64
    crop_padding: int = 0

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")
        if self.crop < 1 or self.crop_padding < 0:
            raise ValueError(f"crop must be >= 1 px and crop_padding >= 0, got {self.crop}, {self.crop_padding}")


@dataclass
class CPCOptions(PatchOptions):
    """GIM's options; negatives: N per context position (GIM ``--negative_samples 16``)."""

    negatives: int = 16

    def check(self) -> None:
        super().check()
        if self.negatives < 1:
            raise ValueError(f"negatives must be >= 1, got {self.negatives}")


@dataclass
class CLAPP2021Options(PatchOptions):
    """CLAPP 2021's options.

    synchronous: False (CLAPP): each sample takes either its positive or its
      negative term, the positive with probability ``p`` (the reference's
      ``--either_pos_or_neg_update``, p = 0.5); True (CLAPP-s): both terms.
    asymmetric: two predictors per step, u1 = sg(z) W1 c trains the context
      side and u2 = z W2 sg(c) the target side, so no weight is used in both
      directions (``--asymmetric_W_pred``, in the reference's CLAPP script).
    negatives: 0 (CLAPP): one, the same place in another image
      (``--negative_samples 1 --sample_negs_locally_same_everywhere``); N >= 1:
      N from every image and position, as GIM's. The reference's CLAPP-s
      script: ``synchronous=true asymmetric=false negatives=16``.
    """

    synchronous: bool = False
    p: float = 0.5
    asymmetric: bool = True
    negatives: int = 0

    def check(self) -> None:
        super().check()
        if not 0 < self.p < 1:
            raise ValueError(f"p must be in (0, 1), got {self.p}")
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0 (0: the same place in another image), got {self.negatives}")


def _predictor(c_c: int, c_z: int) -> nn.Parameter:
    # W_k as GIM's bias-free 1x1 conv from z's channels to c's, PyTorch's default (Kaiming-uniform) init.
    return nn.Parameter(nn.Linear(c_z, c_c, bias=False).weight.detach().clone())


class PatchPredictive(Rule):
    """Predict the codes k rows below from a patch's code (GIM's CPC or CLAPP's hinge), per block or at the top."""

    view_maker = "patches"
    layout = ViewLayout(1, "rows")

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: PatchOptions,
                 grids: Sequence[int] | None, loss: str, local: bool) -> None:
        super().__init__(feature_shapes, options, grids)
        options.check()
        self.local = local
        self.kind = loss
        if self.run_grids is None or len(self.run_grids) != self.num_blocks:
            raise ValueError(f"patch rules need one pooling grid per block ({self.num_blocks}), got {self.run_grids}")
        self.loss_blocks = list(range(self.num_blocks)) if local else [self.num_blocks - 1]
        self.tiles: list[tuple[int, int] | None] = []
        self.offsets: list[list[int]] = []
        for b in self.loss_blocks:
            shape, grid = self.feature_shapes[b], self.run_grids[b]
            if len(shape) != 3:
                self.tiles.append(None)  # no rows of codes: `unsupported` says so
                self.offsets.append([])
                continue
            _, h, w = shape
            if h % grid or w % grid:
                raise ValueError(f"pooling grid {grid} does not divide block {b + 1}'s {h}x{w} map")
            self.tiles.append((h // grid, w // grid))
            self.offsets.append(offsets(grid, options.steps, options.skip))
        sides = 2 if loss == "hinge" and getattr(options, "asymmetric", False) else 1
        self.predictors = nn.ModuleList(
            nn.ModuleList(nn.ParameterList(_predictor(self._channels(b), self._channels(b)) for _ in offs)
                          for _ in range(sides))
            for b, offs in zip(self.loss_blocks, self.offsets))

    def _channels(self, b: int) -> int:
        return int(self.feature_shapes[b][0])

    def unsupported(self) -> str | None:
        need = self.options.skip + 2
        for g, b in enumerate(self.loss_blocks):
            if self.tiles[g] is None or not self.offsets[g]:
                rows = 0 if self.tiles[g] is None else self.run_grids[b]
                return (f"block {b + 1} pools to {rows} row(s) of patch codes; predicting {self.options.skip + 1} "
                        f"or more rows down (skip={self.options.skip}) needs >= {need}: use a patched encoder "
                        "(e.g. --encoder gim-resnet) or finer --grids")
        return None

    def view_options(self) -> dict[str, Any]:
        return {"crop": self.options.crop, "padding": self.options.crop_padding}

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        """The grid of patch codes (N, C, Y, X): each tile of the mosaic averaged (one patch's code)."""
        tile = self.tiles[g]
        if tile is None:
            return h
        if h.shape[-2] % tile[0] or h.shape[-1] % tile[1]:
            raise ValueError(f"a {h.shape[-2]}x{h.shape[-1]} map is not made of the rule's {tile[0]}x{tile[1]} tiles")
        return h if tile == (1, 1) else block_mean(h, *tile)

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        offs = self.offsets[g]
        if z.dim() != 4 or not offs:
            raise ValueError(self.unsupported() or "no patch grid")
        if z.shape[2] <= offs[-1]:
            raise ValueError(f"the views give {z.shape[2]} rows of patch codes at block {self.loss_blocks[g] + 1}, "
                             f"too few for steps={len(offs)} (a target {offs[-1]} rows down): lower steps or "
                             "enlarge crop")
        skip, weights = self.options.skip, self.predictors[g]
        if self.kind == "cpc":
            negs = draw_cpc_negatives(z.shape, offs, self.options.negatives, z.device)
            return cpc_info_nce(z, z, list(weights[0]), skip, negs)
        opt: CLAPP2021Options = self.options  # type: ignore[assignment]
        other = draw_other_images(z.shape[0], z.device) if opt.negatives == 0 else None
        anywhere = draw_cpc_negatives(z.shape, offs, opt.negatives, z.device) if opt.negatives else None
        positive = None if opt.synchronous else draw_updates(z.shape[0], opt.p, z.device)
        if not opt.asymmetric:
            return clapp_hinge(z, z, list(weights[0]), skip, other, positive, anywhere)
        # The reference's loss(z, sg(c)) + loss_mirror(sg(z), c), one draw shared by both.
        return (clapp_hinge(z.detach(), z, list(weights[0]), skip, other, positive, anywhere)
                + clapp_hinge(z, z.detach(), list(weights[1]), skip, other, positive, anywhere))

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return [p for side in self.predictors[g] for p in side]


register_rule("gim", CPCOptions, counterpart="bp-cpc")(
    lambda shapes, opt, grids: PatchPredictive(shapes, opt, grids, loss="cpc", local=True))
register_rule("bp-cpc", CPCOptions)(
    lambda shapes, opt, grids: PatchPredictive(shapes, opt, grids, loss="cpc", local=False))
register_rule("clapp2021", CLAPP2021Options, counterpart="bp-clapp2021")(
    lambda shapes, opt, grids: PatchPredictive(shapes, opt, grids, loss="hinge", local=True))
register_rule("bp-clapp2021", CLAPP2021Options)(
    lambda shapes, opt, grids: PatchPredictive(shapes, opt, grids, loss="hinge", local=False))
