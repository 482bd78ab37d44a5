"""What a learning rule is, to the trainer.

A rule is a thin object (STYLE principle 2): its loss, where its context comes
from, and which parameters it owns. It declares how the encoder's blocks are
grouped (`Group`); every group trains on its own loss, back-propagated through
its own blocks only, from a detached input. Local rules put every block in its
own group; end-to-end BP is the same machinery with a single group holding
every block, so nothing is detached. Groups may overlap (LoCo, METHODS 5.2): a
block in two groups gets the gradient of both losses, and still nothing
crosses below a group's first block.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from localssl.data.augment import ViewLayout

FEEDBACK_KINDS = ("trainable", "identity", "fixed")


@dataclass(frozen=True)
class Group:
    """One loss and the consecutive blocks it trains.

    The loss reads the output of the group's last block; its gradient flows
    through ``blocks`` and stops at their input, the detached output of block
    ``blocks[0] - 1`` (``input``; -1: the images). A block's output is
    computed once per step for the groups that take it as input, whichever
    group computed it.
    """

    blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        b = tuple(int(k) for k in self.blocks)
        if not b or b[0] < 0 or b != tuple(range(b[0], b[0] + len(b))):
            raise ValueError(f"a group's blocks must be consecutive block indices >= 0, got {list(self.blocks)}")
        object.__setattr__(self, "blocks", b)

    @property
    def input(self) -> int:
        """The block whose (detached) output feeds this group; -1 for the images."""
        return self.blocks[0] - 1

    @property
    def output(self) -> int:
        """The block whose output the group's loss reads."""
        return self.blocks[-1]


def check_groups(groups: Sequence[Group], num_blocks: int) -> None:
    """Groups a trainer can run: inside the encoder, every block trained by some group, in input order."""
    if not groups:
        raise ValueError("a rule needs at least one group")
    if groups[-1].output >= num_blocks or any(g.output >= num_blocks for g in groups):
        raise ValueError(f"groups {[list(g.blocks) for g in groups]} reach past the encoder's {num_blocks} blocks")
    if [g.input for g in groups] != sorted(g.input for g in groups):
        raise ValueError("groups must be ordered by their first block (each one's input exists before it runs)")
    untrained = sorted(set(range(num_blocks)) - {b for g in groups for b in g.blocks})
    if untrained:
        raise ValueError(f"blocks {[b + 1 for b in untrained]} belong to no group and would never train")


@dataclass(frozen=True)
class Inference:
    """How a rule with schedule "inference" relaxes its latents in every step (`localssl.engine.inference`).

    ``iterations`` gradient steps of size ``step_size`` (per view) on the
    energy; ``backtrack``: a step that would raise the energy is retried at
    half the size (for the rest of that training step), so the energy never
    rises whatever the size asked for.
    """

    iterations: int
    step_size: float
    backtrack: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not self.step_size >= 0:
            raise ValueError(f"step_size must be >= 0, got {self.step_size}")


@dataclass(frozen=True)
class OptimizerHint:
    """How some of a rule's own parameters ask to be optimised, when not like the encoder's.

    The builder (`localssl.builder.build_optimizer`) gives the parameters
    with equal hints their own optimizer (``optimizer``: a name it knows,
    e.g. "sgd" with ``momentum``) while every other parameter keeps the run's
    optimizer; a hinted group's lr is the run's lr (every step of its
    schedule) times ``lr_scale``. Why a rule would: CLAPP++'s spatial B
    holds ~16x the encoder's parameters at full width, and AdamW's two
    moments on it cost more memory than local training saves (METHODS 2.2b).
    """

    optimizer: str
    momentum: float = 0.0
    lr_scale: float = 1.0


@dataclass
class RuleOptions:
    """Base of a rule's own options: one small dataclass per rule family (STYLE principle 11).

    Options come from YAML (``rule_options: {f: softplus}``) or the command
    line (``--rule-opt f=softplus``) and are typed and checked by the rule's
    dataclass (`localssl.rules.registry.rule_options`): an unknown key lists
    the valid ones. ``check`` catches impossible values before training.
    """

    def check(self) -> None:
        """Raise ``ValueError`` naming the option for a value that cannot work."""

    def check_training(self) -> None:
        """Raise ``ValueError`` for values that define a loss but cannot be trained on (checked by `train`)."""


class Rule(nn.Module):
    """Base class of all learning rules.

    Subclasses set ``local`` and ``needs_top_context`` and implement
    ``objective`` (plus ``represent``/``context`` when the loss reads a
    pooled summary of the block output), and ``groups`` and
    ``group_parameters`` where the defaults do not fit.
    """

    #: True: one group per block, inputs detached; False: end-to-end.
    local: bool = True
    #: True: the trainer hands the (detached) top block output to every loss.
    needs_top_context: bool = False
    #: Smallest number of images per batch for which the loss is defined.
    min_batch: int = 2
    #: How the groups train: all every step ("simultaneous"), one after the other ("sequential",
    #: `localssl.engine.step.SequentialStep`), or from prediction errors settled by iterative inference
    #: on latent activities ("inference", predictive coding: `localssl.engine.inference.InferenceStep`,
    #: which reads `inference`, `prediction_energy` and the top group's `loss` as the top energy term).
    schedule: str = "simultaneous"
    #: True: every group trains on its own loss, back-propagated through its own blocks from a detached input
    #: (what the per-group contracts of tests/test_rules.py check). False (predictive coding): a block's update
    #: is the gradient of its own prediction error at latents that the inference loop settled, so one group's
    #: loss cannot be isolated, summed or micro-batched; such a rule's own tests check the local equivalent.
    group_losses: bool = True
    #: Schedule "inference": how the latent activities relax in every training step.
    inference: Inference | None = None
    #: The view maker the rule trains on (`localssl.data.augment.VIEW_MAKERS`) and the layout of its batches.
    view_maker: str = "simclr"
    layout: ViewLayout = ViewLayout(2, "rows")
    #: True when `handoff` changes block outputs (noise injection): the step cannot be micro-batched then.
    perturbs: bool = False

    def __init__(self, feature_shapes: Sequence[tuple[int, ...]], options: RuleOptions | None = None,
                 grids: Sequence[int] | None = None) -> None:
        """``feature_shapes``: every block's output shape (C, H, W) or (D,); ``grids``: the run's pooling
        grid per block (METHODS 2.2), which a rule that pools its loss spatially uses and others ignore."""
        super().__init__()
        self.feature_shapes = [tuple(s) for s in feature_shapes]
        self.options = options if options is not None else RuleOptions()
        self.run_grids = None if grids is None else [int(g) for g in grids]

    @property
    def num_blocks(self) -> int:
        return len(self.feature_shapes)

    def groups(self) -> list[Group]:
        """The groups of blocks that train on one loss each (see `Group`)."""
        if self.local:
            return [Group((k,)) for k in range(self.num_blocks)]
        return [Group(tuple(range(self.num_blocks)))]

    def loss(self, g: int, h: torch.Tensor, top: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss of group ``g`` given its last block's output ``h`` (2B views).

        ``top`` is the top block's output (DFB context), when the rule asks for it.
        """
        return self.objective(g, self.represent(g, h), None if top is None else self.context(top))

    # A loss is split in two so that the trainer can micro-batch a step
    # (`train_step(micro_batch=...)`): ``represent`` maps each row of a block
    # output on its own (pooling), so it can run chunk by chunk; ``objective``
    # sees the whole batch of these (small) representations, where the
    # negatives and contexts of other rows live.

    def unsupported(self) -> str | None:
        """Why this rule's loss is undefined on its block shapes and grids (None: it is defined).

        The patch rules need rows of patch codes below a context row; a block
        that pools to one row (or gives a vector) has none. The builder turns a
        reason into a config error; the contract tests skip such an encoder
        for such a rule with this reason.
        """
        return None

    def view_options(self) -> dict[str, Any]:
        """Keyword options of the rule's view maker beyond size and normalisation (the patch rules' crop)."""
        return {}

    def handoff(self, block: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``block``'s output as its group's loss and the next group see it (default: unchanged).

        Blockwise SSL injects noise here while training (METHODS 5.1); the
        same tensor reaches the head and the block above.
        """
        return h

    def represent(self, g: int, h: torch.Tensor) -> torch.Tensor:
        """What group ``g``'s loss reads of its output ``h``, computed row by row.

        Row i of the result must depend on row i of ``h`` only, and on no
        trainable parameter of the rule. Default: ``h`` itself.
        """
        return h

    def context(self, top: torch.Tensor) -> torch.Tensor:
        """What the loss reads of the top block's output (rules with ``needs_top_context``); row by row."""
        return top

    def objective(self, g: int, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss of group ``g`` from the batch's representations ``z`` (and top ``context``)."""
        raise NotImplementedError

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        """The rule's own trainable parameters that group ``g``'s loss trains."""
        return []

    def optimizer_hint(self, p: nn.Parameter) -> OptimizerHint | None:
        """How the rule's parameter ``p`` asks to be optimised (None, the default: like the encoder's)."""
        return None

    def prediction_energy(self, block: int, x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
        """Schedule "inference": the energy of block ``block``'s prediction error, latent ``x`` against the
        prediction ``mu`` that the block makes of it from the latent below; a scalar, averaged over the views."""
        raise NotImplementedError(f"{type(self).__name__} has no prediction energy (schedule {self.schedule!r})")

    def extra_repr(self) -> str:
        return f"local={self.local}, groups={len(self.groups())}"
