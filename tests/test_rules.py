"""Contract tests of the learning rules (``localssl.rules``) and of ``train_step``.

Registry-wide (timm / solo-learn style): every test marked ``RULE_NAMES`` runs
on every rule in ``RULES``, on two tiny encoders:

- ``vgg``: VGG-6 at width 1/32 (4..32 channels) on 16 px, grids 8-4-2-2-2-1,
  which exercises pooling kernels > 1, grid == map size (flatten) and global
  pooling;
- ``tail``: a 3-block net cut from one ``nn.Sequential`` at 8 px whose last
  block is ``Flatten + Linear`` (1-D features);
- ``resnet18``: ResNet-18 at width 1/16 (4..32 channels) on 32 px, CIFAR stem,
  cut into its 4 stages (maps 32, 16, 8, 4; grids 8-4-2-1), with BatchNorm
  and residual units inside the blocks;
- ``resnet50``: ResNet-50 at width 1/16 (bottleneck outputs 16..128 channels)
  on 32 px with the ImageNet stem (maps 8, 4, 2, 1; grids 4-2-1-1);
- ``resnet18-units``: ResNet-18 cut into its 8 residual units, at 16 px;
- ``patched``: a 3-block conv net (16, 32 + max-pool, 32 channels) run per
  patch (`models.patchify`: 8 px patches at stride 4 of 16 px images, a 3x3
  grid; mosaics 24, 12, 12; grids 3), the patch rules' kind of encoder
  (METHODS 5.3). Rules that read one view per image get smooth images
  (`make_views`): a patch of white noise predicts nothing of another.
The micro-batched step refuses BatchNorm (its rows are coupled), so its tests
run on the encoders without it (``ROW_WISE_CASES``). A rule whose loss is not
defined on a case's shapes says why (`Rule.unsupported`: the patch rules need
rows of patch codes below a context row, which a 1x1 map or a vector lacks);
`setup` skips that case for that rule with the rule's reason. Rules that draw
random numbers in their loss (the patch rules' negatives and CLAPP's either-or
update) draw them from torch's global generator: tests that compare two
computations of one step seed it the same before each (`same_draws`).

What is checked (METHODS 2, docs/architecture.md "Rules"):
(a) gradient routing: block k's parameters (and the rule's parameters of
    group k) get gradient from loss k and from no other loss; BP rules reach
    every encoder parameter; per-group backward == the reference code's
    "sum all local losses, one backward" (gradients and AdamW updates); BP is
    the same machinery with one group and nothing detached; one step changes
    every trainable parameter and keeps frozen ones; the loss goes down.
(b) autograd == the explicit three-factor rule of METHODS 2 for one layer
    (linear and conv via unfold, pooling kernel 1, k > 1, global), for every f.
(c) BP-InfoNCE == one-direction cross-entropy on hand-made cosine logits == a Python loop
    (the reference's loss, METHODS 2.3); the loss functions themselves: tests/test_losses.py.
"""
from __future__ import annotations

import copy
import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localssl.builder import options_for
from localssl.data.augment import ViewBatch, ViewLayout
from localssl.data.pairs import pair_rows
from localssl.engine.optim import LARS
from localssl.engine.step import unpack
from localssl.engine.trainer import NonFiniteLossError, build_optimizer, train_step
from localssl.models import build_encoder, patchify, split_into_blocks
from localssl.rules import (
    CONTRASTIVE_F,
    FEEDBACK_KINDS,
    RULES,
    Feedback,
    Group,
    bp_counterpart,
    build_rule,
    contrastive_loss,
    spatial_pool,
    swap_views,
)

RULE_NAMES = RULES.names()
LOCAL_RULES = [n for n in RULE_NAMES if build_rule(n, [(4,)], {}, grids=[1]).local]
BP_RULES = [n for n in RULE_NAMES if n not in LOCAL_RULES]
# Local rules whose groups share no block (all but LoCo with overlap > 0).
DISJOINT_RULES = [n for n in LOCAL_RULES
                  if len({b for g in build_rule(n, [(4,)] * 3, {}, grids=[1] * 3).groups() for b in g.blocks})
                  == sum(len(g.blocks) for g in build_rule(n, [(4,)] * 3, {}, grids=[1] * 3).groups())]
# Rules whose groups each train on a loss of their own, back-propagated inside the group (Rule.group_losses):
# the per-group contracts (routing by isolating one loss, per-group == summed backward, one optimizer step ==
# one per group, micro-batching) are about that. Predictive coding's blocks learn from prediction errors that
# its inference loop settles instead; tests/test_pc.py checks the local equivalents on its step.
GROUP_LOSS_RULES = [n for n in RULE_NAMES if build_rule(n, [(4,)], {}, grids=[1]).group_losses]
# Rules whose loss has a feedback matrix B (the CLAPP++ family; the others' heads are projections).
FEEDBACK_RULES = [n for n in RULE_NAMES if "feedback" in {f.name for f in fields(RULES.get(n).options)}]
N_IMAGES = 4  # B images -> 2B = 8 stacked views


# ------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a shared
    2-core machine they made this file ~8x slower (73 s against 9 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _vgg():
    enc = build_encoder("vgg6", width=1 / 32, in_channels=3)  # 4, 8, 8, 16, 32, 32 channels
    # 16 px -> maps 16, 8, 8, 4, 2, 1: kernels 2, 2, 4, 2, 1 (flatten), 1 (global).
    return enc, (3, 16, 16), [8, 4, 2, 2, 2, 1]


def _tail():
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 10), nn.ReLU(),
    )
    return split_into_blocks(seq, [2, 5], name="tail"), (1, 8, 8), [4, 2, 1]


def _resnet(name: str, size: int, grids: list[int], **options):
    def case():
        return build_encoder(name, width=1 / 16, in_channels=3, options=options), (3, size, size), grids
    return case


def _patched():
    seq = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
    )
    return patchify(split_into_blocks(seq, [2, 5], name="patched"), 8, 4, 3), (3, 16, 16), [3, 3, 3]


CASES = {
    "vgg": _vgg,
    "tail": _tail,
    "resnet18": _resnet("resnet18", 32, [8, 4, 2, 1], stem="cifar"),
    "resnet50": _resnet("resnet50", 32, [4, 2, 1, 1], stem="imagenet"),
    # maps 16, 16, 8, 8, 4, 4, 2, 2
    "resnet18-units": _resnet("resnet18", 16, [4, 4, 2, 2, 2, 1, 1, 1], stem="cifar", cut="units"),
    "patched": _patched,
}
#: The cases whose blocks map every row on its own (no BatchNorm): what micro-batching needs.
ROW_WISE_CASES = ["vgg", "tail", "patched"]


def make_views(in_shape, seed: int = 0, n: int = N_IMAGES, dtype=torch.float32,
               layout: ViewLayout | None = None) -> torch.Tensor | ViewBatch:
    """``layout.n`` noisy views of the same n random images, stacked [view 1; view 2; ...] along the rows
    (a plain tensor for the default two-row layout) or the channels (a `ViewBatch`), or as SCFF's
    [positive pairs; negative pairs] rows (`localssl.data.pairs.pair_rows`), as the rule reads them."""
    layout = layout or ViewLayout()
    g = torch.Generator().manual_seed(1000 + seed)
    base = torch.randn(n, *in_shape, generator=g, dtype=dtype)
    if layout.n == 1 and len(in_shape) == 3:
        # One view per image: what a rule learns is one part of an image from another (the patch rules), so
        # the images are smooth (noise at 1/8 of the side, upsampled): white noise has no such structure.
        low = torch.randn(n, in_shape[0], *(max(1, s // 8) for s in in_shape[1:]), generator=g, dtype=dtype)
        base = F.interpolate(low, size=tuple(in_shape[1:]), mode="bilinear", align_corners=False)
    views = [base + 0.3 * torch.randn(base.shape, generator=g, dtype=dtype) for _ in range(layout.n)]
    if layout == ViewLayout():
        return torch.cat(views)
    if layout.stacking == "pairs":
        return ViewBatch(pair_rows(views[0], views[1], shift=1), layout)
    return ViewBatch(torch.cat(views, dim=0 if layout.stacking == "rows" else 1), layout)


def as_double(views: torch.Tensor | ViewBatch) -> torch.Tensor | ViewBatch:
    """The batch in float64, in its layout."""
    return ViewBatch(views.x.double(), views.layout) if isinstance(views, ViewBatch) else views.double()


def setup(rule_name: str, case: str = "vgg", seed: int = 0, **opts):
    torch.manual_seed(seed)
    enc, in_shape, grids = CASES[case]()
    shapes = enc.feature_shapes(in_shape)
    # Small heads; each rule takes the options it has (a spatial rule pools to the case's grids, others ignore them).
    rule = build_rule(rule_name, shapes, options_for(rule_name, {"proj_dim": 16, **opts}), grids=grids)
    reason = rule.unsupported()
    if reason is not None:  # `supported_pairs` leaves these out: a test that gets here picked its case wrongly
        raise AssertionError(f"{rule_name} on case {case}: {reason} (declared by Rule.unsupported)")
    return enc, rule, make_views(in_shape, seed, layout=rule.layout)


def _supported(rule_name: str, case: str) -> bool:
    enc, in_shape, grids = CASES[case]()
    rule = build_rule(rule_name, enc.feature_shapes(in_shape), options_for(rule_name, {}), grids=grids)
    return rule.unsupported() is None


def supported_pairs(names, cases) -> list[tuple[str, str]]:
    """Every (rule, case) whose loss is defined on the case's shapes (`Rule.unsupported`): the patch rules
    need rows of patch codes below a context row, which the small encoders' coarse maps do not have. Left
    out at collection rather than skipped, so that CI (where a skip fails) runs every pair it lists; each
    rule keeps at least one case (`test_every_rule_has_a_contract_case`)."""
    return [(n, c) for n in names for c in cases if _supported(n, c)]


def supported_case(rule_name: str, preferred: str) -> str:
    """``preferred`` if the rule's loss is defined on it (`Rule.unsupported`), else the first case that is."""
    for case in [preferred, *CASES]:
        if _supported(rule_name, case):
            return case
    raise AssertionError(f"no contract case fits {rule_name}")


def same_draws(seed: int = 1234) -> None:
    """Seed torch's generator: the two sides of a comparison draw the same negatives / updates."""
    torch.manual_seed(seed)


def named_trainable(enc: nn.Module, rule: nn.Module) -> dict[str, nn.Parameter]:
    out = {f"enc.{n}": p for n, p in enc.named_parameters() if p.requires_grad}
    out.update({f"rule.{n}": p for n, p in rule.named_parameters() if p.requires_grad})
    return out


def names_of(params, named: dict[str, nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in named.items() if id(p) in ids}


def zero_grads(named: dict[str, nn.Parameter]) -> None:
    for p in named.values():
        p.grad = None


def with_grad(named: dict[str, nn.Parameter]) -> set[str]:
    return {n for n, p in named.items() if p.grad is not None and bool((p.grad != 0).any())}


def paper_backward(enc, rule, views) -> list[torch.Tensor]:
    """The reference code's way: every block input detached, sum of all losses, one backward."""
    views = unpack(views, rule)
    top = None
    if rule.needs_top_context:
        with torch.no_grad():
            top = enc(views)[-1]
    losses, outs = [], {-1: views}
    for g, group in enumerate(rule.groups()):
        h = outs[group.input].detach()
        for b in group.blocks:  # (overlapping groups: a block shared with the group above runs again here)
            h = rule.handoff(b, enc.blocks[b](h))
            outs.setdefault(b, h)
        losses.append(rule.loss(g, h, top))
    torch.stack(losses).sum().backward()
    return [loss.detach() for loss in losses]


# --------------------------------------------------------- registry contracts


def test_every_rule_has_a_contract_case():
    # A rule whose loss no case supports would drop out of every contract unnoticed.
    assert {n for n, _ in supported_pairs(RULE_NAMES, CASES)} == set(RULE_NAMES)
    assert {n for n, _ in supported_pairs(RULE_NAMES, ["vgg"])} >= {"clapp++", "bp-infonce", "scff", "ff", "dfa"}


def test_registry_names_and_counterparts():
    assert {"clapp++", "clapp++global", "clapp++dfb", "clapp++both", "bp-clapp++", "bp-infonce"} <= set(RULE_NAMES)
    assert set(BP_RULES) >= {"bp-clapp++", "bp-infonce"}
    counterparts = {n: bp_counterpart(n) for n in RULE_NAMES if bp_counterpart(n) is not None}
    assert set(counterparts) >= {"clapp++", "clapp++global", "clapp++dfb", "clapp++both"}
    for local, bp in counterparts.items():
        assert local in LOCAL_RULES and bp in BP_RULES


def test_only_inference_rules_opt_out_of_the_per_group_contracts():
    """A rule without group losses (Rule.group_losses False) trains through the inference step, which
    tests/test_pc.py checks instead; no other rule may leave the per-group contracts."""
    for name in sorted(set(RULE_NAMES) - set(GROUP_LOSS_RULES)):
        rule = build_rule(name, [(4,)], {}, grids=[1])
        assert rule.schedule == "inference" and rule.inference is not None, name


def test_unknown_rule_name_lists_valid_names():
    with pytest.raises(KeyError) as e:
        build_rule("clap++", [(4, 8, 8)], {}, grids=[1])
    for name in RULE_NAMES:
        assert name in str(e.value)


@pytest.mark.parametrize("name, case", supported_pairs(RULE_NAMES, CASES))
def test_groups_partition_blocks(name, case):
    """Local rules: [[0], [1], ...] (LoCo: [[0, 1], [1, 2], ..., [L-1]]); BP rules: one group [0..L-1]
    (same machinery, nothing cut)."""
    enc, rule, _ = setup(name, case)
    n = len(enc)
    assert rule.num_blocks == n
    if rule.local:
        overlap = getattr(rule, "overlap", 0)
        assert rule.groups() == [Group(tuple(range(k, min(k + overlap, n - 1) + 1))) for k in range(n)]
    else:
        assert rule.groups() == [Group(tuple(range(n)))]


@pytest.mark.parametrize("name, case", supported_pairs(RULE_NAMES, CASES))
def test_parameter_ownership(name, case):
    """Every rule parameter is owned by exactly one group, and the optimizer holds every trainable parameter once."""
    enc, rule, _ = setup(name, case)
    named = named_trainable(enc, rule)
    owned = [names_of(rule.group_parameters(g), named) for g in range(len(rule.groups()))]
    rule_params = {n for n in named if n.startswith("rule.")}
    assert set().union(*owned) == rule_params
    assert sum(len(o) for o in owned) == len(rule_params), "a rule parameter is owned by two groups"
    assert all(p.requires_grad for g in range(len(rule.groups())) for p in rule.group_parameters(g))
    opt = build_optimizer(enc, rule, lr=1e-3, weight_decay=0.0)
    in_opt = [id(p) for grp in opt.param_groups for p in grp["params"]]
    assert len(in_opt) == len(set(in_opt)) == len(named)
    assert set(in_opt) == {id(p) for p in named.values()}


# ------------------------------------------------------ (a) gradient routing


@pytest.mark.parametrize("name, case, micro_batch", [(n, c, None) for n, c in supported_pairs(GROUP_LOSS_RULES, CASES)]
                         + [(n, c, 3) for n, c in supported_pairs(GROUP_LOSS_RULES, ROW_WISE_CASES)])
def test_gradient_routing(name, case, micro_batch, monkeypatch):
    """Loss k reaches block k's parameters and group k's rule parameters, and nothing else.

    Each group's loss is isolated by running ``train_step`` with every other
    group's loss multiplied by 0 (the same machinery, backward one group at a
    time); the parameters that then hold a non-zero gradient are recorded.
    Also for the micro-batched step (chunks of 3 of the 8 views).
    """
    enc, rule, views = setup(name, case)
    named = named_trainable(enc, rule)
    real_objective = rule.objective
    groups = rule.groups()
    for k, group in enumerate(groups):
        def only_k(g, z, context=None, k=k):
            return real_objective(g, z, context) * (1.0 if g == k else 0.0)

        monkeypatch.setattr(rule, "objective", only_k)
        zero_grads(named)
        train_step(enc, rule, None, views, micro_batch=micro_batch)
        got = with_grad(named)
        want = names_of([p for b in group.blocks for p in enc.blocks[b].parameters()], named)
        want |= names_of(rule.group_parameters(k), named)
        assert got <= want, f"loss {k} leaks into {sorted(got - want)}"
        # Every weight matrix and rule parameter of the group is reached. (A bias may
        # legitimately get exactly 0: see test_bias_gradient_vanishes_when_all_hinge_terms_are_active.)
        must = {n for n in want if n.startswith("rule.") or named[n].dim() > 1}
        assert must <= got, f"loss {k} does not reach {sorted(must - got)}"
        if not rule.local:
            # End-to-end: the one loss reaches every encoder weight.
            assert {n for n in named if n.startswith("enc.") and named[n].dim() > 1} <= got


def test_routing_probe_sees_a_missing_detach():
    """Negative control: without the cut, loss 2 would reach blocks 0 and 1 (so the probe above can fail)."""
    enc, rule, views = setup("clapp++", "vgg")
    named = named_trainable(enc, rule)
    rule.loss(2, enc(views)[2]).backward()
    got = with_grad(named)
    assert {"enc.blocks.0.0.weight", "enc.blocks.1.0.weight", "enc.blocks.2.0.weight"} <= got
    assert "enc.blocks.3.0.weight" not in got


@pytest.mark.parametrize("name", [n for n in LOCAL_RULES if n in GROUP_LOSS_RULES])
def test_detached_input_reaches_no_previous_block(name):
    """Group k run on the detached output of the block below it: that block gets no gradient, the group's do."""
    enc, rule, views = setup(name, supported_case(name, "vgg"))
    x = unpack(views, rule)
    top = enc(x)[-1].detach() if rule.needs_top_context else None
    outs = enc(x)
    for k, group in enumerate(rule.groups()):
        if group.input < 0:
            continue
        for p in enc.parameters():
            p.grad = None
        out = enc.run_blocks(outs[group.input].detach(), group.blocks)
        rule.loss(k, out, top).backward(retain_graph=True)
        assert all(p.grad is None for b in range(group.input + 1) for p in enc.blocks[b].parameters())
        assert all(p.grad is not None for b in group.blocks for p in enc.blocks[b].parameters())


@pytest.mark.parametrize("name, case", supported_pairs([n for n in LOCAL_RULES if n in GROUP_LOSS_RULES], CASES))
def test_per_group_backward_equals_summed_backward(name, case):
    """train_step's per-group backward gives the reference code's gradients (sum of losses, one backward)."""
    enc, rule, views = setup(name, case)
    named = named_trainable(enc, rule)
    zero_grads(named)
    same_draws()
    losses = train_step(enc, rule, None, views)
    per_group = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    zero_grads(named)
    same_draws()
    paper_losses = paper_backward(enc, rule, views)
    summed = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    assert per_group.keys() == summed.keys() == named.keys()
    for n in named:
        torch.testing.assert_close(per_group[n], summed[n], rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(torch.stack(losses), torch.stack(paper_losses), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", [n for n in LOCAL_RULES if n in GROUP_LOSS_RULES])
def test_block_by_block_adamw_equals_one_adamw_on_summed_loss(name):
    """Three block-by-block steps (train_step) == AdamW on the reference's summed loss (float64).

    Like with like: the reference side uses the same AdamW implementation as
    the trainer (fused or not). Fused and for-each AdamW round differently,
    and Adam's m / sqrt(v) amplifies that wherever a gradient is near zero,
    by an amount that depends on the CPU's kernels (3.7e-12 on one AMD
    EPYC). With the same implementation, the only difference left is the
    gradient, per-group backward vs one backward of the summed loss. Each
    parameter's gradient comes from its own loss either way, so it is the
    same sum: equal to float64 rounding, which the tolerance allows for.
    """
    enc, rule, views = setup(name, supported_case(name, "tail"), b_l2=1e-3)
    enc, rule, views = enc.double(), rule.double(), as_double(views)
    enc_b, rule_b = copy.deepcopy(enc), copy.deepcopy(rule)
    opt = build_optimizer(enc, rule, lr=1e-2, weight_decay=1e-2)
    named_b = named_trainable(enc_b, rule_b)
    opt_b = torch.optim.AdamW(list(named_b.values()), lr=1e-2, weight_decay=1e-2, fused=opt.defaults["fused"],
                              foreach=opt.defaults["foreach"])
    for i in range(3):
        same_draws(i)
        train_step(enc, rule, opt, views)
        opt_b.zero_grad(set_to_none=True)
        same_draws(i)
        paper_backward(enc_b, rule_b, views)
        opt_b.step()
    named_a = named_trainable(enc, rule)
    for n in named_a:
        # float64: a few hundred ulps of a parameter of size <= 1, after 3 steps of size <= lr.
        torch.testing.assert_close(named_a[n], named_b[n], rtol=1e-12, atol=1e-13, msg=n)


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
@pytest.mark.parametrize("name", [n for n in DISJOINT_RULES if n in GROUP_LOSS_RULES])
def test_one_step_at_the_end_equals_a_step_after_every_group(name, optimizer):
    """train_step's single optimizer step at the end == one optimizer per group, stepped right after its backward.

    Bitwise: AdamW is element-wise, LARS's trust ratio reads one tensor
    (which one group owns), and no group reads a parameter that
    another group updates within the step. (Not so for overlapping groups,
    LoCo: a block shared by two losses would move between them.) This is what lets the trainer
    make one (fused) optimizer call per step instead of one per group.
    """
    enc, rule, views = setup(name, supported_case(name, "vgg"), b_l2=1e-3)
    enc_b, rule_b = copy.deepcopy(enc), copy.deepcopy(rule)
    opt = build_optimizer(enc, rule, lr=1e-2, weight_decay=1e-2, optimizer=optimizer)
    per_group = []
    for g, group in enumerate(rule_b.groups()):
        params = [p for k in group.blocks for p in enc_b.blocks[k].parameters()] + rule_b.group_parameters(g)
        per_group.append(torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2, fused=True) if optimizer == "adamw"
                         else LARS(params, lr=1e-2, weight_decay=1e-2))
    assert optimizer == "lars" or opt.defaults["fused"]
    x = unpack(views, rule)
    for i in range(3):
        same_draws(i)
        train_step(enc, rule, opt, views)
        same_draws(i)
        top = None
        if rule_b.needs_top_context:
            with torch.no_grad():
                top = enc_b.run_blocks(x, range(len(enc_b)))
        h = x
        for g, group in enumerate(rule_b.groups()):
            per_group[g].zero_grad(set_to_none=True)
            out = enc_b.run_blocks(h.detach(), group.blocks)
            rule_b.loss(g, out, top).backward()
            per_group[g].step()
            h = out.detach()
    a, b = named_trainable(enc, rule), named_trainable(enc_b, rule_b)
    for n in a:
        assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("name, case", supported_pairs(BP_RULES, CASES))
def test_bp_is_one_group_with_nothing_detached(name, case):
    """End-to-end BP through train_step == loss on the plain forward, backprop through every block."""
    enc, rule, views = setup(name, case)
    named = named_trainable(enc, rule)
    assert rule.groups() == [Group(tuple(range(len(enc))))]
    zero_grads(named)
    same_draws()
    train_step(enc, rule, None, views)
    a = {n: p.grad.clone() for n, p in named.items()}
    zero_grads(named)
    same_draws()
    rule.loss(0, enc(unpack(views, rule))[-1]).backward()
    for n, p in named.items():
        torch.testing.assert_close(a[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", [n for n in RULE_NAMES if "dfb" in n or "both" in n])
def test_top_context_is_the_no_grad_top_output(name, monkeypatch):
    enc, rule, views = setup(name, "tail")
    assert rule.needs_top_context
    seen = []
    real_loss = rule.loss

    def spy(g, h, top=None):
        seen.append(top)
        return real_loss(g, h, top)

    monkeypatch.setattr(rule, "loss", spy)
    train_step(enc, rule, None, views)
    want = enc(unpack(views, rule))[-1].detach()
    assert len(seen) == len(enc)
    for top in seen:
        assert top is not None and not top.requires_grad
        torch.testing.assert_close(top, want, rtol=0, atol=0)


# ------------------------------------------------------ micro-batching inside a step


@pytest.mark.parametrize("name, case", supported_pairs(GROUP_LOSS_RULES, ROW_WISE_CASES))
@pytest.mark.parametrize("micro_batch", [1, 3, 4])
def test_micro_batched_step_gives_the_plain_gradients(name, case, micro_batch):
    """Chunked recompute (METHODS 2.2b) == the plain step, every parameter, float64 exactly.

    Chunks of 1, 3 (uneven: 3+3+2) and 4 (one view of each image per chunk,
    so no chunk holds a positive pair) of the 8 views.
    """
    enc, rule, views = setup(name, case)
    enc, rule, views = enc.double(), rule.double(), as_double(views)
    named = named_trainable(enc, rule)
    zero_grads(named)
    same_draws()
    plain = torch.stack(train_step(enc, rule, None, views))
    want = {n: p.grad.clone() for n, p in named.items()}
    zero_grads(named)
    same_draws()
    chunked = torch.stack(train_step(enc, rule, None, views, micro_batch=micro_batch))
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=0)
    # Chunking reorders float64 sums: an entry that is a cancellation (a bias in front of the Barlow
    # Twins head's standardisation gets ~0 from terms of order 1e3) is exact only up to the scale of its terms.
    atol = 1e-13 * max(1.0, max(float(g.abs().max()) for g in want.values()))
    for n, p in named.items():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=atol, msg=n)


@pytest.mark.parametrize("name", ["clapp++", "bp-infonce"])
def test_micro_batched_adamw_steps_match_the_plain_ones(name):
    """Three AdamW steps, plain vs micro-batched: the optimizer steps on the same gradients."""
    enc, rule, views = setup(name, "vgg")
    enc, rule, views = enc.double(), rule.double(), as_double(views)
    enc_b, rule_b = copy.deepcopy(enc), copy.deepcopy(rule)
    opt, opt_b = build_optimizer(enc, rule, 1e-2, 1e-2), build_optimizer(enc_b, rule_b, 1e-2, 1e-2)
    for _ in range(3):
        train_step(enc, rule, opt, views)
        train_step(enc_b, rule_b, opt_b, views, micro_batch=3)
    a, b = named_trainable(enc, rule), named_trainable(enc_b, rule_b)
    for n in a:
        # AdamW divides by sqrt(v): gradient entries near 0 turn 1e-15 rounding into ~1e-11.
        torch.testing.assert_close(b[n], a[n], rtol=1e-9, atol=1e-10, msg=n)


def test_micro_batching_lowers_the_saved_activations():
    """Peak bytes autograd holds: one chunk's worth, not the batch's (counted with saved-tensor hooks)."""
    from localssl.reports.bench import SavedBytesTracker

    torch.manual_seed(0)
    enc = build_encoder("vgg6", width=1 / 8, in_channels=3)
    rule = build_rule("clapp++global", enc.feature_shapes((3, 32, 32)), {})
    views = make_views((3, 32, 32), n=16)
    params = list(enc.parameters()) + list(rule.parameters())
    peaks = {}
    for mb in (None, 8):
        tr = SavedBytesTracker(params)
        with tr:
            train_step(enc, rule, None, views, micro_batch=mb)
        peaks[mb] = tr.peak_bytes
        assert tr.live_bytes == 0
    # 8 of 32 views: a quarter of the activations, plus the losses' (small) pooled inputs.
    assert peaks[8] < 0.3 * peaks[None], peaks


def test_micro_batching_refuses_batchnorm():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    enc = split_into_blocks(seq, [3], name="bn")
    rule = build_rule("clapp++global", enc.feature_shapes((3, 8, 8)), {})
    views = make_views((3, 8, 8))
    with pytest.raises(ValueError, match="BatchNorm"):
        train_step(enc, rule, None, views, micro_batch=2)
    train_step(enc, rule, None, views)  # the plain step is fine


# ------------------------------------------------------ (a) training smoke tests


@pytest.mark.parametrize("name, case", supported_pairs(RULE_NAMES, CASES))
def test_one_step_changes_every_trainable_parameter(name, case):
    """One AdamW step: finite losses, every trainable parameter moves, frozen ones do not.

    f = softplus: with the hinge at init every term is active and the loss is
    then blind to a common shift of z, so a bias may get exactly zero gradient
    (test_bias_gradient_vanishes_when_all_hinge_terms_are_active); the hinge
    is covered by the weight-level test below.
    """
    enc, rule, views = setup(name, case, f="softplus")
    named = named_trainable(enc, rule)
    frozen = {n: p.detach().clone() for n, p in rule.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    losses = train_step(enc, rule, build_optimizer(enc, rule, lr=1e-3, weight_decay=0.0), views)
    assert len(losses) == len(rule.groups())
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in losses)
    for n, p in named.items():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, before[n]), f"{n} did not change"
    for n, p in rule.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n])


@pytest.mark.parametrize("name, case", supported_pairs(RULE_NAMES, CASES))
def test_one_hinge_step_changes_every_weight(name, case):
    enc, rule, views = setup(name, case)
    named = named_trainable(enc, rule)
    before = {n: p.detach().clone() for n, p in named.items()}
    losses = train_step(enc, rule, build_optimizer(enc, rule, lr=1e-3, weight_decay=0.0), views)
    assert all(torch.isfinite(v) for v in losses)
    for n, p in named.items():
        assert torch.isfinite(p).all(), n
        if p.dim() > 1 or n.startswith("rule."):
            assert not torch.equal(p, before[n]), f"{n} did not change"


def test_bias_gradient_vanishes_when_all_hinge_terms_are_active():
    """Why the hinge smoke test exempts biases: an exact consequence of METHODS 2.

    With every hinge term active, L = mean(2 - u_pos + u_neg) and
    sum_m dL/dz_m = -(1/N) sum_m (B c_m - B c_{m-1}) = 0: a bias whose unit is
    on for every sample gets no gradient. Here: BP-CLAPP++ on the VGG, whose
    top block is 1x1, so each top unit is either on or off for the whole batch.
    """
    enc, rule, views = setup("bp-clapp++", "vgg")
    h = enc(views)[-1]
    z = spatial_pool(h, 1)
    u_pos = (z * rule.head(swap_views(z))).sum(1)
    u_neg = (z.roll(-1, 0) * rule.head(swap_views(z))).sum(1)
    assert (u_pos < 1).all() and (u_neg > -1).all()  # every term active at init
    on = (z > 0).all(0) | (z <= 0).all(0)
    assert on.all()
    rule.loss(0, h).backward()
    torch.testing.assert_close(enc.blocks[-1][0].bias.grad, torch.zeros_like(enc.blocks[-1][0].bias),
                               rtol=0, atol=1e-9)
    assert enc.blocks[-1][0].weight.grad.abs().max() > 1e-4


@pytest.mark.parametrize("name", RULE_NAMES)
def test_loss_decreases_on_a_fixed_batch(name):
    """30 AdamW steps on one fixed batch lower the summed loss by > 5% (every rule, hinge; the same draws first
    and last)."""
    enc, rule, views = setup(name, supported_case(name, "tail"), seed=0)
    opt = build_optimizer(enc, rule, lr=3e-3, weight_decay=0.0)
    same_draws()  # the first and the last step draw the same negatives (rules that draw them)
    first = torch.stack(train_step(enc, rule, opt, views))
    for _ in range(29):
        train_step(enc, rule, opt, views)
    same_draws()
    last = torch.stack(train_step(enc, rule, opt, views))
    assert torch.isfinite(last).all()
    assert last.sum() < 0.95 * first.sum(), (first, last)


@pytest.mark.parametrize("name", ["clapp++", "bp-infonce"])
@pytest.mark.parametrize("micro_batch", [None, 3])
def test_non_finite_loss_raises_before_any_update(name, micro_batch):
    """A NaN loss names its group and leaves every weight as it was (no optimizer step)."""
    enc, rule, views = setup(name, "tail")
    views[0, 0, 0, 0] = float("nan")
    opt = build_optimizer(enc, rule, lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in named_trainable(enc, rule).items()}
    with pytest.raises(NonFiniteLossError, match=r"loss of group 1 \(blocks \[1"):
        train_step(enc, rule, opt, views, micro_batch=micro_batch)
    for n, p in named_trainable(enc, rule).items():
        assert torch.equal(p, before[n]), n


# ---------------------------------------------------------- feedback kinds


def test_feedback_kinds():
    c = torch.randn(5, 6)
    ident = Feedback(6, 6, "identity")
    assert list(ident.parameters()) == [] and ident(c) is c
    fixed = Feedback(6, 4, "fixed")
    assert [p.requires_grad for p in fixed.parameters()] == [False] and fixed.weight.shape == (4, 6)
    train = Feedback(6, 4, "trainable")
    assert [p.requires_grad for p in train.parameters()] == [True]
    torch.testing.assert_close(train(c), c @ train.weight.T)
    with pytest.raises(ValueError, match="identity"):
        Feedback(6, 4, "identity")
    with pytest.raises(ValueError) as e:
        Feedback(6, 6, "random")
    for kind in FEEDBACK_KINDS:
        assert kind in str(e.value)


@pytest.mark.parametrize("name", FEEDBACK_RULES)
def test_fixed_feedback_never_changes(name):
    enc, rule, views = setup(name, "tail", feedback="fixed")
    fb = {n: p.detach().clone() for n, p in rule.named_parameters()}
    assert fb and all(not p.requires_grad for p in rule.parameters())
    assert all(rule.group_parameters(g) == [] for g in range(len(rule.groups())))
    enc0 = copy.deepcopy(enc.state_dict())
    opt = build_optimizer(enc, rule, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        train_step(enc, rule, opt, views)
    for n, p in rule.named_parameters():
        assert torch.equal(p, fb[n]) and p.grad is None, n
    assert any(not torch.equal(enc0[k], v) for k, v in enc.state_dict().items())


@pytest.mark.parametrize("name", ["clapp++", "clapp++global", "bp-clapp++"])
def test_identity_feedback_same_layer_has_no_parameters(name):
    enc, rule, views = setup(name, "vgg", feedback="identity")
    assert list(rule.parameters()) == []
    losses = train_step(enc, rule, build_optimizer(enc, rule, 1e-3, 0.0), views)
    assert all(torch.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ["clapp++dfb", "clapp++both"])
def test_identity_feedback_with_mismatched_dims_raises(name):
    with pytest.raises(ValueError, match="identity feedback needs equal dims"):
        setup(name, "vgg", feedback="identity")


def test_bad_construction_raises():
    shapes = [(4, 8, 8), (6, 4, 4)]
    with pytest.raises(ValueError, match="grids"):
        build_rule("clapp++", shapes, {}, grids=None)
    with pytest.raises(ValueError, match="2 blocks"):
        build_rule("clapp++", shapes, {}, grids=[4])
    with pytest.raises(ValueError, match="does not fit"):
        build_rule("clapp++", shapes, {}, grids=[4, 3])
    with pytest.raises(ValueError, match="rule_options of clapp\\+\\+: unknown f 'hing'; valid: hinge"):
        build_rule("clapp++", shapes, {"f": "hing"}, grids=[4, 2])
    with pytest.raises(ValueError, match="unknown ContrastiveOptions key.*'proj_dim'"):
        build_rule("clapp++", shapes, {"proj_dim": 8}, grids=[4, 2])
    with pytest.raises(ValueError, match="trainable"):
        build_rule("clapp++", shapes, {"feedback": "dfa"}, grids=[4, 2])


def test_dfb_loss_needs_top():
    enc, rule, views = setup("clapp++dfb", "tail")
    with pytest.raises(ValueError, match="top"):
        rule.loss(0, enc(views)[0], None)


# ------------------------------------------------- loss definitions per rule


def test_clapp_variants_losses_by_hand():
    """Same-layer, DFB and 'both' losses from their definitions (METHODS 2), block by block."""
    torch.manual_seed(0)
    enc, in_shape, grids = _tail()
    shapes = enc.feature_shapes(in_shape)
    both = build_rule("clapp++both", shapes, {}, grids=grids)
    same = build_rule("clapp++", shapes, {}, grids=grids)
    dfb = build_rule("clapp++dfb", shapes, {}, grids=grids)
    same.same.load_state_dict(both.same.state_dict())
    dfb.top.load_state_dict(both.top.state_dict())
    views = make_views(in_shape)
    outs = enc(views)
    top = outs[-1].detach()
    c_top = swap_views(spatial_pool(top, grids[-1]))
    for g, h in enumerate(outs):
        z = spatial_pool(h, grids[g])
        l_same = contrastive_loss(z, swap_views(z).detach() @ both.same[g].weight.T)
        l_top = contrastive_loss(z, c_top @ both.top[g].weight.T)
        torch.testing.assert_close(same.loss(g, h, top), l_same)
        torch.testing.assert_close(dfb.loss(g, h, top), l_top)
        torch.testing.assert_close(both.loss(g, h, top), l_same + l_top)


def test_global_rule_pools_globally_and_bp_clapp_uses_top_only():
    enc, rule, views = setup("clapp++global", "vgg")
    assert rule.grids == [1] * len(enc)
    h = enc(views)
    z = h[1].mean(dim=(2, 3))
    torch.testing.assert_close(rule.loss(1, h[1]), contrastive_loss(z, swap_views(z) @ rule.same[1].weight.T))
    _, bp, _ = setup("bp-clapp++", "vgg")
    zt = h[-1].mean(dim=(2, 3))
    torch.testing.assert_close(bp.loss(0, h[-1]), contrastive_loss(zt, swap_views(zt) @ bp.head.weight.T))


def test_b_l2_penalty_is_added_and_trains_b():
    enc, rule, views = setup("clapp++", "tail", f="linear", b_l2=0.5)
    h = enc(views)[1]
    z = spatial_pool(h, rule.grids[1])
    w = rule.same[1].weight
    want = contrastive_loss(z, swap_views(z).detach() @ w.T, "linear") + 0.5 * w.pow(2).sum()
    torch.testing.assert_close(rule.loss(1, h), want)


# -------------------------------------------------- (b) three-factor rule

# gamma = -df/du for the positive and the negative score (METHODS 2).
GAMMA = {
    "hinge": lambda up, un: ((up < 1).double(), -(un > -1).double()),
    "softplus": lambda up, un: (torch.sigmoid(1 - up), -torch.sigmoid(1 + un)),
    "logistic": lambda up, un: (torch.sigmoid(1 - up), -torch.sigmoid(1 + un)),
    "linear": lambda up, un: (torch.ones_like(up), -torch.ones_like(un)),
    "type1": lambda up, un: (torch.sigmoid(un - up), -torch.sigmoid(un - up)),
}


def test_every_f_has_an_explicit_gamma():
    assert set(GAMMA) == set(CONTRASTIVE_F.names())


def _three_factor_dz(z: torch.Tensor, bmat: torch.Tensor, f: str):
    """dL/dz_m = -(1/N) [gamma_pos_m (B c_m) + gamma_neg_{m-1} (B c_{m-1})], and dL/dB.

    Row m's z is the positive of its own score (context c_m) and the negative
    of row m-1's score (context c_{m-1}).
    """
    n = z.shape[0]
    c = swap_views(z)
    bc = c @ bmat.T
    u_pos = (z * bc).sum(1)
    u_neg = (torch.roll(z, -1, 0) * bc).sum(1)
    g_pos, g_neg = GAMMA[f](u_pos, u_neg)
    dz = -(g_pos[:, None] * bc + torch.roll(g_neg, 1)[:, None] * torch.roll(bc, 1, 0)) / n
    # B's own (Hebbian-like) rule: dL/dB = -(1/N) sum_m (gamma_pos z_m + gamma_neg z_{m+1}) c_m^T.
    db = -((g_pos[:, None] * z + g_neg[:, None] * torch.roll(z, -1, 0)).T @ c) / n
    return dz, db, (u_pos, u_neg)


def _views64(shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N_IMAGES, *shape, generator=g, dtype=torch.float64)
    return torch.cat([base + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64),
                      base + 0.3 * torch.randn(base.shape, generator=g, dtype=torch.float64)])


@pytest.mark.parametrize("f", CONTRASTIVE_F.names())
def test_three_factor_rule_linear_layer(f):
    """h = relu(W x + b): autograd's dW, db, dB equal the explicit local rule (float64)."""
    torch.manual_seed(0)
    d_in, d = 5, 6
    rule = build_rule("clapp++global", [(d,)], {"f": f}).double()
    with torch.no_grad():
        rule.same[0].weight.mul_(2.0)  # scores of order 1: both sides of the hinge kinks occur
    bmat = rule.same[0].weight
    x = _views64((d_in,), 1)
    w = (torch.randn(d, d_in, dtype=torch.float64) * 0.7).requires_grad_()
    b = (torch.randn(d, dtype=torch.float64) * 0.1).requires_grad_()
    a = x @ w.T + b
    h = torch.relu(a)
    loss = rule.loss(0, h)
    torch.testing.assert_close(loss, contrastive_loss(h, swap_views(h).detach() @ bmat.T, f), rtol=0, atol=0)
    gw, gb, gbm = torch.autograd.grad(loss, (w, b, bmat))

    dz, dbm, (u_pos, u_neg) = _three_factor_dz(h.detach(), bmat.detach(), f)
    post = dz * (a.detach() > 0)  # gamma * (B c)_j * relu'(a_j)
    dw = torch.einsum("mj,mi->ji", post, x)  # ... * x_i, summed over the batch
    torch.testing.assert_close(gw, dw, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gb, post.sum(0), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gbm, dbm, rtol=1e-10, atol=1e-13)
    assert dw.abs().max() > 1e-3, "degenerate case: the rule gives no update"
    if f == "hinge":  # the case must visit active and inactive terms
        assert ((u_pos >= 1) | (u_neg <= -1)).any() and ((u_pos < 1) | (u_neg > -1)).any()


@pytest.mark.parametrize("f", CONTRASTIVE_F.names())
@pytest.mark.parametrize("grid", [4, 2, 1])
def test_three_factor_rule_conv_layer(f, grid):
    """h = relu(conv(x)): autograd == the explicit rule on unfolded patches, for pooling kernels 1, 2, 4.

    With pooling kernel k = H / grid, dL/dh at a position is the pooled cell's
    dL/dz divided by the kernel area k^2 (nearest upsampling).
    """
    torch.manual_seed(0)
    c_in, c_out, s = 2, 3, 4
    k = s // grid
    rule = build_rule("clapp++", [(c_out, s, s)], {"f": f}, grids=[grid]).double()
    with torch.no_grad():
        rule.same[0].weight.mul_(k)  # scores of order 1-7
    bmat = rule.same[0].weight
    x = _views64((c_in, s, s), 2)
    w = (torch.randn(c_out, c_in, 3, 3, dtype=torch.float64) * 0.5).requires_grad_()
    b = (torch.randn(c_out, dtype=torch.float64) * 0.1).requires_grad_()
    a = F.conv2d(x, w, b, padding=1)
    h = torch.relu(a)
    loss = rule.loss(0, h)
    gw, gb, gbm = torch.autograd.grad(loss, (w, b, bmat))

    patches = F.unfold(x, 3, padding=1)  # (N, c_in*9, s*s): x_i at every position
    a_unf = torch.einsum("jc,ncp->njp", w.detach().reshape(c_out, -1), patches) + b.detach()[None, :, None]
    torch.testing.assert_close(a_unf, a.detach().flatten(2), rtol=1e-12, atol=1e-12)
    z = spatial_pool(h.detach(), grid)
    dz, dbm, (u_pos, u_neg) = _three_factor_dz(z, bmat.detach(), f)
    dz = dz.reshape(-1, c_out, grid, grid)
    dh = dz.repeat_interleave(k, 2).repeat_interleave(k, 3) / (k * k)
    post = (dh * (a.detach() > 0)).flatten(2)  # (N, c_out, s*s)
    dw = torch.einsum("njp,nip->ji", post, patches).reshape_as(w)
    torch.testing.assert_close(gw, dw, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gb, post.sum((0, 2)), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gbm, dbm, rtol=1e-10, atol=1e-13)
    assert dw.abs().max() > 1e-4, "degenerate case: the rule gives no update"
    if f == "hinge":  # the case must visit active and inactive terms
        assert ((u_pos >= 1) | (u_neg <= -1)).any() and ((u_pos < 1) | (u_neg > -1)).any()


def test_three_factor_check_sees_a_wrong_sign():
    """Negative control: flipping gamma_neg (or letting gradient through c) breaks the equality."""
    torch.manual_seed(0)
    rule = build_rule("clapp++global", [(6,)], {"f": "softplus"}).double()
    bmat = rule.same[0].weight.detach()
    x = _views64((5,), 1)
    w = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    a = x @ w.T
    h = torch.relu(a)
    (gw,) = torch.autograd.grad(rule.loss(0, h), (w,), retain_graph=True)
    dz, _, _ = _three_factor_dz(h.detach(), bmat, "softplus")
    good = torch.einsum("mj,mi->ji", dz * (a.detach() > 0), x)
    torch.testing.assert_close(gw, good, rtol=1e-10, atol=1e-13)
    # Negative's gamma with the wrong sign, or paired with c_m instead of c_{m-1}: not equal.
    n = x.shape[0]
    bc = swap_views(h.detach()) @ bmat.T
    up, un = (h.detach() * bc).sum(1), (h.detach().roll(-1, 0) * bc).sum(1)
    g_pos, g_neg = GAMMA["softplus"](up, un)
    for dz_bad in (-(g_pos[:, None] * bc - g_neg.roll(1)[:, None] * bc.roll(1, 0)) / n,
                   -(g_pos[:, None] * bc + g_neg.roll(1)[:, None] * bc) / n):
        bad = torch.einsum("mj,mi->ji", dz_bad * (a.detach() > 0), x)
        assert not torch.allclose(gw, bad, rtol=1e-6, atol=1e-9)
    # Context not detached: the gradient differs from the three-factor rule.
    (g_leak,) = torch.autograd.grad(contrastive_loss(h, swap_views(h) @ bmat.T, "softplus"), (w,))
    assert not torch.allclose(g_leak, good, rtol=1e-6, atol=1e-9)


# -------------------------------------------------------- (c) BP-InfoNCE


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_bp_infonce_loss_by_hand(temperature):
    """Projection of the globally pooled top, cosine logits view 1 vs view 2 / T, CE in ONE direction
    (rows = view 1, METHODS 2.3, the reference's loss); bp-infonce-sym averages both directions."""
    torch.manual_seed(0)
    c, s = 6, 2
    rule = build_rule("bp-infonce", [(c, s, s)], {"temperature": temperature, "proj_dim": 5})
    assert rule.group_parameters(0) == [rule.projection.weight] and rule.projection.bias is None
    h = make_views((c, s, s), seed=3)
    p = h.mean(dim=(2, 3)) @ rule.projection.weight.T
    p1, p2 = p[:N_IMAGES], p[N_IMAGES:]
    n1 = p1 / p1.norm(dim=1, keepdim=True)
    n2 = p2 / p2.norm(dim=1, keepdim=True)
    logits = n1 @ n2.T / temperature  # B x B
    target = torch.arange(N_IMAGES)
    got = rule.loss(0, h)
    # float32 inputs: a few ulps of float32 per term.
    torch.testing.assert_close(got, F.cross_entropy(logits, target), rtol=1e-5, atol=1e-6)
    lg = logits.tolist()
    b = N_IMAGES
    l12 = sum(-math.log(math.exp(lg[i][i]) / sum(math.exp(lg[i][j]) for j in range(b))) for i in range(b)) / b
    l21 = sum(-math.log(math.exp(lg[j][j]) / sum(math.exp(lg[i][j]) for i in range(b))) for j in range(b)) / b
    assert got.item() == pytest.approx(l12, rel=1e-5)
    sym = build_rule("bp-infonce-sym", [(c, s, s)], {"temperature": temperature, "proj_dim": 5})
    sym.load_state_dict(rule.state_dict())
    assert sym.loss(0, h).item() == pytest.approx(0.5 * (l12 + l21), rel=1e-5)
