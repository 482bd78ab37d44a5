"""One training step: every group's forward, loss and backward, then one update.

The step is a seam (`Step`): the loop in `engine.trainer` calls
``step(encoder, rule, optimizer, views, index)`` and never looks inside, so a
new way to run a step (pipelined across devices, iterative inference) is one
more class here, not a change to the loop. Three exist here (and
`localssl.engine.inference.InferenceStep`, predictive coding's):
- `PlainStep`: groups one after another; each group's graph is freed before
  the next is built, so the activation memory is one group's, not the sum.
- `MicroBatchedStep`: the same gradient, holding one chunk of views at a time
  (METHODS 2.2b; GradCache for end-to-end rules).
- `SequentialStep`: blockwise SSL's sequential mode (METHODS 5.1): group k
  trains alone for its share of the steps, the groups below it frozen.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from localssl.data.augment import ViewBatch, ViewLayout
from localssl.engine.runtime import autocast
from localssl.models import BlockEncoder
from localssl.rules import Group, Rule


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf; the run stops and keeps its last good checkpoint."""


Losses = list[torch.Tensor | None]
"""Each group's detached loss this step; None for a group that did not train (sequential mode)."""


def unpack(views: torch.Tensor | ViewBatch, rule: Rule) -> torch.Tensor:
    """The tensor of a batch, after checking that its layout is the one the rule's loss reads.

    A plain tensor is taken as the default layout ([view 1; view 2] rows), as the
    benchmarks and the gradient analyses build it.
    """
    if isinstance(views, ViewBatch):
        if views.layout != rule.layout:
            raise ValueError(f"{type(rule).__name__} reads batches laid out as {rule.layout}, got {views.layout}: "
                             f"build the views with the rule's view maker {rule.view_maker!r}")
        return views.x
    if rule.layout != ViewLayout():
        raise ValueError(f"{type(rule).__name__} reads batches laid out as {rule.layout}: pass a ViewBatch")
    return views


class Step(ABC):
    """How one step runs. Subclasses implement ``__call__``; they hold options, never model state.

    ``views`` is a `ViewBatch` (or a tensor in the default layout); `unpack` checks it.
    """

    @abstractmethod
    def __call__(self, encoder: BlockEncoder, rule: Rule, optimizer: torch.optim.Optimizer | None,
                 views: torch.Tensor, index: int = 0, *, device: torch.device | None = None,
                 amp_dtype: torch.dtype | None = None) -> Losses:
        """Step ``index`` (0-based) on a batch of stacked views; returns every group's loss.

        With ``optimizer=None`` only the gradients are computed and left in
        ``.grad`` (gradient alignment and tests).
        """

    def lr_span(self, index: int, total: int, num_groups: int) -> tuple[int, int]:
        """Where step ``index`` of a ``total``-step run sits in the lr schedule: (position, length).

        Default: one schedule over the whole run. A step that trains the groups
        one after the other gives each its own (`SequentialStep`).
        """
        return index, total

    def metrics(self) -> dict[str, float]:
        """What the last step measured beyond its losses, for the metric log (default: nothing)."""
        return {}


def train_step(
    encoder: BlockEncoder,
    rule: Rule,
    optimizer: torch.optim.Optimizer | None,
    views: torch.Tensor | ViewBatch,
    device: torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    micro_batch: int | None = None,
) -> list[torch.Tensor]:
    """One plain step (or micro-batched, with chunks of ``micro_batch`` views); every group's loss.

    A chunk as large as the batch is the plain step. A rule whose schedule is
    "inference" (predictive coding) learns only through its own step,
    `localssl.engine.inference.InferenceStep`, which this runs instead.
    """
    n = views.x.shape[0] if isinstance(views, ViewBatch) else views.shape[0]
    step: Step
    if rule.schedule == "inference":
        from localssl.engine.inference import InferenceStep  # it builds on this module

        if micro_batch is not None and micro_batch < n:
            raise ValueError("micro-batching and the inference step do not combine: unset micro_batch")
        step = InferenceStep.for_rule(rule)
    else:
        step = PlainStep() if micro_batch is None or micro_batch >= n else MicroBatchedStep(micro_batch)
    return step(encoder, rule, optimizer, views, device=device, amp_dtype=amp_dtype)  # type: ignore[return-value]


def _amp(views: torch.Tensor, device: torch.device | None, amp_dtype: torch.dtype | None) -> Callable:
    """A factory of the step's autocast context (a fresh one per ``with``)."""
    dev = device or views.device
    return lambda: autocast(dev, amp_dtype)


def check_finite(losses: Losses, groups: Sequence[Group]) -> None:
    """One check (one device sync on a GPU) for all groups, before any update."""
    ran = [(g, v) for g, v in enumerate(losses) if v is not None]
    finite = torch.isfinite(torch.stack([v for _, v in ran]))
    if not finite.all():
        g, v = ran[int((~finite).nonzero()[0, 0])]
        raise NonFiniteLossError(f"loss of group {g + 1} (blocks {[b + 1 for b in groups[g].blocks]}) is {v.item()}")


_NORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def batch_coupling_modules(encoder: nn.Module) -> list[str]:
    """Modules whose output row depends on other rows in training mode (batch statistics)."""
    return [name for name, m in encoder.named_modules() if isinstance(m, _NORM) and m.training]


def some_names(names: Sequence[str], most: int = 3) -> str:
    """A few names of a list that may be long (a ResNet has 20 to 53 BatchNorms)."""
    rest = len(names) - most
    return ", ".join(names[:most]) + (f" and {rest} more" if rest > 0 else "")


@contextmanager
def _norm_stats_kept(block: nn.Module) -> Iterator[None]:
    """Run ``block`` without changing its BatchNorm running statistics.

    A block shared by two overlapping groups (LoCo) runs twice per step on
    the same input; its running statistics must move once, as they would
    with the block in one group only. The forward inside updates copies of
    the buffers, which are then dropped; the originals are never written in
    place (autograd may have saved them for a backward still to come).
    """
    norms = [m for m in block.modules() if isinstance(m, _NORM)]
    saved = [dict(m._buffers) for m in norms]
    try:
        for m, bufs in zip(norms, saved):
            for name, buf in bufs.items():
                if buf is not None:
                    setattr(m, name, buf.clone())
        yield
    finally:
        for m, bufs in zip(norms, saved):
            for name, buf in bufs.items():
                setattr(m, name, buf)


class _Forward:
    """Block outputs a step has computed (detached), kept only while a later group still needs them."""

    def __init__(self, groups: Sequence[Group], x: torch.Tensor) -> None:
        self.outputs: dict[int, torch.Tensor] = {-1: x}
        self.ran: set[int] = set()
        # The last group that reads block b's output: after it, the output is dropped.
        self.last_use = {g.input: i for i, g in enumerate(groups)}

    def run(self, encoder: BlockEncoder, rule: Rule, g: int, group: Group,
            start: torch.Tensor | None = None) -> torch.Tensor:
        """Group ``group``'s forward with a graph through its blocks only; returns its last block's output.

        ``start``: the group's input as given, not detached (a pipeline stage whose input's gradient is sent
        back to the stage below, `localssl.engine.pipeline`)."""
        h = self.outputs[group.input].detach() if start is None else start  # the cut: no gradient crosses it
        if self.last_use.get(group.input) == g and group.input >= 0:
            del self.outputs[group.input]
        for b in group.blocks:
            block = encoder.blocks[b]
            if b in self.ran:
                with _norm_stats_kept(block):
                    h = block(h)
            else:
                h = block(h)
                self.ran.add(b)
            h = rule.handoff(b, h)
            if b not in self.outputs and b in self.last_use and self.last_use[b] > g:
                self.outputs[b] = h.detach()
        return h


def _top_context(encoder: BlockEncoder, rule: Rule, views: torch.Tensor, ctx: Callable) -> torch.Tensor | None:
    if not rule.needs_top_context:
        return None
    # DFB context: the other view's top-layer output, with no gradient (and no running-statistics update:
    # the groups' own forwards move them).
    with torch.no_grad(), ctx(), _norm_stats_kept(encoder):
        return encoder.run_blocks(views, range(len(encoder)))


class PlainStep(Step):
    """Every group in turn: forward through its blocks, its loss, its backward; then one optimizer step.

    The hooks (``_begin``, ``_group_loss``, ``_after_backward``, ``_finish``) are where a data-parallel
    step (`localssl.engine.distributed.DataParallelStep`) gathers representations and averages gradients;
    here they do nothing beyond the plain loss, so the loop itself exists once.
    """

    def __call__(self, encoder, rule, optimizer, views, index=0, *, device=None, amp_dtype=None) -> Losses:
        views = unpack(views, rule)
        ctx = _amp(views, device, amp_dtype)
        groups = rule.groups()
        top = _top_context(encoder, rule, views, ctx)
        with self._guard():
            state = self._begin(encoder, rule, top)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            forward = _Forward(groups, views)
            losses: Losses = []
            for g, group in enumerate(groups):
                with ctx():
                    out = forward.run(encoder, rule, g, group)
                    loss = self._group_loss(rule, g, out, state)
                loss.backward()
                self._after_backward(g)
                losses.append(loss.detach())
                del out, loss  # this group's graph is freed here
        self._finish()
        check_finite(losses, groups)
        if optimizer is not None:
            optimizer.step()
        return losses

    def _guard(self) -> contextlib.AbstractContextManager:
        """Around the step's forwards and backwards (a distributed step names what it waits for)."""
        return contextlib.nullcontext()

    def _begin(self, encoder: BlockEncoder, rule: Rule, top: torch.Tensor | None) -> torch.Tensor | None:
        """Before the first group: what `_group_loss` reads as the DFB context (here the top output as is)."""
        return top

    def _group_loss(self, rule: Rule, g: int, out: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        """Group ``g``'s loss from its last block's output."""
        return rule.loss(g, out, top)

    def _after_backward(self, g: int) -> None:
        """After group ``g``'s backward (its gradients are final)."""

    def _finish(self) -> None:
        """After the last group's backward, before the finiteness check and the update."""


class MicroBatchedStep(Step):
    """The plain step's gradient, holding the activations of one chunk of ``micro_batch`` views at a time.

    A loss reads the whole batch (negatives and contexts are other rows), but
    only through each group's small representation z = represent(h) (the
    pooled map), and every block maps rows independently. So (METHODS 2.2b):
      1. no graph: every chunk through every block; keep each group's z
         (and the DFB context), never a full-batch activation;
      2. each group's loss on the whole batch of z: its backward gives the
         rule's own gradients (B) and dL/dz;
      3. every chunk again, group by group with a graph one group deep,
         back-propagating dL/dz[chunk] into the group's weights.
    The weight gradient is a sum over rows, so this equals the plain step's
    gradient up to float rounding (tests/test_rules.py checks it for every
    rule), at the cost of one more forward pass. The same holds for an
    end-to-end rule (its single group is the whole encoder): that is
    GradCache (Gao et al. 2021) for BP-InfoNCE.
    """

    def __init__(self, micro_batch: int) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 views, got {micro_batch}")
        self.micro_batch = micro_batch

    def __call__(self, encoder, rule, optimizer, views, index=0, *, device=None, amp_dtype=None) -> Losses:
        views = unpack(views, rule)
        if rule.perturbs:
            raise ValueError("micro-batching recomputes every block output, and this rule perturbs them at random "
                             "(noise injection): unset micro_batch, or the rule's noise")
        coupled = batch_coupling_modules(encoder)
        if coupled:
            raise ValueError(
                f"micro-batching needs blocks that map each row on its own; {some_names(coupled)} use batch "
                "statistics (BatchNorm): set micro_batch to None or use an encoder without them"
            )
        ctx = _amp(views, device, amp_dtype)
        groups = rule.groups()
        chunks = views.split(self.micro_batch)
        # 1. Representations (and the DFB context) of the whole batch, chunk by chunk.
        reps: list[list[torch.Tensor]] = [[] for _ in groups]
        tops: list[torch.Tensor] = []
        with torch.no_grad(), ctx():
            for x in chunks:
                outs = encoder(x)
                for g, group in enumerate(groups):
                    reps[g].append(rule.represent(g, outs[group.output]))
                if rule.needs_top_context:
                    tops.append(rule.context(outs[-1]))
                del outs
        top = torch.cat(tops) if tops else None
        # 2. The losses on the whole batch: gradients of the rule's parameters and dL/dz.
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        losses: Losses = []
        dz = []
        for g in range(len(groups)):
            z = torch.cat(reps[g]).requires_grad_()
            reps[g] = []
            with ctx():
                loss = rule.objective(g, z, top)
            loss.backward()
            dz.append(z.grad.split(self.micro_batch))
            losses.append(loss.detach())
        check_finite(losses, groups)  # before the recomputation that a NaN would waste
        # 3. Each chunk again, group by group; no gradient crosses below a group's first block.
        for c, x in enumerate(chunks):
            forward = _Forward(groups, x)
            for g, group in enumerate(groups):
                with ctx():
                    out = forward.run(encoder, rule, g, group)
                    z = rule.represent(g, out)
                z.backward(dz[g][c])
                del out, z
        if optimizer is not None:
            optimizer.step()
        return losses


class SequentialStep(Step):
    """Sequential blockwise training (METHODS 5.1): group k trains alone for steps
    [k * steps_per_group, (k + 1) * steps_per_group); the last group keeps training after that.

    The groups below the active one are frozen: they run without a graph and
    in eval mode (their BatchNorm uses, and no longer moves, its running
    statistics), so what they learnt stays as it was when their turn ended.
    The groups above it do not run. Overlapping groups would let the active
    loss move a frozen block, so they are refused.
    """

    def __init__(self, steps_per_group: int) -> None:
        if steps_per_group < 1:
            raise ValueError(f"steps_per_group must be >= 1, got {steps_per_group}")
        self.steps_per_group = steps_per_group

    def active(self, index: int, num_groups: int) -> int:
        return min(index // self.steps_per_group, num_groups - 1)

    def lr_span(self, index: int, total: int, num_groups: int) -> tuple[int, int]:
        """Each group's own warmup and schedule over its share of the run.

        A group starts untrained when its turn comes: one cosine over the whole
        run would give the first stage the high lr and the last stage only the
        tail of the decay. Sequential blockwise SSL trains every stage as a run
        of its own (Siddiqui et al. 2023, METHODS 5.1), so the schedule restarts
        with each group; the last group's span runs to the end of the run.
        """
        k = self.active(index, num_groups)
        start = k * self.steps_per_group
        end = total if k == num_groups - 1 else min(total, start + self.steps_per_group)
        return index - start, max(1, end - start)

    def __call__(self, encoder, rule, optimizer, views, index=0, *, device=None, amp_dtype=None) -> Losses:
        views = unpack(views, rule)
        groups = rule.groups()
        if any(set(a.blocks) & set(b.blocks) for i, a in enumerate(groups) for b in groups[i + 1:]):
            raise ValueError("sequential training needs groups that do not overlap")
        ctx = _amp(views, device, amp_dtype)
        k = self.active(index, len(groups))
        group = groups[k]
        frozen = [encoder.blocks[b] for b in range(group.input + 1)]
        modes = [m.training for m in frozen]
        try:
            for m in frozen:
                m.eval()
            with torch.no_grad(), ctx():
                h = encoder.run_blocks(views, range(group.input + 1))
            top = _top_context(encoder, rule, views, ctx)
        finally:
            for m, mode in zip(frozen, modes):
                m.train(mode)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        with ctx():
            out = h
            for b in group.blocks:
                out = rule.handoff(b, encoder.blocks[b](out))
            loss = rule.loss(k, out, top)
        loss.backward()
        losses: Losses = [None] * len(groups)
        losses[k] = loss.detach()
        del out, loss
        check_finite(losses, groups)
        if optimizer is not None:
            optimizer.step()
        return losses


__all__ = ["Step", "PlainStep", "MicroBatchedStep", "SequentialStep", "train_step", "check_finite",
           "batch_coupling_modules", "NonFiniteLossError", "Losses", "unpack"]
