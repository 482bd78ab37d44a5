"""The checks a config passes before any data is loaded or step is taken, and the grid/shape checks once it is.

Registries, encoders and torch are imported inside the functions: importing
`localssl.config` stays light, and `localssl.rules` (which imports
`localssl.config`) is never imported by it at import time.
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from localssl.config.errors import ConfigError, shown
from localssl.config.schema import AMP_MODES, LR_SCHEDULES, OPTIMIZERS, PROBE_PROTOCOLS, ProbeConfig, TrainConfig


def _check_finite_numbers(cfg: Any) -> None:
    """Every float option (and list entry) is a finite number: ``nan`` and ``inf`` parse as floats, and
    e.g. ``lr: inf`` gives finite losses at step 1 and non-finite weights after it."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ConfigError(f"{f.name} must be a finite number, got {shown(value)}")


# AdamW moves every parameter by about lr per step whatever the gradient's
# scale (Loshchilov & Hutter 2019): above 1, one step outgrows any weight.
MAX_LR = 1.0
# numpy's legacy seeding takes 0 .. 2**32 - 1, and within it the trainer's per-epoch
# generator seed (seed * 1_000_003 + epoch) stays far inside torch's 64-bit range.
MAX_SEED = 2**32 - 1


def _check_execution(seed: int, device: str, threads: int | None = None) -> None:
    """Seed range, threads and device (known here and available), before any data is loaded."""
    from localssl.engine.runtime import resolve_device  # imports torch

    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED} (2**32 - 1), got {shown(seed)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1 (or unset for torch's default), got {threads}")
    resolve_device(device)


def validate_train(cfg: TrainConfig) -> None:
    """Catch impossible settings before any data is loaded or step is taken."""
    # Imported here: the registries import torch and the data loaders.
    import torch

    from localssl.data import DATASETS, dataset_spec
    from localssl.models import ENCODERS, encoder_options
    from localssl.rules import RULES, rule_options

    for kind, reg, name in (("rule", RULES, cfg.rule), ("encoder", ENCODERS, cfg.encoder),
                            ("dataset", DATASETS, cfg.dataset)):
        if name not in reg:
            raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(reg.names())}")
    encoder_options(cfg.encoder, cfg.encoder_options)  # unknown keys list the valid ones
    opts = rule_options(cfg.rule, cfg.rule_options)  # unknown keys list the valid ones; values checked
    try:
        opts.check_training()
    except ValueError as e:
        raise ConfigError(f"rule_options of {cfg.rule}: {e}") from None
    if cfg.amp not in AMP_MODES:
        raise ConfigError(f"unknown amp mode {cfg.amp!r}; valid: {', '.join(AMP_MODES)}")
    if not str(cfg.out).strip():
        raise ConfigError("out must name the run's folder, got an empty string")
    _check_finite_numbers(cfg)
    _check_execution(cfg.seed, cfg.device, cfg.threads)
    for key, value, valid in (("optimizer", cfg.optimizer, OPTIMIZERS),
                              ("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)):
        if value not in valid:
            raise ConfigError(f"unknown {key} {shown(value)}; valid: {', '.join(valid)}")
    # LARS scales each weight's step to eta * lr of its norm, so MAX_LR's reason does not hold for it: blockwise
    # SSL's own lr is 0.2 x batch / 256, 3.2 at its batch of 4096 (shoaibahmed/blockwise_ssl main.py).
    if cfg.optimizer == "adamw" and cfg.lr > MAX_LR:
        raise ConfigError(f"lr must be <= {MAX_LR} with optimizer adamw (AdamW moves every weight by about lr per "
                          f"step), got {cfg.lr}")
    positive = {"width": cfg.width, "epochs": cfg.epochs, "lr": cfg.lr, "checkpoint_every": cfg.checkpoint_every,
                "log_every": cfg.log_every}
    for k, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{k} must be > 0, got {v}")
    if cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.min_lr <= cfg.lr:
        raise ConfigError(f"min_lr must be in [0, lr] (the cosine ends there; lr is {cfg.lr}), got {cfg.min_lr}")
    if cfg.max_steps is not None and cfg.max_steps <= 0:
        raise ConfigError(f"max_steps must be > 0, got {cfg.max_steps}")
    if cfg.micro_batch is not None and cfg.micro_batch <= 0:
        raise ConfigError(f"micro_batch must be > 0 views (or unset for the whole batch), got {cfg.micro_batch}")
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"dist_timeout must be > 0 seconds, got {cfg.dist_timeout}")
    if cfg.stages is not None and (not cfg.stages or min(cfg.stages) < 1):
        raise ConfigError(f"stages must be one count >= 1 of blocks per stage, got {cfg.stages}")
    if cfg.stages is not None and not cfg.pipeline:
        raise ConfigError("stages splits the blocks of a --pipeline run: add --pipeline or drop --stages")
    if cfg.crop_scale is not None:
        lo_hi = cfg.crop_scale
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise ConfigError(f"crop_scale must be two numbers 0 < lo <= hi <= 1, got {lo_hi}")
    if cfg.batch_size < 2:
        raise ConfigError(
            f"batch_size={cfg.batch_size}: the negative of an image is another image of the same batch "
            "(METHODS 2), so a batch needs at least 2 images"
        )
    if cfg.subset is not None and cfg.subset < cfg.batch_size:
        raise ConfigError(f"subset={cfg.subset} is smaller than one batch ({cfg.batch_size} images)")
    if cfg.resize is not None and cfg.resize <= 0:
        raise ConfigError(f"resize must be > 0 pixels (or unset to keep the images' size), got {cfg.resize}")
    spec = dataset_spec(cfg.dataset)
    check_normalization(cfg.mean, cfg.std, None if spec.image_size is None else spec.channels)
    image_size = cfg.resize or spec.image_size
    with torch.device("meta"):  # its width, whatever the image size (imagefolder's is known only later)
        _build_encoder(cfg, spec.channels, image_size or 32)  # a size only for ResNet's stem: auto
    if image_size is None:
        return  # known only once the data is read (imagefolder): train() checks again then
    check_shapes(cfg, image_size, spec.channels)


def check_grids(
    encoder: str, grids: list[int] | None, shapes: list[tuple[int, ...]], image_size: int, what: str = "pooling grids",
    defaults: list[int] | None = None,
) -> list[int]:
    """``grids`` checked against the blocks' ``(C, H, W)`` outputs, or the defaults for them when None.

    The defaults are ``defaults`` when the encoder's layout gives its own
    (`BlockEncoder.grids_at`: a patched encoder's patch grid), else
    `default_grids` at this input size (the paper's grids where they fit,
    METHODS 2.2). Grids that do not fit are one error listing every block
    that fails, with its map size and the grids it allows.
    """
    from localssl.models import default_grids, grid_choices

    fitted = list(defaults) if defaults is not None else default_grids(encoder, shapes=shapes)
    if grids is None:
        return fitted
    if len(grids) != len(shapes):
        raise ConfigError(
            f"{what} {grids} have {len(grids)} entries but encoder {encoder} has {len(shapes)} blocks "
            f"(the default at {image_size}px: --grids {' '.join(map(str, fitted))})"
        )
    bad = [
        f"block {k + 1}: grid {g} does not fit its {s[1]}x{s[2]} map (use one of {grid_choices(s[1], s[2])})"
        for k, (g, s) in enumerate(zip(grids, shapes))
        if g < 1 or s[1] % g or s[2] % g
    ]
    if bad:
        raise ConfigError(
            f"{what} {grids} do not fit encoder {encoder}'s feature maps at {image_size}px input: "
            + "; ".join(bad)
            + f". Pass --grids with one grid per block, e.g. --grids {' '.join(map(str, fitted))} "
            "(the default at this size)"
        )
    return list(grids)


def check_shapes(cfg: TrainConfig, image_size: int, channels: int) -> list[int]:
    """Grids and rule against the encoder's block shapes at ``image_size``; returns the run's grids.

    Every run resolves its grids, whatever the rule: a spatial rule pools its
    loss to them, and the probe pools every run's features to them. Rules
    that do not pool spatially ignore them.
    """
    from localssl.builder import build_model

    return build_model(cfg, channels, image_size, rule_device="meta").grids


def _build_encoder(cfg: TrainConfig, channels: int, image_size: int | None = None):
    from localssl.models import build_encoder

    try:
        return build_encoder(cfg.encoder, cfg.width, channels, cfg.encoder_options, image_size=image_size)
    except ValueError as e:  # the encoder's own check, e.g. a width that leaves a layer no channel
        raise ConfigError(str(e)) from None


def check_normalization(mean: list[float] | None, std: list[float] | None, channels: int | None = None) -> None:
    """``mean``/``std`` given together, one entry per channel, std > 0."""
    if (mean is None) != (std is None):
        raise ConfigError("mean and std go together: give both (one value per channel) or neither")
    if mean is None or std is None:
        return
    if len(mean) != len(std):
        raise ConfigError(f"mean has {len(mean)} values but std has {len(std)}")
    if min(std) <= 0:
        raise ConfigError(f"std must be > 0 per channel, got {std}")
    if channels is not None and len(mean) != channels:
        raise ConfigError(f"mean/std have {len(mean)} values but the images have {channels} channel(s)")


def validate_probe(cfg: ProbeConfig) -> None:
    _check_finite_numbers(cfg)
    _check_execution(cfg.seed, cfg.device)
    if cfg.lr <= 0 or cfg.lr > MAX_LR:
        raise ConfigError(f"lr must be in (0, {MAX_LR}], got {cfg.lr}")
    bad = [p for p in cfg.protocols if p not in PROBE_PROTOCOLS]
    if bad:
        raise ConfigError(f"unknown probe protocol(s) {bad}; valid: {', '.join(PROBE_PROTOCOLS)}")
    if cfg.knn_k < 1 or cfg.knn_t <= 0:
        raise ConfigError("knn_k must be >= 1 and knn_t > 0")
    if cfg.amp not in AMP_MODES:
        raise ConfigError(f"unknown amp mode {cfg.amp!r}; valid: {', '.join(AMP_MODES)}")
    if cfg.resize is not None and cfg.resize <= 0:
        raise ConfigError(f"resize must be > 0 pixels (or unset for the run's), got {cfg.resize}")
    if cfg.grids is not None and min(cfg.grids, default=1) < 1:
        raise ConfigError(f"grids must be >= 1 per block, got {cfg.grids}")
