"""The one place that wires a config into objects (STYLE principle 12).

``train``, ``probe``, ``align`` and ``bench`` all build their encoder and rule
here, so "encoder -> feature shapes -> grids -> rule" is written once:
- `resolve` fills what a run saves resolved (grids fitted to the input size,
  the normalisation, the encoder's and the rule's options with every
  default written out);
- `build_model` makes the encoder and the rule for a resolved config;
- `build_optimizer`, `build_views` and `build_step` make the rest of a run.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from localssl.config import OPTIMIZERS, ConfigError, TrainConfig, check_grids, replace
from localssl.data.augment import VIEW_MAKERS
from localssl.engine.inference import InferenceStep
from localssl.engine.optim import LARS, OptimizerSet
from localssl.engine.step import MicroBatchedStep, PlainStep, SequentialStep, Step
from localssl.models import BlockEncoder, build_encoder, resolve_encoder_options
from localssl.rules import RULES, OptimizerHint, Rule, build_rule, resolve_rule_options


@dataclass
class Model:
    """An encoder and a rule built for one input size."""

    encoder: BlockEncoder
    rule: Rule
    shapes: list[tuple[int, ...]]  # every block's output (C, H, W)
    grids: list[int]  # the pooling grid per block (the spatial rules' losses, every probe's features)


def options_for(rule: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The entries of ``options`` that rule ``rule`` takes (another rule's options, e.g. when
    gradient alignment analyses a rule other than the run's, keep only what they share)."""
    known = {f.name for f in fields(RULES.get(rule).options)}
    return {k: v for k, v in (options or {}).items() if k in known}


def build_model(cfg: TrainConfig, channels: int, image_size: int, rule_device: str | None = None,
                rule: str | None = None) -> Model:
    """Encoder and rule of ``cfg`` for ``channels`` x ``image_size`` px inputs (``rule``: another rule's name).

    ``rule_device="meta"`` builds the rule without memory (a check: B
    matrices can be 8192 x 8192). Errors name what to change.
    """
    try:
        encoder = build_encoder(cfg.encoder, cfg.width, channels, cfg.encoder_options, image_size=image_size)
    except ValueError as e:  # the encoder's own check, e.g. a width that leaves a layer no channel
        raise ConfigError(str(e)) from None
    try:
        shapes = encoder.feature_shapes((channels, image_size, image_size))
    except RuntimeError as e:
        raise ConfigError(
            f"encoder {cfg.encoder} cannot take {image_size}px images from {cfg.dataset}: {e}; pass a larger --resize"
        ) from None
    grids = check_grids(cfg.encoder, cfg.grids, shapes, image_size, defaults=encoder.grids_at(image_size))
    name = rule or cfg.rule
    options = cfg.rule_options if name == cfg.rule else options_for(name, cfg.rule_options)
    try:
        with torch.device(rule_device) if rule_device else contextlib.nullcontext():
            built = build_rule(name, shapes, options, grids)
    except ValueError as e:
        raise ConfigError(f"rule {name}: {e}") from None
    reason = built.unsupported()
    if reason is not None:
        raise ConfigError(f"rule {name} on encoder {cfg.encoder}: {reason}")
    return Model(encoder, built, shapes, grids)


def resolve(cfg: TrainConfig, channels: int, image_size: int, mean=None, std=None) -> TrainConfig:
    """``cfg`` as a run uses it on these images: grids, encoder and rule options written out (and mean/std)."""
    cfg = replace(cfg, encoder_options=resolve_encoder_options(cfg.encoder, cfg.encoder_options, image_size),
                  rule_options=resolve_rule_options(cfg.rule, cfg.rule_options))
    grids = build_model(cfg, channels, image_size, rule_device="meta").grids
    extra = {} if mean is None else {"mean": list(mean), "std": list(std)}
    return replace(cfg, grids=grids, **extra)


def _fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """Fused AdamW: one kernel over all tensors. On CPU it made CLAPP++'s step
    ~25% faster (its 12.6M-parameter B matrices at width 0.25); it needs
    floating-point parameters on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


#: The optimizers a rule's `OptimizerHint` may name (none keeps a second moment).
HINT_OPTIMIZERS = ("sgd",)


def build_optimizer(encoder: BlockEncoder, rule: Rule, lr: float, weight_decay: float, optimizer: str = "adamw",
                    momentum: float = 0.9) -> torch.optim.Optimizer | OptimizerSet:
    """One optimizer over every trainable parameter: all blocks and the rule's own (B, heads).

    ``optimizer="adamw"`` (METHODS 2.4, fused where it can be) or ``"lars"``
    (`localssl.engine.optim.LARS`, as blockwise SSL trains, METHODS 5.1: the
    biases and norms take neither weight decay nor the trust ratio). One
    parameter group either way: the trainer sets its lr every step (`lr_at`).

    A rule's parameter with an `OptimizerHint` (`Rule.optimizer_hint`, e.g.
    CLAPP++'s ``b_optimizer=sgd``) trains with the optimizer its hint names
    instead, one parameter group per distinct hint (its lr: the run's x
    ``lr_scale``, weight decay: the run's, as SGD's coupled L2); the result
    is then an `OptimizerSet` of the run's optimizer (first) and those. With
    no hint, the run's optimizer alone, exactly as before hints existed.
    """
    params = [p for p in encoder.parameters() if p.requires_grad]
    seen = {id(p) for p in params}
    hinted: dict[OptimizerHint, list[torch.nn.Parameter]] = {}
    for g in range(len(rule.groups())):
        for p in rule.group_parameters(g):
            if id(p) not in seen:  # a head shared by two groups is one parameter to the optimizer
                seen.add(id(p))
                hint = rule.optimizer_hint(p)
                if hint is None:
                    params.append(p)
                else:
                    hinted.setdefault(hint, []).append(p)
    if optimizer == "adamw":
        main = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=_fused_ok(params))
    elif optimizer == "lars":
        main = LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ConfigError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if not hinted:
        return main
    extra = []
    for hint, ps in hinted.items():
        if hint.optimizer not in HINT_OPTIMIZERS:
            raise ConfigError(f"rule {type(rule).__name__} asks for optimizer {hint.optimizer!r} for some of its "
                              f"parameters; valid: {', '.join(HINT_OPTIMIZERS)}")
        extra.append(torch.optim.SGD([{"params": ps, "lr_scale": hint.lr_scale}], lr=lr * hint.lr_scale,
                                     momentum=hint.momentum, weight_decay=weight_decay))
    return OptimizerSet([main, *extra])


def build_views(cfg: TrainConfig, image_size: int, mean, std, crop_scale, device: torch.device,
                rule: Rule | None = None) -> torch.nn.Module:
    """The view maker the rule asks for (`Rule.view_maker`, with the rule's `Rule.view_options`; most rules: two
    SimCLR views per image, stacked [view 1; view 2]); ``maker.batch(x_uint8)`` gives a `ViewBatch` that says
    its layout."""
    crop = tuple(cfg.crop_scale) if cfg.crop_scale else crop_scale
    maker = VIEW_MAKERS.get(rule.view_maker if rule is not None else "simclr")
    extra = rule.view_options() if rule is not None else {}
    try:
        return maker(image_size, mean, std, crop_scale=crop, **extra).to(device)
    except ValueError as e:  # e.g. a patch rule's crop larger than the images
        raise ConfigError(f"views of rule {cfg.rule}: {e}") from None


def build_step(cfg: TrainConfig, rule: Rule, total_steps: int) -> Step:
    """How each step runs: the rule's schedule (sequential: an equal share of the run per group; inference:
    predictive coding's relaxation, with the rule's iterations and step size), else micro-batched when
    ``cfg.micro_batch`` is set, else plain."""
    if rule.schedule == "sequential":
        if cfg.micro_batch is not None:
            raise ConfigError("micro_batch and sequential training do not combine: unset one of them")
        return SequentialStep(steps_per_group=max(1, math.ceil(total_steps / len(rule.groups()))))
    if rule.schedule == "inference":
        if cfg.micro_batch is not None:
            raise ConfigError("micro_batch and the inference step do not combine: unset micro_batch")
        return InferenceStep.for_rule(rule)
    if rule.schedule != "simultaneous":
        raise ConfigError(f"rule {cfg.rule} asks for schedule {rule.schedule!r}; valid: simultaneous, sequential, "
                          "inference")
    if cfg.micro_batch is not None and cfg.micro_batch < 2 * cfg.batch_size:
        return MicroBatchedStep(cfg.micro_batch)
    return PlainStep()


__all__ = ["Model", "build_model", "resolve", "build_optimizer", "HINT_OPTIMIZERS", "build_views", "build_step",
           "options_for"]
