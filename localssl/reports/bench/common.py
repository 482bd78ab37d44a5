"""What every measuring tool of ``localssl bench`` shares: targets, one rule ready to train, random inputs."""
from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from localssl.config import TrainConfig
from localssl.data.augment import ViewBatch, ViewLayout
from localssl.models import BlockEncoder
from localssl.rules import BENCH_RULES, Rule, split_variant

#: What `localssl bench` runs when no --rules are given: the README figure's rules (`localssl.rules.figures`,
#: which also holds that figure's speed targets, `localssl.rules.speed_target`).
DEFAULT_RULES = BENCH_RULES
#: Local peak saved activations relative to the BP twin.
MEMORY_TARGET = 0.5
#: Augmentation images/s relative to training images/s.
AUGMENT_TARGET = 5.0
#: Above this spread between rounds, the report warns that the timings are noisy.
NOISY_SPREAD = 0.25
#: METHODS 2.2b, full-width VGG-6 at 32 px, GFLOP per view (the dense B: CLAPP++'s).
REFERENCE_GFLOP = {"local step": 2.1, "BP step": 3.2, "dense B (fwd + dB)": 0.8}
#: The encoder those reference figures describe.
REFERENCE_ENCODER = "vgg6"
#: METHODS 2.2b: the largest block's share of the sum over blocks, VGG-6 at 32 px.
REFERENCE_FLOOR = 0.41
#: The precisions a benchmark can time, by name: the autocast dtype (None = plain fp32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}

#: What a failed build or step raises: pooling grids that do not fit an image size
#: (ValueError), an allocation the allocator refuses (RuntimeError, torch.OutOfMemoryError,
#: MemoryError).
BUILD_ERRORS = (ValueError, RuntimeError, MemoryError)

Log = Callable[[str], None]


@dataclass
class BenchState:
    """One rule ready to train: its own copy of the encoder, the rule, its optimizer."""

    name: str
    encoder: BlockEncoder
    rule: Rule
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    micro_batch: int | None = None

    def step(self, views: torch.Tensor, with_optimizer: bool = True) -> list[torch.Tensor]:
        """One step on the bench's two-view rows, handed to the rule in the layout it reads (`in_layout`)."""
        from localssl.engine.step import train_step

        return train_step(self.encoder, self.rule, self.optimizer if with_optimizer else None,
                          in_layout(views, self.rule.layout), device=self.device, amp_dtype=self.amp_dtype,
                          micro_batch=self.micro_batch)

    def trainable_numel(self) -> int:
        return sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])


def bench_config(rule_name: str, encoder_name: str, width: float, encoder_options: Mapping[str, Any] | None = None,
                 rule_options: Mapping[str, Any] | None = None) -> TrainConfig:
    """The `TrainConfig` a bench row trains with: defaults (grids fitted to the size) but for the options asked.

    ``rule_options`` are shared by every benched rule (``--rule-opt``): each
    rule takes the keys it has (`builder.options_for`), so a head option
    reaches a blockwise rule and its BP twin alike. ``rule_name`` may be a
    variant (`localssl.rules.split_variant`, ``clapp++@b_rank=64``): its own
    options go over the shared ones, and its label names its rows.
    """
    from localssl.builder import options_for

    name, own = split_variant(rule_name)
    return TrainConfig(rule=name, encoder=encoder_name, width=width,
                       encoder_options=dict(encoder_options) if encoder_options else None,
                       rule_options={**options_for(name, rule_options), **own} or None)


def check_rule_options(rules: Sequence[str], rule_options: Mapping[str, Any] | None) -> None:
    """A ``--rule-opt`` key that no benched rule takes is an error listing the keys they do take."""
    from localssl.rules import RULES

    known = {f.name for r in rules for f in fields(RULES.get(split_variant(r)[0]).options)}
    unknown = sorted(set(rule_options or {}) - known)
    if unknown:
        raise ValueError(f"rule option {', '.join(map(repr, unknown))} is taken by none of the rules benched "
                         f"({', '.join(rules)}); they take: {', '.join(sorted(known)) or 'no options'}")


@dataclass(frozen=True)
class RuleFacts:
    """What the bench reads of a rule before it times it: whether it trains locally (``rule.local``) and how
    many trainable parameters of its own it holds (B matrices, projections, heads: ``rule.parameters()``, the
    "rule params" of the memory table, here counted on a build without memory)."""

    local: bool
    own_params: int


def rule_facts(rules: Sequence[str], encoder_name: str, width: float, image_size: int,
               encoder_options: Mapping[str, Any] | None = None,
               rule_options: Mapping[str, Mapping[str, Any] | None] | None = None) -> dict[str, RuleFacts | None]:
    """`RuleFacts` of every benched rule, built on the meta device (no memory: a dense B can be 8192 x 8192).

    ``rule_options``: label -> that rule's options (as `measure_speed` takes them; a label not in it: its
    defaults). A rule that cannot be built here is None: the tools report it as not run.
    """
    from localssl.builder import build_model

    out: dict[str, RuleFacts | None] = {}
    for r in dict.fromkeys(rules):
        try:
            cfg = bench_config(r, encoder_name, width, encoder_options, (rule_options or {}).get(r))
            rule = build_model(cfg, 3, image_size, rule_device="meta").rule
        except BUILD_ERRORS:
            out[r] = None
            continue
        out[r] = RuleFacts(rule.local, sum(p.numel() for p in rule.parameters() if p.requires_grad))
    return out


def bp_twins(rules: Sequence[str], encoder_name: str, width: float, image_size: int,
             encoder_options: Mapping[str, Any] | None = None,
             facts: Mapping[str, RuleFacts | None] | None = None) -> dict[str, str | None]:
    """The end-to-end rule every benched rule's speed and memory are compared with (its "BP twin").

    A local rule's twin is its registered counterpart
    (`localssl.rules.bp_counterpart`) where that is benched too; otherwise,
    and for an end-to-end rule, the first end-to-end rule benched (None if
    there is none). Which rules are end-to-end is read from the built rules
    (``rule.local``; ``facts``, `rule_facts`, built here if not given), never
    from names.
    A rule that cannot be built here is left to the tools, which report it as
    not run; it is nobody's reference.
    """
    from localssl.rules import bp_counterpart

    facts = facts if facts is not None else rule_facts(rules, encoder_name, width, image_size, encoder_options)
    local = {r: None if facts.get(r) is None else facts[r].local for r in rules}
    reference = next((r for r in rules if local[r] is False), None)
    def twin(r: str) -> str | None:
        other = bp_counterpart(split_variant(r)[0])
        return other if local[r] is not False and other in local else reference

    return {r: twin(r) for r in rules}


def build_state(
    rule_name: str,
    encoder_name: str,
    width: float,
    image_size: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    seed: int,
    micro_batch: int | None = None,
    encoder_options: Mapping[str, Any] | None = None,
    rule_options: Mapping[str, Any] | None = None,
) -> BenchState:
    """Encoder + rule + AdamW (lr 2e-4, wd 0, METHODS 2.4), as `localssl train` builds them (`localssl.builder`;
    a rule's parameters with an optimizer hint, e.g. ``b_optimizer=sgd``, in their own optimizer)."""
    from localssl.builder import build_model, build_optimizer

    torch.manual_seed(seed)  # the same encoder init for every rule
    cfg = bench_config(rule_name, encoder_name, width, encoder_options, rule_options)
    model = build_model(cfg, 3, image_size)
    encoder, rule = model.encoder, model.rule
    mf = torch.channels_last if channels_last else torch.contiguous_format
    encoder.to(device, memory_format=mf)
    rule.to(device)
    encoder.train()
    opt = build_optimizer(encoder, rule, 2e-4, 0.0)
    return BenchState(rule_name, encoder, rule, opt, device, amp_dtype, mf, micro_batch)


def random_views(batch_size: int, image_size: int, device: torch.device, channels_last: bool,
                 seed: int) -> torch.Tensor:
    """Two views per image of standard-normal noise: no data set needed, the same inputs for every rule."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(2 * batch_size, 3, image_size, image_size, generator=g).to(device)
    return v.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def in_layout(views: torch.Tensor, layout: ViewLayout) -> torch.Tensor | ViewBatch:
    """The bench's (2B, C, H, W) rows (`random_views`) as a batch in ``layout``: every rule steps on the same
    numbers. Rows: as they are; channels: view 2 beside view 1, (B, 2C, H, W); pairs: the 2B rows are read as B
    positive and B negative pair rows, each of C channels (`localssl.data.pairs`), the same shape; one view
    per image (the patch rules): view 1 of each image, B rows, so that a step still holds B images (and a
    one-view rule does half the per-image work of a two-view one, which its images/s then shows)."""
    if layout == ViewLayout():
        return views
    if layout == ViewLayout(1, "rows"):
        return ViewBatch(views[: views.shape[0] // 2], layout)
    if layout.n != 2:
        raise ValueError(f"the bench makes two views per image; a rule reading {layout} needs its own bench views")
    if layout.stacking == "channels":
        return ViewBatch(torch.cat(views.chunk(2), dim=1), layout)
    return ViewBatch(views, layout)


def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA runs asynchronously), so that a clock reading means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).replace("torch.", "").replace("bfloat16", "bf16")


def rule_variants(rules: Sequence[str], micro_batch: int | None) -> list[tuple[str, int | None]]:
    """Every rule with the plain step, then (if asked) every rule micro-batched: the rows of every table."""
    return [(r, None) for r in rules] + ([(r, micro_batch) for r in rules] if micro_batch else [])


def variant_label(rule: str, micro_batch: int | None) -> str:
    return rule if micro_batch is None else f"{rule} [micro-batch {micro_batch}]"


def error_text(e: BaseException) -> str:
    """One line for a table: the exception's class where its message alone would not say what failed."""
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else ""
    if isinstance(e, ValueError) and msg:  # bad input: the message names the value
        return msg
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def hook_optimizer_step(state: BenchState, pre: Callable[..., None], post: Callable[..., None]) -> list[Any]:
    """Call ``pre``/``post`` around the optimizer's ``step`` of ``state``; returns the removable handles."""
    return [state.optimizer.register_step_pre_hook(pre), state.optimizer.register_step_post_hook(post)]


def quartiles(xs: Sequence[float]) -> list[float]:
    """First and third quartile (inclusive method); a single value is its own quartiles."""
    if len(xs) < 2:
        return [xs[0], xs[0]]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return [q[0], q[2]]


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")
