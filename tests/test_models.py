"""Encoder layers: the index-only max-pool is torch's max-pool, with less saved for backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from localssl.models import build_encoder
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
