"""Gradient alignment of local rules with BP (METHODS 3, "Gradient alignment in CNNs")."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from localssl.models import BlockEncoder, build_encoder
from localssl.rules import RULES, build_rule
from localssl.theory.align import add_align_parser, align_main, fit_b, gradient_alignment, layer_gradients

# The CLAPP++ family and the rules on its machinery whose B is not learnt (ff: identity, dfa: fixed random).
LOCAL_RULES = [n for n in RULES.names() if n.startswith("clapp++")] + ["ff", "dfa"]


# VGG-6 at 1/16 width on 16 px inputs (maps 16, 8, 8, 4, 2, 1): small enough for a shared CPU.
SIZE = 16
GRIDS = [4, 2, 2, 2, 1, 1]


def _vgg(rule_name: str, seed: int = 0, **opt):
    torch.manual_seed(seed)
    enc = build_encoder("vgg6", 1 / 16)
    shapes = enc.feature_shapes((3, SIZE, SIZE))
    rule = build_rule(rule_name, shapes, {**opt}, grids=GRIDS)
    return enc, rule


def _views(n_images: int = 4, c: int = 3, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, c, size, size, generator=g)
    # two correlated "views" of every image, stacked [view 1; view 2]
    return torch.cat([x, x + 0.3 * torch.randn(x.shape, generator=g)])


def test_every_clapp_rule_is_local():
    # A BP counterpart (the rule's own top loss, end to end) exists for every local rule.
    assert {"clapp++", "clapp++global", "clapp++dfb", "clapp++both"} <= set(LOCAL_RULES)


@pytest.mark.parametrize("rule_name", LOCAL_RULES)
def test_top_layer_is_identical_and_cosines_are_bounded(rule_name):
    enc, rule = _vgg(rule_name)
    res = gradient_alignment(enc, rule, [_views(seed=1), _views(seed=2)])
    assert res["batches"] == 2 and len(res["layers"]) == 6
    top = res["layers"][-1]
    assert abs(top["cosine_mean"] - 1) < 1e-6 and top["cosine_std"] < 1e-6
    assert abs(top["cosine_bias_mean"] - 1) < 1e-6
    assert top["norm_local_mean"] == pytest.approx(top["norm_bp_mean"], rel=1e-6)
    for r in res["layers"]:
        assert -1 <= r["cosine_mean"] <= 1 and r["norm_local_mean"] > 0 and r["norm_bp_mean"] > 0
    # The lower layers are *not* trivially aligned (random B): the test above means something.
    assert res["layers"][0]["cosine_mean"] < 0.99


def test_bp_rule_is_refused():
    enc, _ = _vgg("clapp++")
    rule = build_rule("bp-clapp++", enc.feature_shapes((3, SIZE, SIZE)), {})
    with pytest.raises(ValueError, match="end-to-end"):
        gradient_alignment(enc, rule, [_views()])


def test_local_gradient_has_detached_input_and_bp_gradient_sees_the_top():
    enc, rule = _vgg("clapp++")
    v = _views()
    local0, bp0, _ = layer_gradients(enc, rule, v)
    # Changing the top block's B changes the BP gradient of layer 1, not its local gradient.
    with torch.no_grad():
        rule.same[-1].weight.mul_(-0.5).add_(0.01)
    local1, bp1, _ = layer_gradients(enc, rule, v)
    assert torch.equal(local0[0]["weight"], local1[0]["weight"])
    assert not torch.allclose(bp0[0]["weight"], bp1[0]["weight"])
    # Changing block 3's weights leaves layer 1's local gradient alone (no gradient crosses a block
    # input) but changes its BP gradient.
    with torch.no_grad():
        enc.blocks[2][0].weight.mul_(1.7)
    local2, bp2, _ = layer_gradients(enc, rule, v)
    assert torch.equal(local1[0]["weight"], local2[0]["weight"])
    assert torch.equal(local1[1]["weight"], local2[1]["weight"])
    assert not torch.allclose(bp1[0]["weight"], bp2[0]["weight"])
    # .grad is left clean and the weights untouched by the analysis.
    assert all(p.grad is None for p in enc.parameters())


# ----------------------------------------------------------------------------- linear CNN (Prop. 3.5)


def _linear_cnn(channels=(2, 3, 2, 3), size: int = 4, seed: int = 0, top_scale: float = 1.0):
    """Identity-activation, bias-free 3x3 convs; grid = full map (pooling kernel 1)."""
    torch.manual_seed(seed)
    blocks = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        nn.init.orthogonal_(conv.weight)  # orthogonal-ish; exactness below does not need it
        blocks.append(nn.Sequential(conv))
    with torch.no_grad():
        blocks[-1][0].weight.mul_(top_scale)
    enc = BlockEncoder(blocks)
    shapes = enc.feature_shapes((channels[0], size, size))
    return enc, shapes


def _maps_to_top(enc: BlockEncoder, shapes) -> list[torch.Tensor]:
    """M_k: the (linear) map from block k's flattened output to the top block's flattened output."""
    n = len(enc)
    ms = []
    for k in range(n):
        def f(v, k=k):
            return enc.run_blocks(v.view(1, *shapes[k]), range(k + 1, n)).reshape(-1)

        d = int(torch.tensor(shapes[k]).prod())
        ms.append(torch.autograd.functional.jacobian(f, torch.zeros(d)).detach())
    return ms


@pytest.mark.parametrize("rule_name", ["clapp++", "clapp++dfb", "clapp++both"])
@pytest.mark.parametrize("top_scale", [1.0, 1e-5])
def test_linear_cnn_local_gradient_equals_bp_with_matched_b(rule_name, top_scale):
    """METHODS 3: the top score is z^l' (M' B^L M) c^l, so B^l = M' B^L M (same-layer context) or
    B^l = M' B^L (DFB context) makes the local loss of layer l *equal* the BP loss as a function of
    z^l: local and BP gradients must coincide at every layer. With top_scale 1e-5 the lower-layer
    gradients have norms far below 1e-8 (METHODS 3's practical note): the cosine must still be 1."""
    enc, shapes = _linear_cnn(top_scale=top_scale)
    size = shapes[0][-1]
    rule = build_rule(rule_name, shapes, {"f": "softplus"}, grids=[size] * len(shapes))
    v = _views(n_images=5, c=2, size=size, seed=4)
    ms = _maps_to_top(enc, shapes)
    # Without matching, lower layers are misaligned (the check below is not trivially true).
    before = gradient_alignment(enc, rule, [v])["layers"]
    assert before[0]["cosine_mean"] < 0.99
    with torch.no_grad():
        for k, m in enumerate(ms[:-1]):
            if len(rule.same):
                rule.same[k].weight.copy_(m.T @ rule.same[-1].weight @ m)
            if len(rule.top):
                rule.top[k].weight.copy_(m.T @ rule.top[-1].weight)
    res = gradient_alignment(enc, rule, [v, _views(n_images=5, c=2, size=size, seed=5)])
    for r in res["layers"]:
        assert r["cosine_mean"] > 1 - 1e-6, (r["layer"], r["cosine_mean"])
        assert r["norm_local_mean"] == pytest.approx(r["norm_bp_mean"], rel=1e-4)
        assert r["norm_bp_mean"] > 0
    if top_scale < 1:
        low = res["layers"][0]["norm_bp_mean"]
        assert low < 1e-8
        # What an eps-clamped cosine would have said about these equal gradients.
        local, bp, _ = layer_gradients(enc, rule, v)
        naive = float(nn.functional.cosine_similarity(local[0]["weight"].float(), bp[0]["weight"].float(), dim=0))
        assert naive < 0.5


def test_global_pooling_is_not_exact_in_a_linear_cnn():
    """Global pooling (grid 1) in the same linear CNN: the top layer is still identical by
    construction, while the lower layers are not aligned (here with fresh B)."""
    enc, shapes = _linear_cnn()
    rule = build_rule("clapp++global", shapes, {"f": "softplus"})
    res = gradient_alignment(enc, rule, [_views(n_images=5, c=2, size=4, seed=4)])
    assert abs(res["layers"][-1]["cosine_mean"] - 1) < 1e-6
    assert res["layers"][0]["cosine_mean"] < 1 - 1e-3


def test_fit_b_trains_only_b_and_lowers_the_loss():
    enc, rule = _vgg("clapp++dfb")
    w0 = {k: v.clone() for k, v in enc.state_dict().items()}
    b0 = [p.detach().clone() for p in rule.parameters()]
    batches = [_views(seed=s) for s in range(3)]
    info = fit_b(enc, rule, batches, steps=15, lr=3e-3)
    assert info["fitted"] and info["steps"] == 15
    assert info["loss_end"] < info["loss_start"]
    assert all(torch.equal(w0[k], v) for k, v in enc.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(b0, rule.parameters()))
    frozen = build_rule("clapp++", enc.feature_shapes((3, SIZE, SIZE)),
                        {"feedback": "fixed"}, grids=GRIDS)
    assert fit_b(enc, frozen, batches, steps=5)["fitted"] is False


# ----------------------------------------------------------------------------- the command


@pytest.fixture()
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSSL_CACHE", str(tmp_path / "cache"))


def _tiny_run(tmp_path, rule: str):
    from localssl.config import TrainConfig
    from localssl.engine.trainer import train

    cfg = TrainConfig(rule=rule, dataset="shapes10", width=1 / 16, subset=64, batch_size=16, max_steps=2,
                      amp="off", progress=False, out=str(tmp_path / rule), seed=0)
    return train(cfg)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="localssl")
    add_align_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["align", *argv])


@pytest.mark.usefixtures("_cache")
def test_align_command_end_to_end(tmp_path, capsys):
    run = _tiny_run(tmp_path, "clapp++")
    out = tmp_path / "out"
    args = _parse([str(run), "--batches", "2", "--batch-size", "8", "--fit-b", "2", "--out", str(out), "--json"])
    assert align_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["align-clapp++-fitb2.json", "align-clapp++-fitb2.png"]
    saved = json.loads((out / "align-clapp++-fitb2.json").read_text())
    assert saved["layers"] == printed["layers"]
    assert saved["rule"] == "clapp++" and saved["b_source"] == "checkpoint" and saved["b_fitted"] is True
    assert saved["batches"] == 2 and saved["images_per_batch"] == 8 and len(saved["layers"]) == 6
    assert abs(saved["layers"][-1]["cosine_mean"] - 1) < 1e-6

    # Another local rule on the same encoder, fresh B, table output, written into the run folder.
    args = _parse([str(run), "--rule", "clapp++global", "--random-init", "--batches", "1", "--batch-size", "8"])
    assert align_main(args) == 0
    text = capsys.readouterr().out
    assert "|BP grad|" in text and "B: fresh, not fitted" in text
    saved = json.loads((run / "align-clapp++global-random.json").read_text())
    assert saved["b_source"] == "fresh" and saved["random_init"] is True
    assert abs(saved["layers"][-1]["cosine_mean"] - 1) < 1e-6


@pytest.mark.usefixtures("_cache")
def test_align_refuses_a_bp_run(tmp_path):
    from localssl.config import ConfigError

    run = _tiny_run(tmp_path, "bp-clapp++")
    with pytest.raises(ConfigError, match=r"end-to-end \(BP\).*--rule"):
        align_main(_parse([str(run), "--batches", "1", "--batch-size", "8"]))


@pytest.mark.usefixtures("_cache")
def test_align_builds_the_views_of_the_rule_it_analyses(tmp_path, capsys):
    # scff reads positive and negative pairs (its own layout), not SimCLR's stacked views: align must draw those.
    run = _tiny_run(tmp_path, "scff")
    args = _parse([str(run), "--batches", "1", "--batch-size", "8", "--json"])
    assert align_main(args) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["rule"] == "scff" and saved["images_per_batch"] == 8 and len(saved["layers"]) == 6
    assert abs(saved["layers"][-1]["cosine_mean"] - 1) < 1e-6  # the top group's local gradient is BP's
