"""The typed configs: every option of ``train``, ``probe`` and ``compare`` is a field here, with its default.

Also the names some fields may take (`AMP_MODES`, `OPTIMIZERS`, ...). How a
config is read and written is `localssl.config.io`; which values can work is
`localssl.config.validate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from localssl.config.recipes import nest_recipes, nest_rule_options


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


PROBE_PROTOCOLS = ("fast", "blocks", "paper", "paper-bn", "knn")
AMP_MODES = ("auto", "bf16", "off")
OPTIMIZERS = ("adamw", "lars")
LR_SCHEDULES = ("constant", "cosine")
