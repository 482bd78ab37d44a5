"""The orchestrator of ``localssl compare``: train, probe and measure every rule, then write the results.

Resumable by construction: every step first looks at what the folder holds
(`runs.run_state`, `runs.probe_reason`, the measurements' key) and does only
what is missing, so an interrupted comparison is continued by running the
same command again, and a longer ``budget`` resumes every run from its
checkpoint.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localssl.config import (
    CompareConfig,
    ConfigError,
    TrainConfig,
    load_yaml,
    save_yaml,
    validate_probe,
    validate_train,
)
from localssl.reports.compare.output import (
    CSV_NAME,
    MD_NAME,
    PNG_NAME,
    RANDOM_INIT,
    markdown,
    plot,
    table_rows,
    write_csv,
)
from localssl.reports.compare.runs import (
    is_local,
    probe_config,
    probe_reason,
    read_json,
    recipe_key,
    run_state,
    train_config,
)

Log = Callable[[str], None]


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def duration(seconds: float) -> str:
    """``14m02s``, ``1h03m``, ``8.2s``: what a progress line needs."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def validate_compare(cfg: CompareConfig) -> None:
    """Every setting of ``cfg`` checked before anything is trained (each run's and the probe's checks too)."""
    from localssl.rules import RULES, split_variant

    if not cfg.rules:
        raise ConfigError("compare needs --rules (two or more rules to compare; `localssl rules` lists them)")
    twice = sorted({r for r in cfg.rules if cfg.rules.count(r) > 1})
    if twice:
        raise ConfigError(f"rules {', '.join(twice)} listed twice: every rule trains once, in its own folder")
    try:  # a label may be a variant of a rule (`localssl.rules.split_variant`): clapp++@b_rank=64
        names = [split_variant(r)[0] for r in cfg.rules]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    unknown = [r for r in names if r not in RULES]
    if unknown:
        raise ConfigError(f"unknown rule(s) {', '.join(unknown)}; valid: {', '.join(RULES.names())}")
    if cfg.budget is None or cfg.budget < 1:
        raise ConfigError(f"compare needs --budget STEPS >= 1 (the training steps of every rule), got {cfg.budget}")
    for what, given in (("rule_options", cfg.rule_options), ("recipes", cfg.recipes)):
        extra = sorted(set(given or {}) - set(cfg.rules))
        if extra:
            raise ConfigError(f"{what} for {', '.join(extra)}, which {'is' if len(extra) == 1 else 'are'} not "
                              f"compared (rules: {', '.join(cfg.rules)})")
    if min(cfg.measure_steps, cfg.measure_rounds, cfg.probe_epochs, cfg.paper_epochs) < 1 or cfg.measure_warmup < 0:
        raise ConfigError("measure_steps, measure_rounds, probe_epochs and paper_epochs must be >= 1, "
                          "measure_warmup >= 0")
    if not str(cfg.out).strip():
        raise ConfigError("out must name the comparison's folder, got an empty string")
    for rule in cfg.rules:
        validate_train(train_config(cfg, rule))
    validate_probe(probe_config(cfg, Path(cfg.out)))


def run_compare(cfg: CompareConfig, log: Log = stderr_log) -> dict[str, Any]:
    """Train, probe and measure every rule of ``cfg`` on equal terms; write ``compare.csv``, ``.md``, ``.png``.

    One progress line per run goes to ``log``. Returns ``{"csv", "md",
    "png" (None without matplotlib), "rows"}``.
    """
    from localssl.engine.rundir import RunFolderLock

    validate_compare(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with RunFolderLock(out):  # two comparisons in one folder would train the same runs twice
        save_yaml(cfg, out / "compare.yaml")
        return _compare(cfg, out, log)


def _compare(cfg: CompareConfig, out: Path, log: Log) -> dict[str, Any]:
    from localssl.engine.trainer import TrainingInterrupted, train
    from localssl.evaluation.run import probe_result_name, probe_run
    from localssl.reports.compare.measure import measure_rules

    n = len(cfg.rules) + 1
    tcfgs = {r: train_config(cfg, r) for r in cfg.rules}
    probes: dict[str, dict[str, Any]] = {}
    steps: dict[str, int] = {}
    local: dict[str, bool] = {}

    def probe(tag: str, pcfg, tcfg, sha256: str | None, trained: bool = False) -> tuple[dict[str, Any], str]:
        """The probe result and how it came: "probed in ..." or "probe skipped: up to date"."""
        path = Path(pcfg.run) / probe_result_name(pcfg)
        why = probe_reason(path, pcfg, tcfg, sha256)
        if why is None:
            return read_json(path), "probe skipped: up to date"
        log(f"{tag}: probing ({', '.join(pcfg.protocols)}; {'a new checkpoint' if trained else why}) ...")
        t = time.perf_counter()
        result, _ = probe_run(pcfg)
        return result, f"probed in {duration(time.perf_counter() - t)}"

    for i, rule in enumerate(cfg.rules, 1):
        tag, tcfg = f"[{i}/{n}] {rule}", tcfgs[rule]
        t0 = time.perf_counter()
        state = run_state(tcfg)
        trained = state.kind != "finished"
        if not trained:
            done = f"training skipped: finished ({state.step} steps"
            done += f", more than the budget of {cfg.budget})" if state.step > cfg.budget else ")"
        else:
            if state.kind == "partial":
                log(f"{tag}: resuming at step {state.step}, training to {cfg.budget} ...")
            else:
                log(f"{tag}: training {cfg.budget} steps ...")
            try:
                train(tcfg, resume=state.kind == "partial")
            except TrainingInterrupted as e:  # the trainer's hint resumes one run; the comparison resumes all
                raise TrainingInterrupted(f"{e} (or run the same `localssl compare` again)", e.signum) from None
            state = run_state(tcfg)
            done = f"trained to step {state.step} in {duration(time.perf_counter() - t0)}"
        probes[rule], probed = probe(tag, probe_config(cfg, Path(tcfg.out)), tcfg, state.sha256, trained)
        steps[rule] = state.step
        local[rule] = is_local(tcfg)
        log(f"{tag}: {done}; {probed}")

    # The random-init baseline of every recipe (`recipe_groups`): the encoder shape of the group's first run
    # as it saved it (a size-dependent option resolved), the weights it started from (the seed).
    groups = recipe_groups(cfg.rules, tcfgs)
    for label, members in groups.items():
        first = Path(tcfgs[members[0]].out)
        pcfg = probe_config(cfg, first, random_init=True)
        saved = load_yaml(TrainConfig, first / "config.yaml")
        probes[label], probed = probe(f"[{n}/{n}] {label}", pcfg, saved, None)
        log(f"[{n}/{n}] {label}: {probed}")

    measured: dict[str, Any] = measure_rules(cfg, tcfgs, out, log, groups) if cfg.measure else {}
    if "skipped" in measured:
        log(f"speed and memory: not measured: {measured['skipped']}")
    env = measured.get("env") or _env(cfg)
    columns, rows = table_rows(cfg.rules, probes, local, steps, measured, {**env, "device": _device(cfg)},
                               random_inits=list(groups))
    csv_path = write_csv(out / CSV_NAME, columns, rows)
    md_path = out / MD_NAME
    base = measured.get("baseline")
    base_measured = None if base in cfg.rules else measured.get("rules", {}).get(base)  # it has no row then
    # The rules measured on another recipe, and the end-to-end rule each is read against there.
    own = {r: m.get("baseline") for r, m in measured.get("rules", {}).items()
           if r in cfg.rules and "baseline" in m and m["baseline"] != base}
    md_path.write_text(markdown(csv_path, cfg, base, base_measured, own))
    try:
        png: Path | None = plot(csv_path, out / PNG_NAME)
    except RuntimeError as e:  # matplotlib is the optional `plots` extra
        log(f"{PNG_NAME} skipped: {e}")
        png = None
    log(f"compare: {csv_path}, {md_path}" + (f", {png}" if png else ""))
    return {"csv": csv_path, "md": md_path, "png": png, "rows": rows}


def recipe_groups(rules: list[str], tcfgs: dict[str, TrainConfig]) -> dict[str, list[str]]:
    """The rules by recipe (encoder and input, `runs.recipe_key`), each under its random-init row's label:
    `RANDOM_INIT` for the first rule's, ``random-init (RULE)`` for another recipe, RULE its first rule."""
    by_key: dict[str, list[str]] = {}
    for rule in rules:
        by_key.setdefault(recipe_key(tcfgs[rule]), []).append(rule)
    return {(RANDOM_INIT if i == 0 else f"{RANDOM_INIT} ({members[0]})"): members
            for i, members in enumerate(by_key.values())}


def _device(cfg: CompareConfig) -> str:
    from localssl.engine.runtime import resolve_device

    return str(resolve_device(cfg.device))


def _env(cfg: CompareConfig) -> dict[str, Any]:
    from localssl.engine.runtime import environment_info, resolve_device

    return environment_info(resolve_device(cfg.device))


__all__ = ["duration", "recipe_groups", "run_compare", "validate_compare"]
