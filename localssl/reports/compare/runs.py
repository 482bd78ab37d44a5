"""What ``localssl compare`` does with each rule's folder: the configs it builds, and what is already done.

A rule's run folder ``OUT/<rule>/`` is an ordinary run of `localssl train`,
built from the `CompareConfig` by `train_config`. Before training, its state
is read from the folder itself (`run_state`): no checkpoint is a new run; a
checkpoint at the budget or beyond is finished; one below it is resumed. The
checkpoint, not ``summary.json``, says how far a run got: ``summary.json`` is
written only when a session ends, so after a resume that was killed it
describes an earlier checkpoint. A checkpoint whose config differs from the
one asked for (another lr, encoder, rule option...) is refused, naming the
differences, exactly as ``train --resume`` refuses it: nothing of an earlier
comparison is overwritten.

A probe result is reused (`probe_reason`) only while it records the run's
current checkpoint (its SHA-256, as ``localssl report`` checks it) and the
probe settings asked for; otherwise the run is probed again.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from localssl.config import RECIPE_KEYS, CompareConfig, ConfigError, ProbeConfig, TrainConfig, from_dict, shown, to_dict
from localssl.engine.checkpoint import CHECKPOINT, checkpoint_config, read_checkpoint

#: Probe settings that may differ without changing a result: where it ran and where it was written.
PROBE_FREE = ("run", "out", "device", "checkpoint")


def train_config(cfg: CompareConfig, rule: str) -> TrainConfig:
    """The run of ``rule`` that ``cfg`` asks for, as `localssl train` saves it where the input size is known.

    The rule's and the encoder's options are written out (unset ones at
    their defaults) and the grids fitted to the input size (`builder.resolve`),
    so an existing run is compared with every value it was trained with: an
    option left unset here means its default, never "whatever the run had".
    """
    from localssl.builder import resolve
    from localssl.data import dataset_spec
    from localssl.rules import split_variant

    # Every field the two configs share by name is the comparison's, so a TrainConfig field added later
    # (the optimizer and schedule once were missing here) reaches every rule without a line more.
    shared = {f.name for f in fields(CompareConfig)} & {f.name for f in fields(TrainConfig)}
    values = {k: getattr(cfg, k) for k in shared - {"rule_options", "out"}}
    recipe = dict((cfg.recipes or {}).get(rule) or {})
    if "encoder" in recipe and recipe["encoder"] != cfg.encoder:
        # Another encoder: the shared encoder's options and grids describe that one, not this.
        values.update(encoder_options=None, grids=None)
    elif "encoder_options" in recipe:
        recipe["encoder_options"] = {**(cfg.encoder_options or {}), **(recipe["encoder_options"] or {})}
    # ``rule`` is a label: a rule's name, or a variant of it with options of its own (clapp++@b_rank=64,
    # `localssl.rules.split_variant`), trained in its own folder; ``--rule-opt LABEL:KEY=VALUE`` goes over those.
    name, variant = split_variant(rule)
    options = {**variant, **((cfg.rule_options or {}).get(rule) or {})} or None
    own = {"rule": name, "rule_options": options, "max_steps": cfg.budget, "out": str(Path(cfg.out) / rule)}
    tcfg = from_dict(TrainConfig, {**values, **recipe, **own})
    size = tcfg.resize or dataset_spec(cfg.dataset).image_size
    if size is None:  # imagefolder: its size is known once its images are read; train() resolves it then
        return tcfg
    return resolve(tcfg, dataset_spec(cfg.dataset).channels, size)


def recipe_key(tcfg: TrainConfig) -> str:
    """What a random-init baseline and a speed measurement share: the encoder and the input a run sees."""
    return json.dumps({k: getattr(tcfg, k) for k in RECIPE_KEYS}, sort_keys=True)


def probe_config(cfg: CompareConfig, run: Path, random_init: bool = False) -> ProbeConfig:
    """The probe every rule (and the random-init encoder, under the comparison's seed) gets."""
    return ProbeConfig(
        run=str(run), random_init=random_init, protocols=list(cfg.probes), train_subset=cfg.probe_train_subset,
        test_subset=cfg.probe_test_subset, epochs_fast=cfg.probe_epochs, epochs_paper=cfg.paper_epochs,
        seed=cfg.seed, device=cfg.device, amp=cfg.amp,
    )


def is_local(tcfg: TrainConfig) -> bool:
    """Whether ``tcfg``'s rule trains its blocks on local losses: the built rule says (nothing here names a
    rule). Built on the meta device: no memory, no weights."""
    from localssl.builder import build_model
    from localssl.data import dataset_spec

    spec = dataset_spec(tcfg.dataset)
    size = tcfg.resize or spec.image_size or 32  # imagefolder: any size builds the same rule kind
    return bool(build_model(tcfg, spec.channels, size, rule_device="meta").rule.local)


@dataclass
class RunState:
    """Where a rule's folder stands: ``new``, ``partial`` (resume it) or ``finished``, at ``step``."""

    kind: str
    step: int = 0
    sha256: str | None = None  # of the checkpoint read (None: there is none)


def run_state(tcfg: TrainConfig) -> RunState:
    """The state of ``tcfg.out`` against the run ``tcfg`` asks for (`ConfigError` if it holds another run)."""
    from localssl.engine.trainer import resume_config

    path = Path(tcfg.out) / CHECKPOINT
    if not path.is_file():
        # No checkpoint: nothing trained (what a run killed before its first checkpoint left, `train` replaces).
        return RunState("new")
    state, record = read_checkpoint(path, require=("step", "config"))
    _, diff = resume_config(tcfg, checkpoint_config(state, path), data_recorded="data" in state)
    if diff:
        raise ConfigError(
            f"{tcfg.out} holds a run with other settings than this comparison asks for ("
            + "; ".join(f"{k}: run has {shown(a)}, asked {shown(b)}" for k, (a, b) in diff.items())
            + "): give the comparison another --out, or remove that folder to train it again"
        )
    step = int(state["step"])
    assert tcfg.max_steps is not None  # the budget
    return RunState("finished" if step >= tcfg.max_steps else "partial", step, record["sha256"])


def read_json(path: Path) -> dict[str, Any] | None:
    """The mapping in ``path``, or None where it is missing, unreadable or not a mapping."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def probe_reason(path: Path, pcfg: ProbeConfig, tcfg: TrainConfig, sha256: str | None) -> str | None:
    """Why the result in ``path`` must be computed (again), or None: it records this checkpoint and probe.

    ``sha256``: of the run's checkpoint now (random-init results measure an
    untrained encoder of the run's shape, and record that shape instead).
    """
    from localssl.reports.tables import stale_reason

    if not path.exists():
        return "no result yet"
    probe = read_json(path)
    if probe is None:
        return f"{path.name} cannot be read"
    why = stale_reason(probe, to_dict(tcfg), sha256)
    if why:
        return why
    if not pcfg.random_init and not isinstance(probe.get("checkpoint"), dict):
        return "the result records no checkpoint"
    asked, done = to_dict(pcfg), probe.get("probe_config")
    if not isinstance(done, dict):
        return "the result records no probe settings"
    diff = [k for k in asked if k not in PROBE_FREE and done.get(k) != asked[k]]
    if diff:
        return "probed with other settings (" + ", ".join(f"{k}: {shown(done.get(k))}" for k in diff) + ")"
    return None


__all__ = ["RunState", "is_local", "probe_config", "probe_reason", "read_json", "recipe_key", "run_state",
           "train_config"]
