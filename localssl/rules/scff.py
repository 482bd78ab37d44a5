"""SCFF: self-contrastive Forward-Forward (Chen et al., Nat. Commun. 2025; METHODS 5.3).

Every block is its own group (a local rule): its loss is SCFF's goodness
loss (`localssl.rules.goodness`) on its output, high goodness for the rows
of positive pairs, low for the rows of negative pairs, each block with its
own thresholds. The pairs come from the rule's view maker
(`localssl.data.pairs`): rows [positives; negatives], each row the mean of its
pair's two halves, which is what SCFF's first layer, shared weights on both
halves summed, computes on the concatenation. A single image (the probes) is
its own self-concatenation, as SCFF's probe encodes it.

Where this differs from the reference code (neurophysics-cnrsthales/
contrastive-forward-forward), said once here:
- goodness is read from the block's output (after its activation and pool),
  the only activity a rule sees; the reference takes it from ReLU of the
  conv output, before the triangle and the pool. On VGG-6, whose blocks end
  in ReLU, the two differ only by the pool;
- the blocks above the first train on the lower block's outputs for the
  positive and the negative rows, as the reference trains its layer 2
  (``concat`` off at ``--NL 2``); its layer 3 (``concat`` on at ``--NL 3``)
  instead pairs layer 2's outputs for the positives anew;
- by default all blocks train together from the start (``schedule:
  simultaneous``, as every local rule here, for comparisons at one budget);
  the reference trains layer after layer (6, 4, 21 epochs on CIFAR-10),
  which ``schedule: sequential`` does with an equal share of the steps per
  block (`localssl.engine.step.SequentialStep`);
- on ``scff-cifar`` the first block standardises the halves' mean, which
  rescales a negative to unit variance where the reference keeps its lower
  energy (``--encoder-opt first_norm=false`` keeps it; `localssl.models.scff`);
- the thresholds of blocks past the reference's three (VGG-6 has six) repeat
  its last ones: ours, not the paper's;
- the probes are localssl's own, the same for every rule; the reference's
  readout standardises each image's features (``stdnorm_out``) and trains a
  linear layer with dropout on all three layers' 2 x 2-pooled outputs (the
  ``all`` features here, grids 8-4-2 at 32 px).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from localssl.data.pairs import PAIRS_LAYOUT
from localssl.rules.base import Rule, RuleOptions
from localssl.rules.goodness import goodness, scff_loss
from localssl.rules.registry import register_rule

SCHEDULES = ("simultaneous", "sequential")
#: Rule option ``positive`` -> the view maker that builds the pairs (`localssl.data.pairs`).
POSITIVES = {"same": "pairs-same", "views": "pairs-views"}


@dataclass
class SCFFOptions(RuleOptions):
    """Options of SCFF (METHODS 5.3).

    positive: ``same``, a positive is one image concatenated with itself (the
       reference's CIFAR-10 run, ``augment="no"``); ``views``, two augmented
       views of it (``augment="dual"``).
    theta_pos, theta_neg, lamda: per block, the positive and negative
       goodness thresholds and the weight of the L2 norm of the positive
       goodness; blocks past a list's end take its last value. Defaults: the
       reference's CIFAR-10 values for its three layers (``config.json``:
       ``th1``, ``th2``, ``lamda``).
    schedule: ``simultaneous`` (every block every step) or ``sequential``
       (block after block, the reference's way).
    """

    positive: str = "same"
    theta_pos: list[float] = field(default_factory=lambda: [0.0, 5.0, 6.0])
    theta_neg: list[float] = field(default_factory=lambda: [1.0, 9.0, 10.0])
    lamda: list[float] = field(default_factory=lambda: [0.0012, 0.0007, 0.0005])
    schedule: str = "simultaneous"

    def check(self) -> None:
        if self.positive not in POSITIVES:
            raise ValueError(f"unknown positive {self.positive!r}; valid: {', '.join(POSITIVES)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        for key in ("theta_pos", "theta_neg", "lamda"):
            if not getattr(self, key):
                raise ValueError(f"{key} needs at least one value (one per block; the last repeats)")
        if any(v < 0 for v in self.lamda):
            raise ValueError(f"lamda must be >= 0 per block, got {self.lamda}")

    def per_block(self, key: str, num_blocks: int) -> list[float]:
        """Option ``key`` for each of ``num_blocks`` blocks, the list's last value repeated past its end."""
        values = [float(v) for v in getattr(self, key)]
        return (values + [values[-1]] * num_blocks)[:num_blocks]


class SCFF(Rule):
    """Self-contrastive Forward-Forward: a goodness loss per block on positive and negative pair rows."""

    local = True
    layout = PAIRS_LAYOUT
    options: SCFFOptions

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: SCFFOptions | None = None,
                 grids: Sequence[int] | None = None) -> None:
        super().__init__(feature_shapes, options or SCFFOptions(), grids)
        self.options.check()
        self.view_maker = POSITIVES[self.options.positive]
        self.schedule = self.options.schedule
        n = self.num_blocks
        self.theta_pos = self.options.per_block("theta_pos", n)
        self.theta_neg = self.options.per_block("theta_neg", n)
        self.lamda = self.options.per_block("lamda", n)

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        return goodness(h)

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        n = z.shape[0]
        if n % 2:
            raise ValueError(f"an SCFF batch holds as many negative as positive rows, got {n} rows")
        return scff_loss(z[: n // 2], z[n // 2:], self.theta_pos[g], self.theta_neg[g], self.lamda[g])

    def extra_repr(self) -> str:
        return f"positive={self.options.positive}, theta_pos={self.theta_pos}, theta_neg={self.theta_neg}"


register_rule("scff", SCFFOptions)(SCFF)
