"""Pipeline-parallel local training: one contiguous stage of blocks per rank (``--pipeline``).

Local learning needs no backward messages: stage k trains on batch t while
stage k+1 trains on batch t-1. Each rank owns its stage's blocks, the groups
whose blocks lie in it (their part of the rule: B matrices, heads) and their
optimizer state; rank 0 makes the views; every stage runs its groups as
`PlainStep` would (forward, loss, backward, from the detached input) and
sends its last block's output on to the next rank as soon as its forward is
done, before its backward, so the next stage computes while this one
updates. Every stage updates from its own loss only, on the same input the
single process would give it (that stage's input computed with the weights
before this step's update, as `PlainStep` computes it), so a pipeline trains
to the very weights of one process (bit-identical in deterministic mode;
tests/test_pipeline.py).

Messages: each step sends a small header (stop flag, dtype, shape, memory
format) and then the activation, with blocking ``send``/``recv``: gloo's
``isend``/``irecv`` make no progress without ``wait()`` and several
outstanding ones can hang (pytorch/pytorch#30723, pytorch/gloo#308), and
``batch_isend_irecv`` is called unstable on gloo (pytorch/PiPPy#1130); a
blocking send has exactly one outstanding message per peer. (The
``torch.distributed.pipelining`` schedules put the only loss on the last
stage, which does not fit local losses.) A stop (a signal on any rank,
which reaches rank 0 through the store) travels down the pipeline in the
header, so every stage stops after the same step; per-step collectives
would flush the pipeline every step.

Messages down: the DFB top-layer context (``needs_top_context``) is
synchronous: the last stage broadcasts its output (the top block's, of this
step's batch) to every stage, whose losses wait for it, so each stage's
update is the single process's, at the cost of the overlap (stage k's loss
waits for the whole forward). No stale option is offered: the context is
per image, so an older batch's would be another image's. A group that
spans two stages (LoCo's overlap: loss k back-propagates through block k+1)
is synchronous too: its loss is computed on the upper stage, from the
stage's input as a leaf, and the leaf's gradient is sent back down, where
the lower stage back-propagates it through its part before its update (it
waits for it). A group spanning three stages is refused by name. Noise that a rule injects in ``handoff`` is drawn
from each rank's own RNG, so such a run is not the single process's draw.

Checkpoints: rank 0 gathers each stage's blocks, rule entries and optimizer
state into the single-process format (`Pipeline.state`), so a pipeline run
resumes on one process and the other way round.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from localssl.config import ConfigError
from localssl.engine.distributed import Cluster, Parallel, group_tensor
from localssl.engine.stages import balance, check_stages, measure_blocks
from localssl.engine.step import Losses, PlainStep, Step, _amp, _Forward, check_finite, unpack
from localssl.models import BlockEncoder
from localssl.rules import Group, Rule

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 12  # stop, dtype, channels_last, ndim, up to 8 sizes


class Pipeline(Parallel):
    """This rank's stage: which blocks and groups it owns, and its messages to the stages beside it."""

    def __init__(self, cluster: Cluster, stages: Sequence[int] | None) -> None:
        self.cluster = cluster
        self.rank, self.world = cluster.rank, cluster.world
        self.is_writer = self.reads_images = self.rank == 0
        self.asked = None if stages is None else list(stages)
        self.sizes: list[int] = []
        self._header: torch.Tensor | None = None

    # -- the split ---------------------------------------------------------------------------------
    def start(self, encoder: BlockEncoder, rule: Rule, sample: Callable[[], Any] | None = None) -> None:
        n = len(encoder)
        if self.world > n:
            raise ConfigError(f"--pipeline on {self.world} ranks needs >= {self.world} blocks; the encoder has {n}")
        if self.asked is not None:
            try:
                sizes = check_stages(self.asked, n, self.world)
            except ValueError as e:
                raise ConfigError(f"stages: {e}") from None
        else:  # rank 0 measures, every rank takes its split
            box = [balance([c.seconds for c in measure_blocks(encoder, rule, sample())], self.world)
                   if self.rank == 0 else None]
            with self.cluster.guard("sharing the measured split"):
                dist.broadcast_object_list(box, 0)
            sizes = box[0]
        self.sizes = sizes
        bounds = [sum(sizes[:r]) for r in range(self.world + 1)]
        self.block_owner = [r for r in range(self.world) for _ in range(sizes[r])]
        self.first, self.last = bounds[self.rank], bounds[self.rank + 1] - 1
        groups = rule.groups()
        # Each group's loss is computed (and its rule parameters owned) where its output block lives; a
        # group that starts one stage lower (LoCo's overlap) has its lower part there ("lower": its output
        # waits for the gradient the upper stage sends back) and its upper part here ("upper").
        self.group_owner, self.plan = [], []
        for g, group in enumerate(groups):
            owners = sorted({self.block_owner[b] for b in group.blocks})
            where = f"group {g + 1} trains blocks {[b + 1 for b in group.blocks]}, which stages {sizes} put on ranks"
            if len(owners) > 2:
                raise ConfigError(f"--pipeline: {where} {owners}; a group may span two stages at most: choose "
                                  "--stages with more blocks per stage")
            if len(owners) == 2 and rule.needs_top_context:
                raise ConfigError(f"--pipeline: {where} {owners}, and the rule reads the top context: choose "
                                  "--stages that keep every group in one stage")
            self.group_owner.append(self.block_owner[group.output])
            if self.rank in owners:
                part = Group(tuple(b for b in group.blocks if self.block_owner[b] == self.rank))
                kind = "own" if len(owners) == 1 else "upper" if self.rank == self.group_owner[g] else "lower"
                self.plan.append((g, kind, part))
        self.mine = [g for g, kind, _ in self.plan if kind != "lower"]
        self._owners(encoder, rule)

    def _owners(self, encoder: BlockEncoder, rule: Rule) -> None:
        """Which rank owns each parameter and buffer (the checkpoint takes every entry from its owner)."""
        owner: dict[int, int] = {}
        for b, block in enumerate(encoder.blocks):
            for t in [*block.parameters(), *block.buffers()]:
                owner[id(t)] = self.block_owner[b]
        for g in range(len(self.group_owner)):
            for p in rule.group_parameters(g):
                owner[id(p)] = self.group_owner[g]
        # A rule buffer (a head's BatchNorm statistics) belongs to the rank owning its module's parameters.
        for mod in rule.modules():
            ranks = {owner[id(p)] for p in mod.parameters() if id(p) in owner}
            if len(ranks) == 1:
                r = ranks.pop()
                for t in mod.buffers():
                    owner.setdefault(id(t), r)
        self._owner = owner
        self._keys = {
            "encoder": self._key_owners(encoder),
            "rule": self._key_owners(rule),
        }

    def _key_owners(self, module: torch.nn.Module) -> dict[str, int]:
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        return {k: self._owner.get(id(t), 0) for k, t in tensors.items()}

    # -- the hooks the trainer calls ---------------------------------------------------------------
    def step(self, step: Step) -> Step:
        if type(step) is not PlainStep:
            raise ConfigError(f"--pipeline runs plain steps; this run asks for {type(step).__name__} "
                              "(unset micro_batch; sequential schedules do not pipeline)")
        return PipelineStep(self)

    def any(self, flag: bool) -> bool:
        store = self.cluster.store
        if flag:
            store.set("stop", "1")  # a signal on any rank reaches rank 0 here
        if self.rank == 0:
            stop = flag or store.check(["stop"])
            if stop and self.world > 1:
                self._send_header(None, stop=True)
            return bool(stop)
        self._header = self._recv_header()
        stop = bool(self._header[0])
        if stop and self.rank < self.world - 1:
            self._send_header(None, stop=True)
        return stop

    def losses(self, losses: Losses) -> Losses:
        """Every stage's losses on every rank (an all_reduce, at log steps only: it waits for the last stage)."""
        vals = torch.zeros(2 * len(losses), dtype=torch.float64)
        for g, v in enumerate(losses):
            if v is not None:
                vals[g], vals[len(losses) + g] = float(v), 1.0
        vals = group_tensor(vals)
        with self.cluster.guard("collecting the stages' losses"):
            dist.all_reduce(vals)
        vals = vals.cpu()
        return [torch.tensor(vals[g].item()) if vals[len(losses) + g] else None for g in range(len(losses))]

    def state(self, encoder: BlockEncoder, rule: Rule, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The single-process checkpoint entries on rank 0: every entry from the rank that owns it."""
        full = {"encoder": encoder.state_dict(), "rule": rule.state_dict(), "optimizer": optimizer.state_dict()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        opt_owner = {i: self._owner.get(id(p), 0) for i, p in enumerate(params)}
        mine = {part: {k: v.cpu() for k, v in full[part].items() if self._keys[part].get(k, 0) == self.rank}
                for part in ("encoder", "rule")}
        mine["optimizer"] = {i: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                             for i, s in full["optimizer"]["state"].items() if opt_owner[i] == self.rank}
        got: list[Any] = [None] * self.world if self.rank == 0 else []
        with self.cluster.guard("gathering the stages' checkpoint entries"):
            dist.gather_object(mine, got if self.rank == 0 else None, dst=0)
        if self.rank != 0:
            return full
        state = dict(mine["optimizer"])  # rank 0's own: its copies of other stages' entries may be stale
        for part in got[1:]:
            for name in ("encoder", "rule"):
                full[name].update(part[name])
            state.update(part["optimizer"])
        full["optimizer"]["state"] = dict(sorted(state.items()))
        return full

    def barrier(self, what: str) -> None:
        with self.cluster.guard(what):
            dist.barrier()

    def failed(self, error: BaseException) -> None:
        self.cluster.failed(error)

    def close(self) -> None:
        self.cluster.close()

    # -- messages ----------------------------------------------------------------------------------
    def _send_header(self, t: torch.Tensor | None, stop: bool = False) -> None:
        with self.cluster.guard(f"sending to rank {self.rank + 1}"):
            dist.send(group_tensor(_header(t, stop)), self.rank + 1)

    def _recv_header(self) -> torch.Tensor:
        h = group_tensor(torch.zeros(_HEADER, dtype=torch.int64))
        with self.cluster.guard(f"receiving from rank {self.rank - 1}"):
            dist.recv(h, self.rank - 1)
        return h.cpu()

    def send(self, t: torch.Tensor) -> None:
        """The stage's output to the next rank: header, then the values (NCHW order; the header keeps the
        memory format, so the next stage computes on the layout one process would)."""
        self._send_header(t)
        with self.cluster.guard(f"sending an activation to rank {self.rank + 1}"):
            dist.send(t.detach().contiguous(), self.rank + 1)

    def recv(self, device: torch.device) -> torch.Tensor:
        """The previous stage's output for this step (its header came with `any`)."""
        h = self._header if self._header is not None else self._recv_header()
        self._header = None
        buf = _empty(h, device)
        with self.cluster.guard(f"receiving an activation from rank {self.rank - 1}"):
            dist.recv(buf, self.rank - 1)
        return _laid_out(buf, h)

    def send_grad(self, t: torch.Tensor) -> None:
        """The gradient of a split group's loss at this stage's input, back to the stage below."""
        with self.cluster.guard(f"sending a gradient to rank {self.rank - 1}"):
            dist.send(group_tensor(_header(t)), self.rank - 1)
            dist.send(t.contiguous(), self.rank - 1)

    def recv_grad(self, device: torch.device) -> torch.Tensor:
        """The gradient the stage above sends for this stage's output (a split group's lower part)."""
        with self.cluster.guard(f"receiving a gradient from rank {self.rank + 1}"):
            h = group_tensor(torch.zeros(_HEADER, dtype=torch.int64))
            dist.recv(h, self.rank + 1)
            h = h.cpu()
            buf = _empty(h, device)
            dist.recv(buf, self.rank + 1)
        return _laid_out(buf, h)

    def top(self, out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The top block's output of this step, from the last rank to every rank (DFB's context: the one
        message down the pipeline, synchronous: every stage waits for the last stage's forward)."""
        last = self.world - 1
        with self.cluster.guard(f"receiving the top block's output from rank {last}"):
            h = group_tensor(_header(out.detach() if self.rank == last else None))
            dist.broadcast(h, last)
            h = h.cpu()
            buf = out.detach().contiguous() if self.rank == last else _empty(h, device)
            dist.broadcast(buf, last)
        return _laid_out(buf, h)


def _header(t: torch.Tensor | None, stop: bool = False) -> torch.Tensor:
    """What the receiver of ``t`` needs to hold it: stop flag, dtype, memory format, shape."""
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[0] = int(stop)
    if t is not None:
        h[1] = _DTYPES.index(t.dtype)
        h[2] = int(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        h[3] = t.dim()
        h[4:4 + t.dim()] = torch.tensor(t.shape)
    return h


def _empty(h: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty(h[4:4 + int(h[3])].tolist(), dtype=_DTYPES[int(h[1])], device=device)


def _laid_out(buf: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The values as received, in the sender's memory format (the next block's kernels depend on it)."""
    return buf.contiguous(memory_format=torch.channels_last) if int(h[2]) else buf


class PipelineStep(Step):
    """This rank's stage of a `PlainStep`: its input from the previous rank (rank 0: the views), its groups'
    forward, losses and backward, its output on to the next rank right after the forward, its update."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def __call__(self, encoder, rule, optimizer, views, index=0, *, device=None, amp_dtype=None) -> Losses:
        p = self.pipe
        groups = rule.groups()
        dev = device or next(encoder.parameters()).device
        x = unpack(views, rule) if p.rank == 0 else p.recv(dev)
        ctx = _amp(x, device, amp_dtype)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        forward = _Forward([part for _, _, part in p.plan], x)
        forward.outputs = {p.first - 1: x}  # the stage's input stands where block first-1's output would
        losses: Losses = [None] * len(groups)
        waiting = []  # groups whose loss waits for the top block's output (DFB)
        lower = []  # lower parts of groups that end on the next stage: their outputs wait for its gradient
        sent = p.rank == p.world - 1
        for j, (g, kind, part) in enumerate(p.plan):
            with ctx():
                if kind == "upper":  # the input's gradient goes back down: a leaf that keeps it
                    leaf = x.detach().requires_grad_()
                    out = forward.run(encoder, rule, j, part, start=leaf)
                else:
                    out = forward.run(encoder, rule, j, part)
                if not sent and part.output == p.last:
                    p.send(out)  # the next stage starts while this one computes its losses and backward
                    sent = True
                if kind == "lower":
                    lower.append(out)
                    continue
                if rule.needs_top_context:
                    waiting.append((g, out))
                    continue
                loss = rule.loss(g, out, None)
            loss.backward()
            losses[g] = loss.detach()
            if kind == "upper":
                p.send_grad(leaf.grad)
            del out, loss
        for out in lower:  # in group order, as the stage above sends them
            out.backward(p.recv_grad(dev))
        del lower
        if rule.needs_top_context:
            # One process computes the top without a graph and before any update: the same values as the
            # last stage's forward of this step (blocks that add noise in handoff excepted).
            top = p.top(waiting[-1][1] if p.rank == p.world - 1 else None, dev)
            for g, out in waiting:
                with ctx():
                    loss = rule.loss(g, out, top)
                loss.backward()
                losses[g] = loss.detach()
            del waiting, out, loss
        if any(v is not None for v in losses):  # a stage of one block under LoCo computes no loss of its own
            check_finite(losses, groups)
        if optimizer is not None:
            optimizer.step()  # parameters of other stages have no gradient: the optimizer leaves them
        return losses


__all__ = ["Pipeline", "PipelineStep"]
