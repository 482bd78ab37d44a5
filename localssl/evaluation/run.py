"""``localssl probe RUN_DIR``: probe a run's encoder and write JSON beside it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localssl.config import ConfigError, ProbeConfig, TrainConfig, load_yaml, to_dict, validate_probe
from localssl.data import dataset_spec, load_dataset
from localssl.engine.checkpoint import CHECKPOINT, load_encoder_from_run
from localssl.engine.runtime import environment_info, resolve_amp, resolve_device
from localssl.evaluation.probe import random_init_like, run_probe
from localssl.models import build_encoder, default_grids


def probe_result_name(cfg: ProbeConfig) -> str:
    return "probe-random-init.json" if cfg.random_init else "probe.json"


def probe_run(cfg: ProbeConfig) -> tuple[dict[str, Any], Path]:
    """Probe the encoder of ``cfg.run`` (or a random-init one of the same shape)."""
    validate_probe(cfg)
    if cfg.run is None:
        raise ConfigError("probe needs a run folder")
    run = Path(cfg.run)
    device = resolve_device(cfg.device)
    if cfg.random_init:
        # Only the run's config is needed: the same encoder shape, untrained.
        cfg_path = run / "config.yaml"
        if not cfg_path.exists():
            raise ConfigError(f"{run} has no config.yaml: is it a run folder written by `localssl train`?")
        tcfg = load_yaml(TrainConfig, cfg_path)
        spec = dataset_spec(tcfg.dataset)
        encoder = random_init_like(build_encoder(tcfg.encoder, tcfg.width, spec.channels), seed=cfg.seed)
    else:
        if not (run / CHECKPOINT).exists() and cfg.checkpoint is None:
            raise ConfigError(f"{run} has no {CHECKPOINT}: train first, or pass --random-init")
        encoder, tcfg = load_encoder_from_run(run, cfg.checkpoint)
    dataset = cfg.dataset or tcfg.dataset
    data_dir = cfg.data_dir or tcfg.data_dir
    spec = dataset_spec(dataset)
    # Subsets are class-balanced and fixed (independent of the seed), so every
    # rule is probed on the same images.
    train = load_dataset(dataset, data_dir, spec.probe_train_split, max_items=cfg.train_subset)
    test = load_dataset(dataset, data_dir, spec.test_split, max_items=cfg.test_subset)
    amp_dtype = resolve_amp(cfg.amp, device)
    result = run_probe(
        encoder.to(device), train, test, mean=spec.mean, std=spec.std,
        # Every rule is probed on the same features: the encoder's reference grids.
        grids=default_grids(tcfg.encoder, len(encoder)),
        protocols=cfg.protocols, fast_epochs=cfg.epochs_fast, fast_lr=cfg.lr, knn_k=cfg.knn_k,
        knn_temperature=cfg.knn_t, paper_epochs=cfg.epochs_paper, batch_size=cfg.batch_size, seed=cfg.seed,
        device=device, amp=amp_dtype is not None,
    )
    result = dict(result)
    result.update({"run": str(run), "rule": tcfg.rule, "random_init": cfg.random_init, "dataset": dataset,
                   "probe_config": to_dict(cfg), "env": environment_info(device)})
    path = Path(cfg.out) if cfg.out else run / probe_result_name(cfg)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    return result, path


__all__ = ["probe_run", "probe_result_name"]
