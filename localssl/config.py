"""Typed run configurations that round-trip to YAML.

Every option of ``localssl train`` and ``localssl probe`` is a field here.
A YAML file gives a base (``--config``), command-line flags override it, and
the resolved config is saved with the run: what was left to a default that
depends on the data (``grids``, ``mean``, ``std``) is written out as the run
used it, so ``probe`` and ``align`` read the run's own values. Unknown keys
and names are errors that list the valid ones; impossible values are caught
before training starts, with a message that says what to change.
"""
from __future__ import annotations

import math
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot work; the message says what to change."""


# Values are quoted in error messages through this: a hostile or mistaken value (a 1 MB string, a YAML
# alias bomb whose full repr has billions of characters) must not turn one message into gigabytes.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 2


def shown(value: Any) -> str:
    """``repr(value)``, shortened for an error message."""
    return _REPR.repr(value)


@dataclass
class TrainConfig:
    """Everything that defines a pre-training run."""

    # what to train
    rule: str = "clapp++"
    encoder: str = "vgg6"
    width: float = 0.25
    # the encoder's own options (e.g. ResNet's stem, cut), checked against its
    # dataclass (`localssl.models.encoder_options`); None: its defaults. Saved resolved.
    encoder_options: dict[str, Any] | None = None
    # data
    dataset: str = "shapes10"
    data_dir: str | None = None
    download: bool = False
    subset: int | None = None  # pre-train on a fixed class-balanced subset of this many images
    resize: int | None = None  # images resized to resize x resize when first decoded into the cache
    crop_scale: list[float] | None = None
    # per-channel normalisation (0..1 scale); None: the data set's published
    # values, or imagefolder's own (computed once, kept in the cache). Saved resolved.
    mean: list[float] | None = None
    std: list[float] | None = None
    # the rule's own options (e.g. CLAPP++'s f and feedback, InfoNCE's temperature),
    # checked against its dataclass (`localssl.rules.rule_options`); None: its
    # defaults. Saved resolved.
    rule_options: dict[str, Any] | None = None
    # pooled grid side per block (METHODS 2.2), for the spatial rules' losses
    # and the probe's features; None: `default_grids` at the input size. Saved resolved.
    grids: list[int] | None = None
    # optimisation (METHODS 2.4: AdamW lr 2e-4, wd 0, 32 images per batch)
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 32
    micro_batch: int | None = None  # views per chunk inside a step: less memory, one more forward
    lr: float = 2e-4
    weight_decay: float = 0.0
    # blockwise SSL trains with LARS and warmup + cosine (METHODS 5.1); the defaults are METHODS 2.4's
    optimizer: str = "adamw"  # adamw | lars (`localssl.engine.optim.LARS`)
    momentum: float = 0.9  # LARS's momentum (AdamW has its betas)
    lr_schedule: str = "constant"  # constant | cosine (`localssl.engine.optim.lr_at`)
    warmup_steps: int = 0  # linear warmup from lr 0 over this many steps
    min_lr: float = 0.0  # where the cosine ends, at the run's end (absolute, not a fraction of lr)
    seed: int = 0
    # execution
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    deterministic: bool = False
    threads: int | None = None
    retain_freed_memory: bool = True  # glibc: keep freed pages for the next block (engine.runtime)
    # torchrun (`localssl.engine.distributed`): data-parallel by default, one stage of blocks per rank with
    # --pipeline (`localssl.engine.pipeline`); stages: blocks per stage (None: balanced by measured cost)
    pipeline: bool = False
    stages: list[int] | None = None
    dist_timeout: float = 120.0  # seconds any collective or message may wait before the run stops naming a rank
    # bookkeeping
    out: str = "runs/run"
    checkpoint_every: int = 500
    log_every: int = 20
    progress: bool = True


@dataclass
class ProbeConfig:
    """Everything that defines a probe of a trained (or random-init) encoder."""

    run: str | None = None
    checkpoint: str | None = None
    random_init: bool = False
    protocols: list[str] = field(default_factory=lambda: ["fast", "knn"])
    dataset: str | None = None
    data_dir: str | None = None
    resize: int | None = None  # None: the run's
    grids: list[int] | None = None  # None: the run's (fitted to the input size for runs that saved none)
    train_subset: int | None = None
    test_subset: int | None = None
    epochs_fast: int = 100
    epochs_paper: int = 30
    lr: float = 1e-3
    knn_k: int = 200
    knn_t: float = 0.1
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    out: str | None = None


@dataclass
class CompareConfig:
    """Everything that defines a comparison of rules on equal terms (``localssl compare``).

    Every rule trains on the same encoder, data, budget (in steps), batch,
    optimizer and seed, each into ``out/<rule>/`` (a normal run folder); all
    are probed with the same protocols, and so is a random-init encoder of
    the same shape.
    """

    rules: list[str] = field(default_factory=list)
    encoder: str = "vgg6"
    width: float = 0.25
    encoder_options: dict[str, Any] | None = None
    # rule name -> that rule's own options (YAML: a mapping of mappings; command line:
    # RULE:KEY=VALUE, which __post_init__ nests); a rule not listed: its defaults.
    rule_options: dict[str, Any] | None = None
    # rule name -> its own recipe, for a rule that needs another encoder or input than the others (the patch
    # rules run per patch): RECIPE_KEYS only (what the rule sees, never how long or how fast it trains).
    # YAML: {RULE: {encoder: vgg6-patches, resize: 64}}; command line: RULE:KEY=VALUE and
    # RULE:encoder_options.KEY=VALUE. A rule without one: the shared encoder and input.
    recipes: dict[str, Any] | None = None
    dataset: str = "shapes10"
    data_dir: str | None = None
    subset: int | None = None
    resize: int | None = None
    budget: int | None = None  # training steps of every rule (each run's max_steps); required
    batch_size: int = 32
    lr: float = 2e-4
    # the optimizer and lr schedule every rule trains with (TrainConfig's fields of the same names)
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    threads: int | None = None
    # probes: `localssl probe` protocols, the same for every rule and for random-init
    probes: list[str] = field(default_factory=lambda: ["blocks", "fast", "knn"])
    probe_epochs: int = 100  # of the fast linear probes (fast, blocks)
    paper_epochs: int = 30  # of the paper and paper-bn probes, when asked
    probe_train_subset: int | None = None
    probe_test_subset: int | None = None
    # speed and memory, measured for every rule in one process (`localssl bench`'s tools)
    measure: bool = True
    measure_steps: int = 5
    measure_warmup: int = 2
    measure_rounds: int = 3
    checkpoint_every: int = 500
    progress: bool = False  # progress bars of training and probes (one line per run is always printed)
    out: str = "runs/compare"

    def __post_init__(self) -> None:
        self.rule_options = nest_rule_options(self.rule_options)
        self.recipes = nest_recipes(self.recipes)


#: What a comparison's recipe may set for one rule (`CompareConfig.recipes`): its encoder and its input.
RECIPE_KEYS = ("encoder", "width", "encoder_options", "resize", "grids", "crop_scale")


def nest_recipes(recipes: dict[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """``{"gim:encoder": "vgg6-patches", "gim:encoder_options.patch": "8"}`` as ``{"gim": {"encoder":
    "vgg6-patches", "encoder_options": {"patch": "8"}}}``; keys outside `RECIPE_KEYS` are errors."""
    nested = nest_rule_options(recipes, "recipes")
    if not nested:
        return None
    out: dict[str, dict[str, Any]] = {}
    for rule, recipe in nested.items():
        if not isinstance(recipe, dict):
            raise ConfigError(f"CompareConfig.recipes: {shown(rule)} must map to a recipe, got {shown(recipe)}")
        flat: dict[str, Any] = {}
        for key, value in recipe.items():
            head, dot, sub = str(key).partition(".")
            if head not in RECIPE_KEYS or (dot and head != "encoder_options") or (dot and not sub):
                raise ConfigError(f"CompareConfig.recipes of {rule}: unknown key {shown(key)}; valid: "
                                  f"{', '.join(RECIPE_KEYS)} (and encoder_options.KEY)")
            if dot:
                opts = flat.setdefault("encoder_options", {})
                if not isinstance(opts, dict):
                    raise ConfigError(f"CompareConfig.recipes of {rule}: encoder_options must be a mapping")
                opts[sub] = value
            else:
                flat[head] = value if head != "encoder_options" else {**dict(value or {}), **flat.get(head, {})}
        out[rule] = flat
    return out


def nest_rule_options(options: dict[str, Any] | None, field_name: str = "rule_options"
                      ) -> dict[str, dict[str, Any]] | None:
    """``{"A:overlap": "2", "B": {"temperature": 0.2}}`` as ``{"A": {"overlap": "2"}, "B": {...}}`` (A, B: rules).

    The command line gives one rule's option as ``RULE:KEY=VALUE`` (a rule
    name holds no ``:``); YAML gives a mapping per rule. Both may mix: a
    flag's ``RULE:KEY`` overrides that key of the file's mapping.
    """
    if not options:
        return None
    nested: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        rule, sep, opt = key.partition(":")
        if sep:
            if not rule or not opt:
                raise ConfigError(f"CompareConfig.{field_name}: expected RULE:KEY=VALUE, got {shown(key)}")
            nested.setdefault(rule, {})[opt] = value
        elif isinstance(value, dict):
            nested[key] = {**value, **nested.get(key, {})}
        else:
            raise ConfigError(f"CompareConfig.{field_name}: {shown(key)} must map a rule to its options (YAML) or "
                              f"be RULE:KEY (command line), got {shown(value)}")
    return nested


PROBE_PROTOCOLS = ("fast", "blocks", "paper", "paper-bn", "knn")
AMP_MODES = ("auto", "bf16", "off")
OPTIMIZERS = ("adamw", "lars")
LR_SCHEDULES = ("constant", "cosine")


def _check_type(cls_name: str, name: str, tp: Any, value: Any) -> Any:
    """Coerce YAML/CLI values to the field type, or fail naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _check_type(cls_name, name, non_none[0], value)
    if origin is dict:
        if isinstance(value, (list, tuple, str)):
            value = parse_key_values(cls_name, name, value)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{cls_name}.{name}: expected a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{cls_name}.{name}: expected a list, got {shown(value)}")
        return [_check_type(cls_name, name, args[0], v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{cls_name}.{name}: expected true/false, got {shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{cls_name}.{name}: expected an integer, got {shown(value)}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{cls_name}.{name}: expected an integer, got {shown(value)}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{name}: expected a number, got {shown(value)}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{cls_name}.{name}: expected a number, got {shown(value)}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{cls_name}.{name}: expected a string, got {shown(value)}")
        return str(value)
    return value


def parse_key_values(cls_name: str, name: str, items: str | list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["stem=cifar", "cut=units"]`` (the command line's form of a mapping) as a dict of strings."""
    out = {}
    for item in [items] if isinstance(items, str) else items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{cls_name}.{name}: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


# Rule options that were TrainConfig fields before rules had options of their
# own; configs and checkpoints of those versions still load (`_upgrade_train`).
LEGACY_RULE_KEYS = ("f", "feedback", "b_l2", "temperature", "proj_dim")


def _upgrade_train(data: dict[str, Any]) -> dict[str, Any]:
    """A TrainConfig mapping of an earlier version, with its rule options moved into ``rule_options``.

    Only the options the rule has are kept (a CLAPP++ run saved InfoNCE's
    temperature too, unused); keys given in ``rule_options`` win.
    """
    legacy = {k: data[k] for k in LEGACY_RULE_KEYS if k in data}
    if not legacy:
        return data
    from localssl.rules import RULES

    data = {k: v for k, v in data.items() if k not in LEGACY_RULE_KEYS}
    rule = data.get("rule", TrainConfig.rule)
    if rule in RULES:
        known = {f.name for f in fields(RULES.get(rule).options)}
        kept = {k: v for k, v in legacy.items() if k in known}
        data["rule_options"] = {**kept, **(data.get("rule_options") or {})} or None
    return data


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a config dataclass from a dict; unknown keys list the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"a {cls.__name__} must be a mapping, got {type(data).__name__}")
    if cls is TrainConfig:
        data = _upgrade_train(data)
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    # A YAML key may be a number, null or a list: sorted by repr, so mixed types still make a message.
    unknown = sorted(map(shown, set(data) - valid))
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} key(s) {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}; "
            f"valid keys: {', '.join(sorted(valid))}"
        )
    kwargs = {k: _check_type(cls.__name__, k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


# A config is a few hundred bytes; reading at most this much keeps a wrong --config (an archive, a log)
# from being read whole into memory before it is refused.
MAX_CONFIG_BYTES = 1 << 20


def load_yaml(cls: type, path: str | Path) -> Any:
    """A ``cls`` from the YAML file ``path``; every failure is a `ConfigError` naming the file (and key).

    ``yaml.safe_load`` builds plain values only: a ``!!python/...`` tag is an
    error, never an object, so opening a config runs no code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is over {MAX_CONFIG_BYTES >> 20} MiB: not a localssl config")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): not a YAML config") from None
    except yaml.MarkedYAMLError as e:
        # PyYAML's own text spans several lines and quotes the source; one line with the position is enough.
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(e, yaml.constructor.ConstructorError) and e.problem and "tag" in e.problem:
            raise ConfigError(f"config file {path}{where}: {e.problem} (a config holds plain values only; the tag "
                              "was refused, nothing was run)") from None
        raise ConfigError(f"config file {path} is not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests its values too deeply to be a config") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"config file {path} holds a value that cannot be read: {e}") from None
    try:
        return from_dict(cls, {} if data is None else data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (temp file + rename); a failed write leaves no temp file."""
    from localssl.atomic import atomic_file

    with atomic_file(path, "w") as fh:
        fh.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Any, **overrides: Any) -> Any:
    """A copy of ``cfg`` with ``overrides`` applied through the same type checks."""
    data = to_dict(cfg)
    data.update(overrides)
    return from_dict(type(cfg), data)


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


__all__ = [
    "ConfigError", "TrainConfig", "ProbeConfig", "CompareConfig", "nest_rule_options", "nest_recipes", "RECIPE_KEYS",
    "from_dict", "to_dict",
    "load_yaml", "save_yaml", "replace", "parse_key_values", "validate_train", "validate_probe", "check_grids",
    "check_shapes", "check_normalization", "OPTIMIZERS", "LR_SCHEDULES",
]
