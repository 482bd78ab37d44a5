"""``localssl probe RUN_DIR``: probe a run's encoder and write JSON beside it.

The probe sees the images as the run did: the run's ``resize`` and (on the
run's own data set) its normalisation, and it pools the features to the
run's saved grids, so every rule is probed on the same features at a given
input size. ``--resize`` and ``--grids`` override them; a run saved before
grids were recorded gets the defaults fitted to the input size
(`localssl.models.default_grids`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from localssl.atomic import atomic_file
from localssl.config import (
    ConfigError,
    ProbeConfig,
    TrainConfig,
    check_grids,
    check_normalization,
    load_yaml,
    to_dict,
    validate_probe,
)
from localssl.data import dataset_spec, load_dataset
from localssl.engine.checkpoint import CHECKPOINT, read_encoder_from_run
from localssl.engine.runtime import environment_info, resolve_amp, resolve_device
from localssl.evaluation.probe import random_init_like, run_probe
from localssl.models import build_encoder


def probe_result_name(cfg: ProbeConfig) -> str:
    return "probe-random-init.json" if cfg.random_init else "probe.json"


def probe_run(cfg: ProbeConfig) -> tuple[dict[str, Any], Path]:
    """Probe the encoder of ``cfg.run`` (or a random-init one of the same shape).

    The result records what it measured (the checkpoint's step and SHA-256;
    for random-init, the encoder's shape), so `localssl report` can drop it
    once the run has moved on. It is written atomically, to a file opened
    before anything is computed: a folder that cannot take it fails at once
    instead of after an hour of probing.
    """
    validate_probe(cfg)
    if cfg.run is None:
        raise ConfigError("probe needs a run folder")
    run = Path(cfg.run)
    if not run.is_dir():
        raise ConfigError(f"{run} is not a folder: probe takes the folder of a run written by `localssl train`")
    path = Path(cfg.out) if cfg.out else run / probe_result_name(cfg)
    writer = atomic_file(path, "w")
    try:
        fh = writer.__enter__()  # opened now: fail before computing, not after
    except OSError as e:
        raise ConfigError(
            f"cannot write the probe result {path} ({e.strerror}): nothing was computed; pass --out to write it "
            "elsewhere"
        ) from None
    with contextlib.ExitStack() as stack:
        stack.push(writer)
        result = _probe(cfg, run)
        fh.write(json.dumps(result, indent=2))
    return result, path


def _probe(cfg: ProbeConfig, run: Path) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    if cfg.random_init:
        # Only the run's config is needed: the same encoder shape, untrained.
        cfg_path = run / "config.yaml"
        if not cfg_path.exists():
            raise ConfigError(f"{run} has no config.yaml: is it a run folder written by `localssl train`?")
        tcfg = load_yaml(TrainConfig, cfg_path)
        encoder, record = None, None
    else:
        if not (run / CHECKPOINT).exists() and cfg.checkpoint is None:
            raise ConfigError(f"{run} has no {CHECKPOINT}: train first, or pass --random-init")
        encoder, tcfg, record = read_encoder_from_run(run, cfg.checkpoint)
        # Non-finite weights give constant features and a chance-level probe that looks like a result.
        bad = [k for k, v in encoder.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise ConfigError(
                f"{cfg.checkpoint or run / CHECKPOINT} holds non-finite weights ({', '.join(bad[:3])}"
                f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}): the run diverged; nothing to probe"
            )
    dataset = cfg.dataset or tcfg.dataset
    data_dir = cfg.data_dir or tcfg.data_dir
    resize = cfg.resize if cfg.resize is not None else tcfg.resize
    spec = dataset_spec(dataset)
    # Subsets are class-balanced and fixed (independent of the seed), so every
    # rule is probed on the same images.
    train = load_dataset(dataset, data_dir, spec.probe_train_split, max_items=cfg.train_subset, resize=resize)
    test = load_dataset(dataset, data_dir, spec.test_split, max_items=cfg.test_subset, resize=resize)
    spec = spec.resolved(train)
    # The encoder takes what it was trained on: as many channels as the run's normalisation has.
    run_channels = len(tcfg.mean) if tcfg.mean else dataset_spec(tcfg.dataset).channels
    if spec.channels != run_channels:
        raise ConfigError(
            f"{dataset} {spec.probe_train_split} images have {spec.channels} channel(s) but the run's encoder "
            f"takes {run_channels}"
        )
    if dataset == tcfg.dataset and tcfg.mean is not None and tcfg.std is not None:
        check_normalization(tcfg.mean, tcfg.std, spec.channels)
        mean, std = tuple(tcfg.mean), tuple(tcfg.std)  # what the encoder was trained with
    else:
        mean, std = spec.mean, spec.std
    if encoder is None:
        encoder = random_init_like(build_encoder(tcfg.encoder, tcfg.width, spec.channels, tcfg.encoder_options),
                                   seed=cfg.seed)
    size = spec.image_size
    try:
        shapes = encoder.feature_shapes((spec.channels, size, size))
    except RuntimeError as e:
        raise ConfigError(f"encoder {tcfg.encoder} cannot take {size}px images: {e}; pass a larger --resize") from None
    if cfg.grids is not None:
        grids = check_grids(tcfg.encoder, cfg.grids, shapes, size, what="--grids", defaults=encoder.grids_at(size))
    else:
        # Every rule is probed on the same features: the run's grids (fitted to the size if it saved none).
        grids = check_grids(tcfg.encoder, tcfg.grids, shapes, size, what="the run's pooling grids",
                            defaults=encoder.grids_at(size))
    amp_dtype = resolve_amp(cfg.amp, device)
    result = run_probe(
        encoder.to(device), train, test, mean=mean, std=std, grids=grids,
        protocols=cfg.protocols, fast_epochs=cfg.epochs_fast, fast_lr=cfg.lr, knn_k=cfg.knn_k,
        knn_temperature=cfg.knn_t, paper_epochs=cfg.epochs_paper, batch_size=cfg.batch_size, seed=cfg.seed,
        device=device, amp=amp_dtype is not None,
    )
    result = dict(result)
    result.update({"run": str(run), "rule": tcfg.rule, "random_init": cfg.random_init, "dataset": dataset,
                   "image_size": size, "mean": list(mean), "std": list(std),
                   # What was measured: a random-init result holds while the encoder's shape does.
                   "checkpoint": record, "encoder": tcfg.encoder, "width": tcfg.width,
                   "encoder_options": tcfg.encoder_options,
                   "probe_config": to_dict(cfg), "env": environment_info(device)})
    return result


__all__ = ["probe_run", "probe_result_name"]
