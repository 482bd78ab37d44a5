"""A rank of the distributed tests (tests/test_distributed.py starts 2-3 of these, or torchrun does).

    python tests/dist_worker.py grads RULE OUT      # one data-parallel step's gradients -> OUT/grads_RANK.pt
    python tests/dist_worker.py train CONFIG.json   # `train` with a check that every rank holds the same weights
    python tests/dist_worker.py contracts OUT       # every registered rule: data-parallel == one process
    python tests/dist_worker.py desync              # rank 1 lacks a gradient rank 0 has: GradSync refuses
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from localssl.config import TrainConfig
from localssl.engine import distributed as D
from localssl.engine.trainer import train

B, SIDE = 8, 16  # images of the whole batch, their side


def tiny(rule_name: str):
    """Encoder, rule and the whole batch's views in float64, the same in every process (seed 0)."""
    from localssl.builder import options_for
    from localssl.models import build_encoder
    from localssl.rules import build_rule

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    enc = build_encoder("vgg6", 1 / 16, 3, None, image_size=SIDE)
    shapes = enc.feature_shapes((3, SIDE, SIDE))
    rule = build_rule(rule_name, shapes, options_for(rule_name, {"proj_dim": 16}), grids=[1] * len(shapes))
    views = torch.randn(2 * B, 3, SIDE, SIDE)
    return enc, rule, views


def grads(rule_name: str, out: str) -> None:
    enc, rule, views = tiny(rule_name)
    cluster = D.Cluster(30, torch.device("cpu"))
    r, n = cluster.rank, cluster.world
    b = B // n
    mine = torch.cat([views[r * b:(r + 1) * b], views[B + r * b:B + (r + 1) * b]])  # this rank's two halves
    losses = D.DataParallelStep(cluster)(enc, rule, None, mine)
    named = {f"enc.{k}": p for k, p in enc.named_parameters()} | {f"rule.{k}": p for k, p in rule.named_parameters()}
    torch.save({"losses": torch.stack(losses), "grads": {k: p.grad for k, p in named.items() if p.grad is not None}},
               os.path.join(out, f"grads_{r}.pt"))
    cluster.close()


def contracts(out: str) -> None:
    """For every registered rule (test_rules' VGG case and views, in float64): this rank's data-parallel
    gradients equal the single-process gradients of the whole batch, which this rank also computes."""
    import copy

    import test_rules as T

    from localssl.builder import options_for
    from localssl.data.augment import ViewBatch
    from localssl.engine.step import PlainStep
    from localssl.rules import RULES, build_rule, rule_options

    torch.set_default_dtype(torch.float64)
    cluster = D.Cluster(60, torch.device("cpu"))
    r, n = cluster.rank, cluster.world
    failures, own_step = {}, []
    for name in RULES.names():
        if RULES.get(name).factory([(4,)], rule_options(name), [1]).schedule != "simultaneous":
            own_step.append(name)  # a step of its own (inference, sequential): refused data-parallel, by test
            continue
        torch.manual_seed(0)
        enc, in_shape, grids = T.CASES[T.supported_case(name, "vgg")]()  # the patch rules need finer maps
        rule = build_rule(name, enc.feature_shapes(in_shape), options_for(name, {"proj_dim": 16}), grids=grids)
        views = T.make_views(in_shape, 0, dtype=torch.float64, layout=rule.layout)
        x = views.x if isinstance(views, ViewBatch) else views
        lay = rule.layout
        if lay.stacking in ("rows", "pairs"):  # pairs: [positives; negatives], split as two halves
            b = x.shape[0] // lay.n // n
            mine = torch.cat([v[r * b:(r + 1) * b] for v in x.chunk(lay.n)])
        else:
            b = x.shape[0] // n
            mine = x[r * b:(r + 1) * b]
        mine = ViewBatch(mine, lay) if isinstance(views, ViewBatch) else mine
        ref_enc, ref_rule = copy.deepcopy(enc), copy.deepcopy(rule)
        T.same_draws()  # rules that draw negatives or updates draw the same on both sides
        ref_losses = PlainStep()(ref_enc, ref_rule, None, views)
        T.same_draws()
        losses = D.DataParallelStep(cluster)(enc, rule, None, mine)
        got = dict(enc.named_parameters()) | {f"rule.{k}": p for k, p in rule.named_parameters()}
        ref = dict(ref_enc.named_parameters()) | {f"rule.{k}": p for k, p in ref_rule.named_parameters()}
        # float64 summed in another order (the ranks' halves): errors of rounding size against the tensor's
        # scale (an entry whose terms cancel, a bias under Barlow's standardisation, keeps absolute noise).
        bad = [k for k in ref if (ref[k].grad is None) != (got[k].grad is None) or (ref[k].grad is not None and
               float((got[k].grad - ref[k].grad).abs().max()) > 1e-9 * float(ref[k].grad.abs().max()) + 1e-15)]
        if not torch.allclose(torch.stack(losses), torch.stack(ref_losses), rtol=1e-12, atol=0):
            bad.append("loss")
        if bad:
            failures[name] = [(k, float((got[k].grad - ref[k].grad).abs().max()), float(ref[k].grad.abs().max()))
                              if k in ref and got[k].grad is not None and ref[k].grad is not None else k
                              for k in bad[:5]]
    with open(os.path.join(out, f"contracts_{r}.json"), "w") as fh:
        json.dump({"rules": RULES.names(), "own_step": own_step, "failures": failures}, fh)
    cluster.close()


def desync() -> None:
    """Group 1's gradients on both ranks, but rank 1 has none for the first block's bias: both ranks must
    stop with the parameter's name (DDP's unused-parameter handling can desync silently, #128949)."""
    enc, rule, _ = tiny("clapp++")
    cluster = D.Cluster(30, torch.device("cpu"))
    sync = D.GradSync(cluster, enc, rule)
    for p in sync.buckets[0]:
        p.grad = torch.ones_like(p)
    if cluster.rank == 1:
        enc.blocks[0][0].bias.grad = None
    sync.after_group(0)
    try:
        sync.finish()
    except D.RankLost as e:
        print(f"refused: {e}")
        sys.exit(3)
    finally:
        cluster.close()


def train_checked(config: str) -> None:
    """`train`, checking after every step that the ranks' weights are bit-identical (rank 0's broadcast)."""
    spec = json.load(open(config))
    kill = spec.pop("kill", None)  # [rank, step, signal]: that rank gets the signal (9: dies, 19: hangs) then
    if kill is not None and spec.get("pipeline"):
        from localssl.engine.pipeline import PipelineStep

        real_pipe = PipelineStep.__call__

        def doomed(self, encoder, rule, optimizer, views, index=0, **kw):
            if self.pipe.rank == kill[0] and index == kill[1]:
                os.kill(os.getpid(), kill[2])
            return real_pipe(self, encoder, rule, optimizer, views, index, **kw)

        PipelineStep.__call__ = doomed
    real = D.DataParallelStep.__call__

    def checked(self, encoder, rule, optimizer, views, index=0, **kw):
        if kill is not None and self.cluster.rank == kill[0] and index == kill[1]:
            os.kill(os.getpid(), kill[2])
        losses = real(self, encoder, rule, optimizer, views, index, **kw)
        for t in [*encoder.state_dict().values(), *rule.state_dict().values()]:
            ref = t.clone()
            dist.broadcast(ref, 0)
            if not torch.equal(ref, t):
                raise AssertionError(f"rank {self.cluster.rank} differs from rank 0 after step {index + 1}")
        return losses

    D.DataParallelStep.__call__ = checked
    train(TrainConfig(**spec), resume=os.environ.get("RESUME") == "1")


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    {"grads": lambda: grads(sys.argv[2], sys.argv[3]), "train": lambda: train_checked(sys.argv[2]),
     "contracts": lambda: contracts(sys.argv[2]), "desync": desync}[sys.argv[1]]()
