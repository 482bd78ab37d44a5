"""Training on several processes with torch.distributed, launched by ``torchrun``.

    torchrun --nproc-per-node 2 -m localssl train --rule clapp++ ...              # data-parallel
    torchrun --nproc-per-node 3 -m localssl train --rule clapp++ ... --pipeline   # one stage per rank

The trainer talks to one `Parallel` object through a few hooks (which
images this rank reads, how a step runs, who writes, the full state to
checkpoint); `Parallel` itself is the single-process one (`Solo`), so the loop
has no branches.

Data-parallel (`DataParallel`): every rank holds the whole encoder and rule.
The global batch of ``batch_size`` images (the permutation of single-process
training, `localssl.engine.trainer._Batches`) is cut into one contiguous
slice per rank, and each image's views are drawn from (seed, epoch, image
index) (`localssl.data.draws`), so N ranks together see exactly the batch one
process sees. Each group's loss reads the representations of the *whole*
batch: `gather_views` all-gathers them with the autograd-aware
``torch.distributed.nn.functional.all_gather``, view 1 of every rank before
view 2 of any, the single-process layout; every rank then computes the same
full-batch loss. Its backward sums the N identical gradients of each rank's
rows (N x dL/dz_local) and the gradient average across ranks divides by N:
together, the single-process gradient of the concatenated batch. (A gather
without autograd leaves only the local rows' share: gradients 1/N too small
with a normal-looking loss, the bug lightly once shipped; tests/test_distributed
catches it.) The gradients of a group are averaged by one bucketed
``all_reduce`` started as soon as its backward ends (`GradSync`), so group k's
communication overlaps group k+1's compute. No DDP wrapper: a block in two
groups (LoCo) sees two backward calls per step, which DDP's hooks and
``static_graph`` do not support (pytorch/pytorch#80832), and DDP's unused-
parameter handling can desync silently (#128949); `GradSync` instead checks
that every rank has a gradient for exactly the same parameters.

BatchNorm normalises over each rank's rows (as DDP does without
SyncBatchNorm), so a BatchNorm encoder trains like a batch of ``batch_size /
N`` per statistic; encoders without normalisation (VGG) train exactly as one
process.

Faults (`Cluster`): every collective and message waits at most
``dist_timeout`` seconds (the process group's timeout, and ``Work.wait``);
each rank beats a counter in the rendezvous store; a collective that fails
or times out makes the rank find which peers stopped beating (or said why
they stopped) and exit with `RankLost` naming them. A restart with
``--resume`` continues from the last checkpoint, which rank 0 writes in the
single-process format.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from localssl.data.augment import ViewLayout
from localssl.engine.step import Losses, PlainStep, Step
from localssl.models import BlockEncoder
from localssl.rules import Rule


class RankLost(RuntimeError):
    """A peer died, stopped answering or failed: this rank stops too, naming it."""


#: Seconds between a rank's heartbeats in the store (a dead rank is one whose count stops moving).
BEAT_S = 0.5


def launched() -> bool:
    """True inside ``torchrun`` (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class Cluster:
    """The process group, its heartbeats and the error that names a lost rank."""

    def __init__(self, timeout_s: float, device: torch.device) -> None:
        self.timeout = timedelta(seconds=float(timeout_s))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=self.timeout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # A second client of the rendezvous store for the heartbeats, so that the beating thread
        # never shares a connection with the process group's own use of it.
        self.addr, self.port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
        # Keys per restart: torchrun's store outlives the workers it restarts (--max-restarts).
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.store = dist.PrefixStore(f"localssl/{attempt}/", dist.TCPStore(
            self.addr, self.port, is_master=False, timeout=timedelta(seconds=5), wait_for_workers=False))
        self._stop = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="localssl-heartbeat", daemon=True)
        self._beats.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(f"beat/{self.rank}", 1)
            except Exception:  # the store is gone (its host died): the next collective will say so
                return
            self._stop.wait(BEAT_S)

    def lost(self) -> str:
        """Which ranks stopped, as a phrase: those that said why first, then those whose heartbeat stopped."""
        try:
            said = {r: self.store.get(f"failed/{r}").decode() for r in range(self.world)
                    if r != self.rank and self.store.check([f"failed/{r}"])}
            before = self._counts()
            time.sleep(4 * BEAT_S)
            after = self._counts()
        except Exception:
            return (f"rank 0 (the rendezvous store at {self.addr}:{self.port}, which rank 0 hosts unless torchrun "
                    "does, stopped answering)")
        silent = [r for r in range(self.world) if r != self.rank and after[r] == before[r] and r not in said]
        parts = [f"rank {r} (no heartbeat for {4 * BEAT_S:.0f} s: it died or hangs)" for r in silent]
        # A rank that stopped because it lost another is named after the ranks that died without a word.
        parts += [f"rank {r} ({why})" for r, why in said.items()]
        return "; ".join(parts) if parts else "no rank is known lost (all beat): a rank is stuck or slow"

    def _counts(self) -> list[int]:
        return [self.store.add(f"beat/{r}", 0) for r in range(self.world)]

    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Run collectives; their failure or timeout becomes a `RankLost` naming the lost ranks."""
        try:
            yield
        except RankLost:
            raise
        except (RuntimeError, dist.DistError) as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RankLost(f"rank {self.rank}: {what} failed within the {self.timeout.total_seconds():.0f} s "
                           f"timeout ({first}); lost: {self.lost()}") from None

    def wait(self, work: dist.Work, what: str) -> None:
        """Wait for an async collective, at most the timeout."""
        with self.guard(what):
            work.wait(self.timeout)

    def failed(self, error: BaseException) -> None:
        """Tell the others why this rank stops (read by their `lost`)."""
        try:
            self.store.set(f"failed/{self.rank}", f"stopped: {type(error).__name__}: {str(error)[:200]}")
        except Exception:
            pass

    def close(self) -> None:
        # Join the heartbeat before the interpreter can exit: a daemon thread caught inside the store's C++
        # client while the process tears down ends it with std::terminate ("terminate called without an
        # active exception", exit -6), seen once in CI on a finished pipeline rank. It leaves within one
        # store call (its client's timeout is 5 s).
        self._stop.set()
        if self._beats.is_alive() and self._beats is not threading.current_thread():
            self._beats.join(timeout=10.0)
        if dist.is_initialized():
            dist.destroy_process_group()


def gather_views(z: torch.Tensor, layout: ViewLayout) -> torch.Tensor:
    """Every rank's rows of ``z`` in the single-process order, with gradients flowing back to their rank.

    Rows stacked by view ([view 1; view 2], each rank's b images): the result
    is [view 1 of rank 0, rank 1, ...; view 2 of rank 0, rank 1, ...], so the
    two halves stay apart and image i's views keep their distance B.
    SCFF's pairs ([positive pairs; negative pairs]) are split the same way, so
    the positives stay apart from the negatives. Channel-stacked views and
    one view per image (one row per image): the ranks' rows in rank order.
    """
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(z.contiguous())
    if layout.stacking == "channels" or layout.n == 1:
        return torch.cat(parts)
    return torch.cat([chunk for v in range(layout.n) for chunk in (p.chunk(layout.n)[v] for p in parts)])


class GradSync:
    """Average each group's gradients across ranks, one bucketed all_reduce per group.

    A parameter is reduced after the last group whose loss reaches it (a
    block shared by two LoCo groups: after the second). Each bucket carries
    one flag per parameter, "this rank has a gradient": a parameter that has
    one on some ranks and not on others is an error, never a silent desync.
    """

    def __init__(self, cluster: Cluster, encoder: BlockEncoder, rule: Rule) -> None:
        self.cluster = cluster
        groups = rule.groups()
        names = {id(p): f"encoder.{n}" for n, p in encoder.named_parameters()}
        names.update({id(p): f"rule.{n}" for n, p in rule.named_parameters()})
        last: dict[int, int] = {}
        params: dict[int, nn.Parameter] = {}
        for g, group in enumerate(groups):
            for p in [p for b in group.blocks for p in encoder.blocks[b].parameters()] + rule.group_parameters(g):
                if p.requires_grad:
                    last[id(p)], params[id(p)] = g, p
        self.buckets = [[params[i] for i in params if last[i] == g] for g in range(len(groups))]
        self.names = names
        self.pending: list[tuple[int, torch.Tensor, dist.Work]] = []

    def after_group(self, g: int) -> None:
        """Start averaging the gradients whose last group is ``g`` (returns at once)."""
        ps = self.buckets[g]
        if not ps:
            return
        dev, dtype = ps[0].device, ps[0].dtype
        flat = torch.cat([p.grad.reshape(-1).to(dtype) if p.grad is not None
                          else torch.zeros(p.numel(), device=dev, dtype=dtype) for p in ps]
                         + [torch.tensor([float(p.grad is not None) for p in ps], device=dev, dtype=dtype)])
        with self.cluster.guard(f"the gradient all_reduce of group {g + 1}"):
            self.pending.append((g, flat, dist.all_reduce(flat, async_op=True)))

    def finish(self) -> None:
        """Wait for every group's average and write it into ``.grad``."""
        world = self.cluster.world
        for g, flat, work in self.pending:
            self.cluster.wait(work, f"the gradient all_reduce of group {g + 1}")
            ps = self.buckets[g]
            have = flat[-len(ps):].round().long().tolist()
            at = 0
            for p, n in zip(ps, have):
                if n not in (0, world):
                    raise RankLost(f"rank {self.cluster.rank}: {self.names.get(id(p), 'a parameter')} has a gradient "
                                   f"on {n} of {world} ranks: the ranks ran different graphs")
                if n:
                    p.grad = (flat[at:at + p.numel()] / world).view_as(p).to(p.dtype)
                at += p.numel()
        self.pending = []


class DataParallelStep(PlainStep):
    """`PlainStep` with every group's loss on the gathered batch and its gradients averaged across ranks."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._sync: dict[int, GradSync] = {}
        self._now: GradSync | None = None

    def _guard(self):
        return self.cluster.guard("gathering the views' representations")

    def _begin(self, encoder, rule, top):
        self._now = self._sync.setdefault(id(rule), GradSync(self.cluster, encoder, rule))
        return None if top is None else gather_views(rule.context(top), rule.layout)

    def _group_loss(self, rule, g, out, top):
        # The loss of the whole batch (rule.loss's two halves, with the gather between them).
        return rule.objective(g, gather_views(rule.represent(g, out), rule.layout), top)

    def _after_backward(self, g):
        self._now.after_group(g)

    def _finish(self):
        self._now.finish()


class Parallel:
    """The hooks the trainer calls; as they are here, one process's (nothing to share)."""

    rank, world, is_writer, reads_images = 0, 1, True, True

    def shard(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's images of a global batch (data set indices)."""
        return index

    def step(self, step: Step) -> Step:
        """How this rank runs a step, given the single-process one."""
        return step

    def start(self, encoder: BlockEncoder, rule: Rule, sample: Any = None) -> None:
        """Before the first step: make every rank hold the same weights (``sample()``: a batch of views)."""

    def losses(self, losses: Losses) -> Losses:
        """Every group's loss, on the rank that logs."""
        return losses

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is on some (a stop signal ends every rank at the same step)."""
        return flag

    def state(self, encoder: BlockEncoder, rule: Rule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The single-process checkpoint entries, complete on the writer."""
        return {"encoder": encoder.state_dict(), "rule": rule.state_dict(), "optimizer": optimizer.state_dict()}

    def barrier(self, what: str) -> None:
        """Every rank here before any goes on."""

    def failed(self, error: BaseException) -> None:
        """This rank stops with ``error``."""

    def close(self) -> None:
        """Leave the process group."""


class DataParallel(Parallel):
    """Every rank the whole model, a slice of every batch; gradients averaged (module docstring)."""

    reads_images = True

    def __init__(self, cluster: Cluster, batch_size: int) -> None:
        self.cluster = cluster
        self.rank, self.world = cluster.rank, cluster.world
        self.is_writer = self.rank == 0
        if batch_size % self.world:
            from localssl.config import ConfigError

            raise ConfigError(f"batch_size {batch_size} does not split over {self.world} ranks: data-parallel "
                              f"training needs a multiple of {self.world}")
        self.local = batch_size // self.world

    def shard(self, index):
        return index[self.rank * self.local:(self.rank + 1) * self.local]

    def step(self, step):
        if type(step) is not PlainStep:
            from localssl.config import ConfigError

            raise ConfigError(f"data-parallel training runs plain steps; this run asks for {type(step).__name__} "
                              "(unset micro_batch; sequential schedules train one process at a time)")
        return DataParallelStep(self.cluster)

    def start(self, encoder, rule, sample=None):
        with self.cluster.guard("broadcasting rank 0's weights"):
            for t in [*encoder.state_dict().values(), *rule.state_dict().values()]:
                dist.broadcast(t, 0)

    def any(self, flag):
        t = group_tensor(torch.tensor([float(flag)]))
        with self.cluster.guard("agreeing on a stop"):
            dist.all_reduce(t)
        return bool(t.item() > 0)

    def barrier(self, what):
        with self.cluster.guard(what):
            dist.barrier()

    def failed(self, error):
        self.cluster.failed(error)

    def close(self):
        self.cluster.close()


def group_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the device the process group's backend talks to (NCCL: this rank's GPU)."""
    return t.cuda() if dist.get_backend() == "nccl" else t


def rank_device(device: torch.device) -> torch.device:
    """A CUDA run's device on this rank: its LOCAL_RANK's GPU (torchrun), unless the run names one."""
    if launched() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def start_parallel(pipeline: bool, stages: Sequence[int] | None, timeout_s: float, batch_size: int,
                   device: torch.device) -> Parallel:
    """The run's `Parallel`: `Solo` outside torchrun, else data-parallel or a pipeline stage."""
    if not launched():
        if pipeline:
            from localssl.config import ConfigError

            raise ConfigError("--pipeline runs one stage per process: launch it with torchrun --nproc-per-node N")
        return Parallel()
    cluster = Cluster(timeout_s, device)
    if pipeline:
        from localssl.engine.pipeline import Pipeline

        return Pipeline(cluster, stages)
    return DataParallel(cluster, batch_size)


#: One process: `Parallel` as it is.
Solo = Parallel

__all__ = ["Cluster", "RankLost", "Parallel", "Solo", "DataParallel", "DataParallelStep", "GradSync", "gather_views",
           "start_parallel", "launched", "rank_device", "group_tensor"]
