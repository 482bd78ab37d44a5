"""The step of rules that learn from settled prediction errors (``Rule.schedule == "inference"``).

Predictive coding (Whittington & Bogacz 2017; Millidge, Tschantz & Buckley
2022; METHODS 5.3) runs an inner loop before any weight moves: latent
activities x_l, one per block and view, relax on an energy, and each block's
weights then follow the gradient of its own prediction error at the settled
latents. The loop is a `Step` like the others, so the trainer does not change:

1. feedforward, no graph: x_l = f_l(x_{l-1}), x_0 = the views (clamped).
   This is the one pass that moves BatchNorm running statistics; the energy
   evaluations below keep them (`_norm_stats_kept`), as a block run twice in
   LoCo does;
2. the energy E(x) = sum_l rule.prediction_energy(l, x_l, f_l(x_{l-1})) +
   rule.loss(top, x_L), a mean over the N views, with a graph; T times:
   x <- x - eta * N * dE/dx (N * dE/dx is each view's own energy gradient,
   so every view relaxes with step eta whatever the batch size: the
   per-sample dynamics of the papers), and E again at the new latents. With
   backtracking (`Inference.backtrack`) a step that would raise E is
   retried at half the size, and the halved size kept for the step's
   remaining iterations; where no size down to 1/1024 of it lowers E,
   inference stops (`MAX_HALVINGS`);
3. the backward of the last E, whose latents are leaves: each block's
   weights get dE/dW_l through f_l(x_{l-1}) alone (no gradient crosses a
   block boundary: the latents are cut there), the rule's own parameters
   their gradient of the top term; then one optimizer step, as every step.

A step costs T + 1 forward and backward passes of the whole encoder (BP: 1),
plus one forward per rejected step (and one where inference stops early). ``energies`` holds the last step's E at
t = 0 .. T (t = 0: the feedforward latents, where every prediction error is
0), which the trainer logs as ``energy_0 .. energy_T`` with the step size
the inference ended with (`Step.metrics`): the energy curve.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from localssl.engine.step import Losses, Step, _amp, _norm_stats_kept, check_finite, unpack
from localssl.models import BlockEncoder
from localssl.rules import Inference, Rule

#: Backtracking halves the step at most this many times per iteration (1/1024). A step that still raises
#: the energy then is not taken and inference stops there: what E could still lose at that size is below
#: its rounding (float32: ~1e-7 of E), and the remaining iterations would only spend time (their E is logged
#: unchanged, so every curve has T + 1 values).
MAX_HALVINGS = 10


def check_inference_rule(rule: Rule) -> Inference:
    """What the inference step runs for ``rule``: one group per block, no noise, its schedule declared."""
    if rule.inference is None:
        raise ValueError(f"{type(rule).__name__} declares no inference schedule (Rule.inference)")
    groups = rule.groups()
    if [g.blocks for g in groups] != [(k,) for k in range(rule.num_blocks)]:
        raise ValueError(f"the inference step needs one group per block (a latent per block), got "
                         f"{[[b + 1 for b in g.blocks] for g in groups]}")
    if rule.perturbs:
        raise ValueError("the inference step relaxes an energy of the block outputs; a rule that perturbs them "
                         "at random (noise injection) has none")
    return rule.inference


def feedforward(encoder: BlockEncoder, views: torch.Tensor, ctx: Callable) -> list[torch.Tensor]:
    """The latents' starting point: every block's output, without a graph (running statistics move here)."""
    xs = []
    with torch.no_grad(), ctx():
        h = views
        for block in encoder.blocks:
            h = block(h)
            xs.append(h.to(views.dtype))
    return xs


def energy(encoder: BlockEncoder, rule: Rule, views: torch.Tensor, xs: Sequence[torch.Tensor],
           top: torch.Tensor | None, ctx: Callable) -> list[torch.Tensor]:
    """Every group's share of the energy at latents ``xs``: block l's prediction error, and for the top group
    also the top loss (on x_L; ``top``: the feedforward top output, for rules that read it). Their sum is E."""
    parts = []
    with ctx(), _norm_stats_kept(encoder):
        below = views
        for b, block in enumerate(encoder.blocks):
            parts.append(rule.prediction_energy(b, xs[b], block(below)))
            below = xs[b]
        g = len(parts) - 1
        parts[g] = parts[g] + rule.loss(g, xs[g], top)
    return parts


class Relaxed:
    """The latents after inference, every group's energy there (with its graph) and E at t = 0 .. T."""

    def __init__(self, xs: list[torch.Tensor], parts: list[torch.Tensor], energies: list[torch.Tensor],
                 step_size: float) -> None:
        self.xs, self.parts, self.step_size = xs, parts, step_size
        self.energies = torch.stack(energies)


def relax(encoder: BlockEncoder, rule: Rule, views: torch.Tensor, schedule: Inference,
          ctx: Callable | None = None) -> Relaxed:
    """Predictive coding's inference on one batch: from the feedforward latents, ``schedule.iterations``
    gradient steps on the energy (the views clamped). The weights' gradients are left to the caller (the
    backward of the returned ``parts``)."""
    ctx = ctx or _amp(views, None, None)
    n = views.shape[0]
    xs = [x.requires_grad_() for x in feedforward(encoder, views, ctx)]
    top = xs[-1].detach() if rule.needs_top_context else None

    def at(latents: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        parts = energy(encoder, rule, views, latents, top, ctx)
        return parts, torch.stack(parts).sum()

    parts, e = at(xs)
    energies = [e.detach()]
    eta = schedule.step_size
    for _ in range(schedule.iterations):
        grads = torch.autograd.grad(e, xs)  # the latents' gradient only; frees the graph of E
        for _halving in range(MAX_HALVINGS + 1):
            with torch.no_grad():
                cand = [(x - (eta * n) * g).requires_grad_() for x, g in zip(xs, grads)]
            cand_parts, cand_e = at(cand)
            # Without backtracking every step is taken, as in the papers. (cand_e <= e also rejects a NaN.)
            if not schedule.backtrack or bool(cand_e <= e):
                break
            eta /= 2
        else:  # no size lowers E measurably: the latents stay where they are, E again for the update's graph
            parts, e = at(xs)
            eta *= 2  # the last size tried
            break
        xs, parts, e = cand, cand_parts, cand_e
        energies.append(e.detach())
    energies += [energies[-1]] * (schedule.iterations + 1 - len(energies))
    return Relaxed(xs, parts, energies, eta)


class InferenceStep(Step):
    """Predictive coding's step: relax the latents as the rule's `Inference` says, then update every block
    from its settled prediction error (see the module's docstring). Holds its last energy curve."""

    def __init__(self, schedule: Inference) -> None:
        self.schedule = schedule
        self.last: Relaxed | None = None

    @classmethod
    def for_rule(cls, rule: Rule) -> InferenceStep:
        """The step as the rule declares it (``rule.inference``)."""
        return cls(check_inference_rule(rule))

    def __call__(self, encoder, rule, optimizer, views, index=0, *, device=None, amp_dtype=None) -> Losses:
        views = unpack(views, rule)
        check_inference_rule(rule)
        ctx = _amp(views, device, amp_dtype)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        out = relax(encoder, rule, views, self.schedule, ctx)
        losses: Losses = [p.detach() for p in out.parts]
        # The latents are leaves: each block's weights get the gradient of their own prediction error only.
        torch.stack(out.parts).sum().backward()
        out.parts, out.xs = [], [x.detach() for x in out.xs]  # the graph is freed here
        self.last = out
        check_finite(losses, rule.groups())
        if optimizer is not None:
            optimizer.step()
        return losses

    def metrics(self) -> dict[str, float]:
        """The last step's energy curve, ``energy_0 .. energy_T``, and the step size inference ended with."""
        if self.last is None:
            return {}
        return {**{f"energy_{t}": v for t, v in enumerate(self.last.energies.tolist())},
                "inference_step_size": self.last.step_size}


__all__ = ["InferenceStep", "Relaxed", "check_inference_rule", "energy", "feedforward", "relax", "MAX_HALVINGS"]
