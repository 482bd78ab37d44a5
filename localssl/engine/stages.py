"""Per-block cost and the split of the blocks into pipeline stages (``localssl stages``, `Pipeline`).

A block's cost is the time of its group's step (forward, loss, backward)
and the bytes of its output, the message a stage boundary after it sends
each step. A pipeline's steady state runs one step per slowest stage, so its
throughput is 1 / max(stage time) against 1 / sum(block times) for one
process (messages and bubbles not counted: `predict` says so).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from localssl.engine.step import unpack
from localssl.models import BlockEncoder
from localssl.rules import Rule


@dataclass
class BlockCost:
    seconds: float  # one step of the block's group (forward, loss, backward), median of the repeats
    out_bytes: int  # the block's output for the whole batch of views


def measure_blocks(encoder: BlockEncoder, rule: Rule, views, repeats: int = 3) -> list[BlockCost]:
    """Each block's cost on ``views``, on copies of the encoder and rule (the run's weights, statistics and
    RNG are untouched). A group of several blocks (BP: all of them) shares its time evenly among them."""
    enc, rl = copy.deepcopy(encoder), copy.deepcopy(rule)
    x = unpack(views, rl)
    times = [[0.0] * len(enc) for _ in range(repeats)]
    nbytes = [0] * len(enc)
    with torch.random.fork_rng(devices=[]):
        top = None
        if rl.needs_top_context:
            with torch.no_grad():
                top = enc.run_blocks(x, range(len(enc)))
        for r in range(repeats + 1):  # the first round warms up
            h_in = {-1: x}
            for g, group in enumerate(rl.groups()):
                t0 = time.perf_counter()
                h = h_in[group.input].detach()
                for b in group.blocks:
                    h = rl.handoff(b, enc.blocks[b](h))
                    h_in.setdefault(b, h.detach())
                    nbytes[b] = h.numel() * h.element_size()
                rl.loss(g, h, top).backward()
                if h.device.type == "cuda":
                    torch.cuda.synchronize(h.device)
                dt = (time.perf_counter() - t0) / len(group.blocks)
                if r:
                    for b in group.blocks:
                        times[r - 1][b] += dt
            for p in [*enc.parameters(), *rl.parameters()]:
                p.grad = None
    med = [sorted(t[b] for t in times)[repeats // 2] for b in range(len(enc))]
    return [BlockCost(s, n) for s, n in zip(med, nbytes)]


def balance(costs: Sequence[float], n: int) -> list[int]:
    """Blocks per stage: ``n`` contiguous stages whose slowest is as fast as can be (exact, by dynamic
    programming over split points; ties: the earlier stages take fewer blocks)."""
    k = len(costs)
    if not 1 <= n <= k:
        raise ValueError(f"cannot split {k} blocks into {n} stages (each stage needs a block)")
    pre = [0.0]
    for c in costs:
        pre.append(pre[-1] + c)
    inf = float("inf")
    best = [[inf] * (k + 1) for _ in range(n + 1)]  # best[s][j]: slowest of s stages over the first j blocks
    cut = [[0] * (k + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for s in range(1, n + 1):
        for j in range(s, k + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], pre[j] - pre[i])
                if v < best[s][j]:
                    best[s][j], cut[s][j] = v, i
    sizes, j = [], k
    for s in range(n, 0, -1):
        i = cut[s][j]
        sizes.append(j - i)
        j = i
    return sizes[::-1]


def check_stages(sizes: Sequence[int], num_blocks: int, ranks: int) -> list[int]:
    """``sizes`` as given by --stages, checked against the encoder and the ranks."""
    sizes = [int(s) for s in sizes]
    if len(sizes) != ranks or sum(sizes) != num_blocks or min(sizes) < 1:
        raise ValueError(f"stages {sizes} must give each of the {ranks} ranks >= 1 block, "
                         f"{num_blocks} blocks in all")
    return sizes


@dataclass
class Prediction:
    stages: list[int]
    stage_seconds: list[float]
    sequential_per_s: float  # steps per second of one process: 1 / sum of block times
    pipeline_per_s: float  # steps per second of the pipeline: 1 / slowest stage (no message or bubble cost)
    boundary_bytes: list[int]  # bytes sent after each stage but the last, per step

    @property
    def speedup(self) -> float:
        return self.pipeline_per_s / self.sequential_per_s


def predict(costs: Sequence[BlockCost], sizes: Sequence[int]) -> Prediction:
    """What a split promises: per-stage time, both throughputs, the messages at its boundaries."""
    at, stage_s, sent = 0, [], []
    for s in sizes:
        stage_s.append(sum(c.seconds for c in costs[at:at + s]))
        at += s
        if at < len(costs):
            sent.append(costs[at - 1].out_bytes)
    total = sum(c.seconds for c in costs)
    return Prediction(list(sizes), stage_s, 1 / max(total, 1e-12), 1 / max(max(stage_s), 1e-12), sent)


__all__ = ["BlockCost", "measure_blocks", "balance", "check_stages", "predict", "Prediction"]
