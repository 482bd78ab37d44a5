"""``localssl bench``: speed, activation memory, parameter memory and FLOPs of the rules, side by side.

Everything is measured in one process on the same encoder, batch and inputs
(random views, so no data set is needed), with the real training step
(`localssl.engine.trainer.train_step`, the AdamW of `build_optimizer`):

1. Training images/s per rule, at every width (default 0.25 and the paper's
   1.0, the latter with fewer steps) and precision (fp32, and bf16 where the
   device runs it natively; the header prints the CPU flags that decide it).
   Within one width the rules and precisions are interleaved inside every
   round and the median over rounds is reported, so that a burst of load
   from another process hits every rule alike; ``spread`` shows how noisy the
   machine was; ``in AdamW`` is the share of the step spent in the
   optimizer (timed with step hooks); ``faults/step`` the process's minor
   page faults per step (see `engine.runtime.retain_freed_memory`). Ratios
   are against each rule's BP twin (`common.bp_twins`: the end-to-end rule
   registered as its counterpart where that is benched, e.g. bp-barlow for
   blockwise-barlow, else the first end-to-end rule benched), next to the
   README figure's targets (`localssl.rules.speed_target`, per width), with
   the quartiles of the same ratio taken round by round; bf16 rows also
   against fp32. Optionally, at the first width, the local rule with the
   fewest parameters of its own again at the other precision (where that
   one is not timed anyway) and in the other memory layout (channels_last /
   contiguous), and the rule with the most with the unfused AdamW. Tables 2-6
   describe the first width at the first precision. At width 1.0 CLAPP++'s
   dense B holds ~201M parameters (3.2 GB with gradients and AdamW state);
   a rule that would not fit in memory is reported as not run, not started.
2. Peak activation memory held for backward: every tensor autograd saves is
   counted through `torch.autograd.graph.saved_tensors_hooks`, deduplicated
   by storage, and released when autograd frees it, so the figure is the peak
   of the *live* saved bytes. The trainer frees each group's graph after its
   backward, so a local rule holds one block's tensors at a time. Tensors
   that share storage with a parameter (conv weights, B matrices) are
   excluded from the activation figure and reported on their own: they are
   the parameters, counted in (3). The floor of per-block training is the
   largest block's saved activations (block run alone on a detached input, no
   loss head) over the whole encoder's under BP (one graph; a tensor saved by
   two blocks counted once). METHODS 2.2b's "about 0.41 for VGG-6 at 32 px"
   is the largest block over the *sum* of the blocks, which counts the
   tensors shared at block boundaries twice; both are printed, and the one
   against BP (0.58 for VGG-6) is the floor a local/BP ratio can reach.
   Every rule's peak is also given against that floor (``vs floor``), and a
   local rule's peak per group next to its blocks alone: the difference is
   what its own head and loss hold (a blockwise rule's conv expansion at a
   stage's full resolution can double it).
   Optionally (``--rss``) the whole-process peak RSS of each rule, each in a
   fresh subprocess, from the end of the build to the end of training.
3. Parameters + gradients + optimizer state of the encoder *and* of the
   rule's own parameters, read from the real tensors after a step (AdamW keeps
   two states per parameter; its scalar step counters are listed apart).
4. Augmentation images/s (`SimCLRViews`, uint8 in, two views out) against
   training images/s; target >= 5x.
5. FLOPs per view of each part of a step (encoder forward, encoder backward
   split into weight gradients and input gradients, the rule's own
   parameters forward/backward, the loss), counted with the formulas of
   `torch.utils.flop_counter` (2 FLOPs per multiply-add; conv and matmul only:
   ReLU, pooling, the hinge and AdamW are elementwise and not counted).
6. Where a step's time goes: every op of a few steps per rule timed on its
   own (a `TorchDispatchMode`) and summed by family: conv forward, conv
   backward with the weight gradient only or with the input gradient too,
   matmul, pooling, ReLU, fill/copy, AdamW, other ops, and the time outside
   ops. It shows what the FLOP table cannot: how much of the step is not
   convolution at all.

The package holds one measuring tool per module (`memory`, `rss`, `flops`,
`speed`, `breakdown`), the orchestrator (`run`), the formatter (`format`,
with the FLOP table's notes in `flop_notes`)
and the command line (`cli`), STYLE principle 13.
"""
from __future__ import annotations

from localssl.reports.bench.breakdown import TIME_PARTS, measure_breakdown, time_breakdown
from localssl.reports.bench.cli import add_bench_parser, bench_main, main
from localssl.reports.bench.common import (
    AUGMENT_TARGET,
    DEFAULT_RULES,
    MEMORY_TARGET,
    NOISY_SPREAD,
    PRECISIONS,
    REFERENCE_FLOOR,
    REFERENCE_GFLOP,
    BenchState,
    bp_twins,
    build_state,
)
from localssl.reports.bench.common import quartiles as _quartiles
from localssl.reports.bench.flops import FLOP_PARTS, PartFlopCounter, measure_flops, step_flops
from localssl.reports.bench.format import format_report, twin_table
from localssl.reports.bench.memory import (
    SavedBytesTracker,
    encoder_block_bytes,
    measure_memory,
    parameter_memory,
    training_state_bytes,
)
from localssl.reports.bench.rss import peak_rss
from localssl.reports.bench.run import (
    DEFAULT_WIDTHS,
    SHOWN_CPU_FLAGS,
    WIDE_WIDTH,
    precision_support,
    resolve_precisions,
    run_bench,
)
from localssl.reports.bench.speed import Schedule, measure_speed

__all__ = [
    "AUGMENT_TARGET", "DEFAULT_RULES", "DEFAULT_WIDTHS", "FLOP_PARTS", "MEMORY_TARGET", "NOISY_SPREAD",
    "PRECISIONS", "REFERENCE_FLOOR", "REFERENCE_GFLOP", "SHOWN_CPU_FLAGS", "TIME_PARTS",
    "WIDE_WIDTH", "BenchState", "PartFlopCounter", "SavedBytesTracker", "Schedule", "_quartiles",
    "add_bench_parser", "bench_main", "bp_twins", "build_state", "encoder_block_bytes", "format_report", "main",
    "measure_breakdown", "measure_flops", "measure_memory", "measure_speed", "parameter_memory", "peak_rss",
    "precision_support", "resolve_precisions", "run_bench", "step_flops", "time_breakdown", "training_state_bytes",
    "twin_table",
]
