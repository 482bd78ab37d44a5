"""Encoders and their layers: the index-only max-pool is torch's max-pool, with less saved for backward;
ResNet-18/50 have torchvision's parameter counts and shapes, and their cut changes no output."""
from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
from torch import nn

from localssl.models import BlockEncoder, build_encoder
from localssl.models.layers import MaxPool2d
from localssl.reports.bench import SavedBytesTracker


def _pool_grads(pool: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = pool(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k, side", [(2, 8), (2, 7), (3, 9), (2, 2)])
def test_max_pool_is_torch_max_pool_bitwise(channels_last, k, side):
    """Same output and same input gradient as nn.MaxPool2d, ties included, in the input's layout."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, side, side)
    x[0, 0, :2, :2] = 1.0  # a tie inside one window: both pick the first maximum
    g = torch.randn(3, 5, side // k, side // k)
    if channels_last:
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    y_ref, gx_ref = _pool_grads(nn.MaxPool2d(k), x, g)
    y, gx = _pool_grads(MaxPool2d(k), x, g)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert gx.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_max_pool_saves_only_its_indices():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with SavedBytesTracker() as ours:
        y = MaxPool2d(2)(x * 1)
    with SavedBytesTracker() as torch_own:
        y_ref = nn.MaxPool2d(2)(x * 1)
    idx_bytes = 8 * y.numel()  # int64
    assert ours.peak_bytes == idx_bytes
    assert torch_own.peak_bytes == idx_bytes + x.nbytes
    del y, y_ref


def test_max_pool_without_grad_is_the_plain_op():
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(MaxPool2d(2)(x.requires_grad_()), nn.functional.max_pool2d(x, 2))
    assert MaxPool2d(2)(x.detach()).grad_fn is None


@pytest.mark.parametrize("bad", [0, (2, 2), 2.0])
def test_max_pool_takes_one_int_kernel(bad):
    with pytest.raises(ValueError, match="int kernel"):
        MaxPool2d(bad)


def test_vgg_gradients_equal_those_with_torch_max_pool():
    """Every weight gradient of VGG-6 is unchanged by the index-only max-pool (end-to-end backward)."""
    torch.manual_seed(0)
    enc = build_encoder("vgg6", 1 / 16)
    ref = build_encoder("vgg6", 1 / 16)
    ref.load_state_dict(enc.state_dict())
    for block in ref.blocks:
        for i, m in enumerate(block):
            if isinstance(m, MaxPool2d):
                block[i] = nn.MaxPool2d(m.kernel_size)
    assert any(isinstance(m, MaxPool2d) for m in enc.modules())
    assert not any(isinstance(m, MaxPool2d) for m in ref.modules())
    x = torch.randn(4, 3, 32, 32)
    for model in (enc, ref):
        model(x)[-1].square().sum().backward()
    for (n, p), q in zip(enc.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), n


# ---------------------------------------------------------------- ResNet-18 / ResNet-50

# torchvision's published counts (resnet18: 11,689,512; resnet50: 25,557,032)
# minus the fc layer (512 * 1000 + 1000 and 2048 * 1000 + 1000).
TORCHVISION_TRUNK = {"resnet18": 11_689_512 - (512 * 1000 + 1000), "resnet50": 25_557_032 - (2048 * 1000 + 1000)}

#: Residual units per stage (He et al. 2016, Table 1).
UNITS = {"resnet18": [2, 2, 2, 2], "resnet50": [3, 4, 6, 3]}


def _resnet(name: str, width: float = 1 / 16, **options) -> BlockEncoder:
    return build_encoder(name, width, 3, options={"stem": "cifar", **options})


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_parameter_counts_are_torchvisions(name):
    assert TORCHVISION_TRUNK == {"resnet18": 11_176_512, "resnet50": 23_508_032}
    for cut in ("stages", "units"):
        with torch.device("meta"):  # shapes only: no memory, no init
            enc = build_encoder(name, 1.0, 3, options={"stem": "imagenet", "cut": cut})
        assert sum(p.numel() for p in enc.parameters()) == TORCHVISION_TRUNK[name]


@pytest.mark.parametrize("name, channels", [("resnet18", [64, 128, 256, 512]), ("resnet50", [256, 512, 1024, 2048])])
def test_resnet_block_shapes(name, channels):
    """4 stages: ImageNet stem at 224 px -> 56, 28, 14, 7; CIFAR stem at 32 px -> 32, 16, 8, 4; MNIST's 1 channel."""
    with torch.device("meta"):
        enc = build_encoder(name, 1.0, 3, image_size=224)
        assert enc.feature_shapes((3, 224, 224)) == [(c, s, s) for c, s in zip(channels, [56, 28, 14, 7])]
        assert [b.out_channels for b in enc.blocks] == channels  # what per-stage heads read
        enc = build_encoder(name, 1.0, 3, image_size=32)
        assert enc.feature_shapes((3, 32, 32)) == [(c, s, s) for c, s in zip(channels, [32, 16, 8, 4])]
        enc = build_encoder(name, 1.0, 1, image_size=28)
        assert enc.feature_shapes((1, 28, 28)) == [(c, s, s) for c, s in zip(channels, [28, 14, 7, 4])]


@pytest.mark.parametrize("name", UNITS)
def test_resnet_units_cut_is_one_block_per_residual_unit(name):
    units = UNITS[name]
    with torch.device("meta"):
        enc = build_encoder(name, 1.0, 3, options={"stem": "cifar", "cut": "units"})
    names = [list(dict(b.named_children())) for b in enc.blocks]
    assert len(enc) == sum(units)
    assert names[0] == ["stem", "layer1_0"]
    assert names[1:] == [[f"layer{s}_{i}"] for s, n in enumerate(units, start=1) for i in range(n)][1:]
    assert all(b.out_channels == s[0] for b, s in zip(enc.blocks, enc.feature_shapes((3, 32, 32))))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("train_mode", [False, True])
def test_resnet_cut_changes_no_output(name, train_mode):
    """Blocks run one after another == one monolithic forward; stages cut == units cut; float64, bitwise."""
    torch.manual_seed(0)
    stages = _resnet(name).double()
    units = _resnet(name, cut="units").double()
    # Same modules in the same order, under other block indices: copy the weights by position.
    units.load_state_dict(dict(zip(units.state_dict(), stages.state_dict().values())))
    monolithic = nn.Sequential(*[m for b in stages.blocks for m in b.children()])
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for m in (stages, units, monolithic):
        m.train(train_mode)
    out_s, out_u = stages(x), units(x)
    stage_ends = [n - 1 for n in itertools.accumulate(UNITS[name])]  # the unit blocks that end a stage
    assert len(out_s) == 4 and len(out_u) == stage_ends[-1] + 1
    for k, i in enumerate(stage_ends):
        assert torch.equal(out_s[k], out_u[i]), (k, i)
    assert torch.equal(stages.run_blocks(x, range(len(stages))), out_s[-1])
    assert torch.equal(monolithic(x), out_s[-1])


def test_resnet50_is_v1_5_and_has_projection_shortcuts_where_shapes_change():
    with torch.device("meta"):
        r50 = build_encoder("resnet50", 1.0, 3, options={"stem": "imagenet", "cut": "units"})
        r18 = build_encoder("resnet18", 1.0, 3, options={"stem": "imagenet", "cut": "units"})
    units50 = {n: m for b in r50.blocks for n, m in b.named_children() if n != "stem"}
    for s in (2, 3, 4):  # the stride of a downsampling bottleneck is on its 3x3 conv (torchvision's v1.5)
        first = units50[f"layer{s}_0"]
        assert (first.conv1.stride, first.conv2.stride, first.conv3.stride) == ((1, 1), (2, 2), (1, 1))
        assert first.shortcut[0].stride == (2, 2) and first.shortcut[0].kernel_size == (1, 1)
    assert units50["layer1_0"].shortcut is not None  # 64 -> 256 channels at stride 1
    assert all(u.shortcut is None for n, u in units50.items() if not n.endswith("_0"))
    units18 = {n: m for b in r18.blocks for n, m in b.named_children() if n != "stem"}
    assert units18["layer1_0"].shortcut is None and units18["layer1_1"].shortcut is None
    assert all(units18[f"layer{s}_0"].shortcut is not None for s in (2, 3, 4))


def test_resnet_stem_follows_the_input_size_unless_set():
    def stem(**kw):
        with torch.device("meta"):
            s = build_encoder("resnet18", 1.0, 3, **kw).blocks[0].stem
        return s[0].kernel_size[0], s[0].stride[0], any(isinstance(m, nn.MaxPool2d) for m in s)

    cifar, imagenet = (3, 1, False), (7, 2, True)
    assert stem(image_size=32) == stem(image_size=95) == cifar
    assert stem(image_size=96) == stem(image_size=224) == imagenet
    assert stem(image_size=224, options={"stem": "cifar"}) == cifar
    assert stem(image_size=32, options={"stem": "imagenet"}) == imagenet
    with pytest.raises(ValueError, match="stem 'auto'.*image_size"):
        build_encoder("resnet18", 0.25)


def test_resnet_width_multiplier_scales_every_channel_count():
    assert [b.out_channels for b in _resnet("resnet18", 0.5).blocks] == [32, 64, 128, 256]
    assert [b.out_channels for b in _resnet("resnet50", 0.25).blocks] == [64, 128, 256, 512]
    tiny = _resnet("resnet50", 1e-3)  # rounded to at least 1 channel, bottleneck output 4x
    assert [b.out_channels for b in tiny.blocks] == [4, 4, 4, 4]
    assert all(m.out_channels >= 1 for m in tiny.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="width multiplier must be > 0"):
        _resnet("resnet18", 0.0)


def test_resnet_init_is_torchvisions_and_zero_init_makes_units_identity():
    torch.manual_seed(0)
    enc = _resnet("resnet18", 1.0)
    w = enc.blocks[3].layer4_1.conv2.weight  # 512 x 512 x 3 x 3
    fan_out = w.shape[0] * w.shape[2] * w.shape[3]
    assert abs(w.std().item() / math.sqrt(2 / fan_out) - 1) < 0.01  # Kaiming-normal, fan_out
    bns = [m for m in enc.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns)
    zero = _resnet("resnet50", zero_init=True).eval()
    for block in zero.blocks:
        for name, unit in block.named_children():
            if name != "stem":
                assert not unit.bn3.weight.any()
                if unit.shortcut is None:  # the residual branch starts at 0: relu(0 + x) = x for x >= 0
                    x = torch.rand(2, unit.out_channels, 4, 4)
                    assert torch.equal(unit(x), x)


def test_random_init_of_a_resnet_is_its_training_init():
    """`random_init_like` (the random-init baseline) redraws exactly the init a run starts from."""
    from localssl.evaluation.probe import random_init_like

    torch.manual_seed(5)
    fresh = _resnet("resnet50", zero_init=True)
    trained = copy.deepcopy(fresh)
    for p in trained.parameters():
        p.data.add_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter is redrawn
        redrawn = random_init_like(trained, seed=5)
    for (k, a), b in zip(fresh.state_dict().items(), redrawn.state_dict().values()):
        assert torch.equal(a, b), k


def test_encoder_options_are_typed_and_checked():
    from localssl.config import ConfigError
    from localssl.models import ResNetOptions, encoder_options, resolve_encoder_options

    assert encoder_options("resnet18", {"cut": "units", "zero_init": "true"}) == ResNetOptions(cut="units",
                                                                                            zero_init=True)
    assert resolve_encoder_options("resnet50", None, 96) == {"stem": "imagenet", "cut": "stages", "zero_init": False}
    assert resolve_encoder_options("resnet50", {"stem": "cifar"}, 224)["stem"] == "cifar"
    assert encoder_options("vgg6", None) is None and resolve_encoder_options("vgg6", {}, 32) is None
    with pytest.raises(ConfigError, match=r"unknown ResNetOptions key\(s\) 'stride'; valid keys: cut, stem, zero_init"):
        encoder_options("resnet18", {"stride": 1})
    with pytest.raises(ConfigError, match="unknown ResNet cut 'layers'; valid: stages, units"):
        build_encoder("resnet18", options={"cut": "layers"})
    with pytest.raises(ConfigError, match="encoder 'vgg6' takes no encoder_options, got 'stem'"):
        build_encoder("vgg6", options={"stem": "cifar"})
