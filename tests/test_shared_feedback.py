"""The structured B of issue 14: one channel map shared by every pooled cell, plus a low-rank coupling.

``b_structure=shared``: B = B_ch (x) M (+ U V^T with ``b_rank``), M the fixed
map from the context's grid to the layer's. Checked against the dense B it
stands for, built by hand from explicit loops (float64): the same loss, the
same dL/dh, and dL/dB_ch, dL/dU, dL/dV^T the chain rule of the dense dL/dB;
the penalty |B|_F^2 of the whole matrix; the parameter and FLOP formulas
against the module and the FLOP counter; the registry contracts.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from localssl.rules import Feedback, build_rule, feedback_numel, shared_feedback_flops
from tests.test_cheap_feedback import GRIDS, _vgg
from tests.test_rules import make_views


def _explicit_position_map(g_c: int, g_z: int) -> torch.Tensor:
    """M[p_z, p_c] by its definition: a layer cell reads the context cell it lies in (context coarser),
    or the mean of the context cells it covers (context finer); cells row-major."""
    m = torch.zeros(g_z * g_z, g_c * g_c, dtype=torch.float64)
    for iz in range(g_z):
        for jz in range(g_z):
            for ic in range(g_c):
                for jc in range(g_c):
                    if g_z >= g_c:
                        k = g_z // g_c
                        hit = (iz // k, jz // k) == (ic, jc)
                        w = 1.0
                    else:
                        k = g_c // g_z
                        hit = (ic // k, jc // k) == (iz, jz)
                        w = 1.0 / (k * k)
                    m[iz * g_z + jz, ic * g_c + jc] = w if hit else 0.0
    return m


def _dense_by_hand(fb: Feedback) -> torch.Tensor:
    """B[(o, p_z), (c, p_c)] = B_ch[o, c] M[p_z, p_c] (+ U V^T), channel-major, from explicit loops."""
    (cc, gc), (cz, gz) = fb.c_layout, fb.z_layout
    m = _explicit_position_map(gc, gz)
    pz, pc = gz * gz, gc * gc
    b = torch.zeros(cz * pz, cc * pc, dtype=torch.float64)
    ch = fb.channel.detach().double()
    for o in range(cz):
        for c in range(cc):
            b[o * pz:(o + 1) * pz, c * pc:(c + 1) * pc] = ch[o, c] * m
    if fb.rank:
        b = b + (fb.u @ fb.v).detach().double()
    return b


LAYOUTS = [((3, 4), (5, 4)), ((3, 2), (2, 4)), ((4, 4), (3, 2)), ((6, 1), (2, 4))]


@pytest.mark.parametrize("rank", [0, 2])
@pytest.mark.parametrize("c_layout, z_layout", LAYOUTS, ids=lambda v: f"{v[0]}x{v[1]}^2")
def test_shared_b_is_the_channel_map_times_the_position_map(c_layout, z_layout, rank):
    torch.manual_seed(0)
    (cc, gc), (cz, gz) = c_layout, z_layout
    d_c, d_z = cc * gc * gc, cz * gz * gz
    fb = Feedback(d_c, d_z, rank=rank, structure="shared", c_layout=c_layout, z_layout=z_layout).double()
    assert fb.structure == "shared" and fb.weight is None and fb.channel.shape == (cz, cc)
    torch.testing.assert_close(fb.position_map().double(), _explicit_position_map(gc, gz), rtol=0, atol=0)
    want = _dense_by_hand(fb)
    torch.testing.assert_close(fb.matrix().double(), want, rtol=1e-14, atol=1e-15)
    c = torch.randn(7, d_c, dtype=torch.float64)
    torch.testing.assert_close(fb(c), c @ want.T, rtol=1e-12, atol=1e-14)
    # The penalty is |B|_F^2 of that whole matrix, cross term included.
    torch.testing.assert_close(fb.l2(), want.pow(2).sum(), rtol=1e-12, atol=0)
    assert sum(p.numel() for p in fb.parameters()) == feedback_numel(d_c, d_z, rank, channels=(cc, cz))


@pytest.mark.parametrize("rank", [0, 16])
def test_shared_b_starts_at_the_dense_init_scale(rank):
    """A cell's (B c) sums C_c entries of variance 1 / (3 C_c) (nn.Linear's init): the dense B's per-coordinate
    scale, whose d_c entries have variance 1 / (3 d_c); with a coupling, each term carries half of it."""
    torch.manual_seed(0)
    fb = Feedback(256 * 16, 192 * 16, rank=rank, structure="shared", c_layout=(256, 4), z_layout=(192, 4))
    share = 0.5 if rank else 1.0
    assert abs(fb.channel.var().item() * 3 * 256 / share - 1) < 0.05
    c = torch.randn(512, 256 * 16)
    ratio = fb(c).var().item() / Feedback(256 * 16, 192 * 16)(c).var().item()
    assert 0.9 < ratio < 1.1


def test_shared_b_on_one_cell_is_the_dense_b_and_bad_grids_are_named():
    one = Feedback(6, 4, structure="shared", c_layout=(6, 1), z_layout=(4, 1))
    assert one.structure == "dense" and one.weight.shape == (4, 6)
    with pytest.raises(ValueError, match="3x3 context grid onto the layer's 2x2 grid"):
        Feedback(2 * 9, 2 * 4, structure="shared", c_layout=(2, 3), z_layout=(2, 2))
    with pytest.raises(ValueError, match="needs the \\(channels, grid\\) layout"):
        Feedback(8, 8, structure="shared")
    with pytest.raises(ValueError, match="feedback=identity has none"):
        Feedback(8, 8, "identity", structure="shared", c_layout=(2, 2), z_layout=(2, 2))
    with pytest.raises(ValueError, match="unknown b_structure 'banded'"):
        Feedback(8, 8, structure="banded")
    with pytest.raises(ValueError, match="is a dense B; use b_structure=dense"):
        Feedback(8, 8, rank=8, structure="shared", c_layout=(2, 2), z_layout=(2, 2))


@pytest.mark.parametrize("name", ["clapp++", "clapp++dfb", "clapp++both"])
@pytest.mark.parametrize("rank", [0, 3])
def test_shared_loss_and_gradients_equal_the_dense_b_built_by_hand(name, rank):
    """The rule with shared B and the same rule with the dense B of `_dense_by_hand`: the same loss and dL/dh;
    dL/dB_ch = sum_{p_z, p_c} (dL/dB)[(o, p_z), (c, p_c)] M[p_z, p_c], dL/dU = (dL/dB) V, dL/dV^T = U^T dL/dB."""
    enc, shapes = _vgg()
    opts = {"b_structure": "shared", "b_rank": rank, "b_l2": 1e-2, "f": "softplus"}
    shared = build_rule(name, shapes, opts, grids=GRIDS).double()
    dense = build_rule(name, shapes, {"b_l2": 1e-2, "f": "softplus"}, grids=GRIDS).double()
    pairs = list(zip([*shared.same, *shared.top], [*dense.same, *dense.top]))
    assert any(ms.structure == "shared" for ms, _ in pairs)
    with torch.no_grad():
        for ms, md in pairs:
            md.weight.copy_(_dense_by_hand(ms) if ms.structure == "shared" else ms.matrix())
    x = make_views((3, 16, 16), dtype=torch.float64)
    outs = [h.detach() for h in enc.double()(x)]
    top = outs[-1] if shared.needs_top_context else None
    for g, group in enumerate(shared.groups()):
        h = outs[group.output].clone().requires_grad_()
        h2 = h.detach().clone().requires_grad_()
        loss_s, loss_d = shared.loss(g, h, top), dense.loss(g, h2, top)
        torch.testing.assert_close(loss_s, loss_d, rtol=1e-12, atol=1e-14)
        owned = {id(p) for p in shared.group_parameters(g)}
        mine = [(ms, md) for ms, md in pairs if any(id(p) in owned for p in ms.parameters())]
        gs = torch.autograd.grad(loss_s, [h, *[p for ms, _ in mine for p in ms.parameters()]])
        gd = torch.autograd.grad(loss_d, [h2, *[md.weight for _, md in mine]])
        torch.testing.assert_close(gs[0], gd[0], rtol=1e-10, atol=1e-14)
        at = 1
        for (ms, _), db in zip(mine, gd[1:]):
            if ms.structure == "dense" and ms.rank == 0:  # a one-cell layer keeps the dense B
                torch.testing.assert_close(gs[at], db, rtol=1e-10, atol=1e-14)
                at += 1
                continue
            if ms.structure == "shared":
                (cc, gc), (cz, gz) = ms.c_layout, ms.z_layout
                m = _explicit_position_map(gc, gz)
                want = torch.einsum("opcq,pq->oc", db.reshape(cz, gz * gz, cc, gc * gc), m)
                torch.testing.assert_close(gs[at], want, rtol=1e-10, atol=1e-14)
                at += 1
            if ms.rank:  # U then V^T (after the channel map; a one-cell layer: the dense form's U V^T alone)
                du, dv = gs[at], gs[at + 1]
                torch.testing.assert_close(du, db @ ms.v.detach().t(), rtol=1e-10, atol=1e-14)
                torch.testing.assert_close(dv, ms.u.detach().t() @ db, rtol=1e-10, atol=1e-14)
                at += 2


@pytest.mark.parametrize("rank", [0, 4])
def test_shared_flop_formula_matches_the_flop_counter(rank):
    """B c forward and the weight gradients of a trainable shared B, counted by torch's FLOP counter
    (the bench's tool), equal `shared_feedback_flops` (the context is detached: no gradient into it)."""
    for c_layout, z_layout in [((8, 4), (6, 4)), ((8, 2), (6, 4)), ((8, 4), (6, 2))]:
        (cc, gc), (cz, gz) = c_layout, z_layout
        fb = Feedback(cc * gc * gc, cz * gz * gz, rank=rank, structure="shared", c_layout=c_layout,
                      z_layout=z_layout)
        c = torch.randn(5, cc * gc * gc)
        with FlopCounterMode(display=False) as fwd:
            out = fb(c)
        with FlopCounterMode(display=False) as bwd:
            out.sum().backward()
        assert fwd.get_total_flops() == 5 * shared_feedback_flops(c_layout, z_layout, rank, trainable=False)
        assert fwd.get_total_flops() + bwd.get_total_flops() == 5 * shared_feedback_flops(c_layout, z_layout, rank)


def test_shared_b_parameters_at_full_width():
    """VGG-6 at full width on CIFAR (grids 8, 4, 4, 4, 2, 2): CLAPP++'s same-layer B holds 201M parameters
    dense (METHODS 2.2: up to 8192 x 8192), the shared channel maps 2.5M (C_l^2 each)."""
    from localssl.models import build_encoder

    shapes = build_encoder("vgg6", width=1.0, in_channels=3).feature_shapes((3, 32, 32))
    grids = [8, 4, 4, 4, 2, 2]
    dense = build_rule("clapp++", shapes, {}, grids=grids)
    shared = build_rule("clapp++", shapes, {"b_structure": "shared"}, grids=grids)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_dense == sum(d * d for d in dense.dims) > 200e6
    assert n_shared == sum(s[0] ** 2 for s in shapes) == 128 ** 2 + 2 * 256 ** 2 + 512 ** 2 + 2 * 1024 ** 2
