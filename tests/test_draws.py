"""Views drawn per image from (seed, epoch, index): an image's views do not depend on its batch."""
from __future__ import annotations

import pytest
import torch

from localssl.data.augment import SimCLRViews
from localssl.data.draws import ImageDraws, mix, resized_crop


@pytest.mark.parametrize("channels", [3, 1])
def test_an_images_views_do_not_depend_on_its_batch(channels):
    """Rows of a sub-batch (a rank's share) equal the same images' rows in the whole batch, bit for bit;
    another epoch or seed draws other views; the global RNG is neither read nor moved."""
    torch.manual_seed(0)
    maker = SimCLRViews(16, [0.5] * channels, [0.25] * channels)
    x = (torch.rand(12, 16, 16, channels) * 255).to(torch.uint8)
    index = torch.arange(100, 112)
    state = torch.get_rng_state()
    whole = maker.drawn(x, ImageDraws(7, 2, 5, index))
    assert torch.equal(torch.get_rng_state(), state)
    sub = torch.tensor([9, 0, 4])
    part = maker.drawn(x[sub], ImageDraws(7, 2, 5, index[sub]))
    assert torch.equal(part, whole[torch.cat([sub, sub + 12])])
    assert not torch.equal(whole, maker.drawn(x, ImageDraws(7, 3, 5, index)))
    assert not torch.equal(whole, maker.drawn(x, ImageDraws(8, 2, 5, index)))
    assert not torch.equal(whole[:12], whole[12:])  # the two views of an image differ


def test_resized_crop_boxes_by_hand():
    """Uniforms that make the first try fit give torchvision's box: area 0.25 of 16 x 16 at ratio 1 is 8 x 8,
    placed at floor(u * (16 - 8 + 1)); kornia's corners are (x, y), inclusive."""
    u = torch.zeros(1, 22)
    u[0, 0] = (0.25 - 0.08) / (1 - 0.08)  # area fraction 0.25
    u[0, 10:20] = 0.5  # log-ratio midway between log(3/4) and log(4/3): ratio 1
    u[0, 20], u[0, 21] = 0.5, 0.0
    p = resized_crop(u, (16, 16), 16, (0.08, 1.0))
    assert p["src"][0].tolist() == [[4, 0], [11, 0], [11, 7], [4, 7]]
    assert p["dst"][0].tolist() == [[0, 0], [15, 0], [15, 15], [0, 15]]


def test_mix_separates_keys():
    keys = {mix(s, e, i, v) for s in range(3) for e in range(3) for i in range(50) for v in range(2)}
    assert len(keys) == 3 * 3 * 50 * 2 and all(0 <= k < 2**63 for k in keys)
