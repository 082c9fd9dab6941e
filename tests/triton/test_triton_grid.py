"""The launch grids of the Triton kernels: within CUDA's limits at edge sizes (pure Python),
and every kernel run in the interpreter at shapes with several programs and a masked
tail, against the reference.

    TRITON_INTERPRET=1 python -m pytest tests/triton
"""
import math

import pytest
import torch

from fastkd.ops import (bn_stats_loss, bn_stats_loss_reference, cross_class_contrastive,
                        cross_class_contrastive_reference, image_distance, image_distance_reference,
                        langevin_step_, langevin_step_reference, pairwise_sqdist, pairwise_sqdist_reference,
                        sliced_directions, tv_loss, tv_loss_reference)
from fastkd.ops._triton import bn_stats as tbn
from fastkd.ops._triton import image_distance as tid
from fastkd.ops._triton import ot as tot
from fastkd.ops._triton import tv as ttv
from fastkd.ops._triton._launch import GRID_LIMITS, grid_1d

from triton_env import DEVICE, requires_triton

pytestmark = requires_triton


def _within_limits(grid):
    return len(grid) <= 3 and all(1 <= g <= lim for g, lim in zip(grid, GRID_LIMITS))


# ------------------------------------------------------------------ grids at edge sizes
@pytest.mark.parametrize("name,grid", [
    # more samples than axis 1 allows (65535), each of several blocks
    ("tv_loss: N = 70000", lambda: ttv.tv_grid(70000, 3 * 32 * 32)[1]),
    ("image_distance: N = 70000", lambda: tid.image_distance_grid(70000, 3 * 32 * 32)[1]),
    # a channel with more than 65535 chunks
    ("bn_stats: 2**31 elements per channel", lambda: tbn.bn_partial_grid(64, 2**31)[2]),
    # D / 64 > 65535 column tiles
    ("sliced backprojection: D = 5M", lambda: tot.backproject_grid(8, 5_000_000)[1]),
    ("sliced projection: L = 2M", lambda: tot.project_grid(8, 2_000_000)[1]),
    ("pairwise_sqdist: M = 3M", lambda: tot.sqdist_grid(100, 3_000_000)[1]),
])
def test_grid_within_cuda_limits(name, grid):
    g = grid()
    assert _within_limits(g), f"{name}: grid {g}"


def test_grids_count_every_tile():
    assert ttv.tv_grid(70000, 3 * 32 * 32) == (3, (210000,))
    assert tid.image_distance_grid(5, 1025) == (2, (10,))
    iters, nchunk, grid = tbn.bn_partial_grid(64, 2**31)
    assert iters * nchunk * 1024 >= 2**31 and grid == (64 * nchunk,) and nchunk > 65535
    assert tot.backproject_grid(17, 5_000_000) == (2, (2 * math.ceil(5_000_000 / 64),))


def test_grid_past_the_limit_is_one_clear_error():
    assert grid_1d(2**31 - 1, "op") == (2**31 - 1,)
    with pytest.raises(ValueError, match=r"tv_loss \(triton backend\).*2147483647"):
        grid_1d(2**31, "tv_loss")
    assert grid_1d(0, "op") == (0,)


# ------------------------------------------------------------------ several programs, masked tails
F64 = dict(rtol=1e-10, atol=1e-10)


def _r(*shape, **kw):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE, **kw)


def test_tv_several_blocks_and_samples():
    x = _r(3, 2, 37, 29, requires_grad=True)  # 2146 elements per sample: 3 blocks, the last partial
    nblk, grid = ttv.tv_grid(3, 2 * 37 * 29)
    assert nblk == 3 and grid == (9,) and (2 * 37 * 29) % 1024
    xr = x.detach().clone().requires_grad_(True)
    for red in ("mean", "none"):
        got = tv_loss(x, p=2, diagonal=True, reduction=red, backend="triton")
        want = tv_loss_reference(xr, 2, True, red)
        torch.testing.assert_close(got, want, **F64)
        (gx,) = torch.autograd.grad(got.sum(), x)
        (gr,) = torch.autograd.grad(want.sum(), xr)
        torch.testing.assert_close(gx, gr, **F64)


def test_image_distance_several_blocks_and_samples():
    a, b = _r(3, 2, 33, 17, requires_grad=True), _r(3, 2, 33, 17)  # D = 1122: 2 blocks
    assert tid.image_distance_grid(3, 1122) == (2, (6,))
    ar = a.detach().clone().requires_grad_(True)
    got = image_distance(a, b, p=1, reduction="mean", backend="triton")
    want = image_distance_reference(ar, b, 1, "mean")
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(torch.autograd.grad(got, a)[0], torch.autograd.grad(want, ar)[0], **F64)


@pytest.mark.parametrize("index_bits", [32, 64])
def test_bn_stats_several_chunks_and_channels(index_bits, monkeypatch):
    if index_bits == 64:  # the path of inputs with 2**31 elements or more
        monkeypatch.setattr(tbn, "_I32_END", 0)
    x = _r(5, 3, 29, 31, requires_grad=True)  # 4495 per channel: 5 chunks, the last partial
    iters, nchunk, grid = tbn.bn_partial_grid(3, 5 * 29 * 31)
    assert nchunk == 5 and grid == (15,)
    rm, rv = _r(3), _r(3).abs()
    xr = x.detach().clone().requires_grad_(True)
    got = bn_stats_loss(x, rm, rv, backend="triton")
    want = bn_stats_loss_reference(xr, rm, rv)
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, xr)[0], **F64)


def test_pairwise_sqdist_several_tiles_both_ways():
    a, b = _r(70, 37), _r(45, 37)  # 3 x 2 tiles of 32, D = 37: two k-steps, the last partial
    assert tot.sqdist_grid(70, 45) == (3, (6,))
    b[44] = a[69]  # one cancelled entry in the last (partial) tile: recomputed in the kernel
    got = pairwise_sqdist(a, b, backend="triton")
    torch.testing.assert_close(got, pairwise_sqdist_reference(a, b), rtol=1e-9, atol=1e-9)
    assert got[69, 44] == 0


def test_sliced_projections_several_tiles():
    x = _r(40, 150)  # 3 row tiles of 16, L = 37: 3 direction tiles, D = 150: 3 column tiles
    assert tot.project_grid(40, 37) == (3, (9,)) and tot.backproject_grid(40, 150) == (3, (9,))
    proj, inv = torch.ops.fastkd_triton.sliced_project(x, 37, 5)
    theta = sliced_directions(150, 37, 5, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(proj, x @ theta, rtol=1e-5, atol=1e-5)
    g = _r(40, 37)
    back = torch.ops.fastkd_triton.sliced_backproject(g, inv, 150, 5)
    torch.testing.assert_close(back, g @ theta.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [False, True])
def test_contrastive_several_row_blocks(groups):
    p = _r(100, 70, requires_grad=True)  # 4 blocks of 32 rows, K = 70: two column steps of 64
    y = torch.randint(0, 5, (100,), device=DEVICE)
    g = torch.randint(0, 3, (100,), device=DEVICE) * 7 if groups else None
    pr = p.detach().clone().requires_grad_(True)
    got = cross_class_contrastive(p, y, groups=g, reduction="mean", backend="triton")
    want = cross_class_contrastive_reference(pr, y, g, "mean")
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(torch.autograd.grad(got, p)[0], torch.autograd.grad(want, pr)[0], **F64)


def test_contrastive_no_pairs_is_zero():
    p = _r(40, 3, requires_grad=True)
    y = torch.zeros(40, dtype=torch.int64, device=DEVICE)
    got = cross_class_contrastive(p, y, reduction="mean", backend="triton")
    assert got.item() == 0.0
    assert torch.equal(torch.autograd.grad(got, p)[0], torch.zeros_like(p))


@pytest.mark.parametrize("noise_std", [0.0, 0.3])
@pytest.mark.parametrize("shape,tv_weight", [((3, 5, 7, 11), 0.0), ((2, 3, 37, 70), 0.7), ((2, 3, 37, 72), 0.7),
                                             ((1, 2, 9, 4), 0.7)],
                         ids=["2 programs", "6 planes x 3 row tiles", "W % 4 == 0: one draw per block",
                              "W = 4"])
def test_langevin_several_programs(shape, tv_weight, noise_std):
    # 1155 elements: 289 Philox blocks, 2 programs of 256; with TV, 128-wide tiles of 16 rows.
    # Without noise a float64 step is exact; the normals themselves are float32.
    x, g = _r(*shape), _r(*shape)
    lr = torch.rand(shape[0], dtype=torch.float64, device=DEVICE) + 0.1
    want = langevin_step_reference(x, g, lr, noise_std, (-1.1, 0.9), tv_weight, 2, seed=99)
    got = x.clone()
    langevin_step_(got, g, lr, noise_std=noise_std, clamp=(-1.1, 0.9), tv_weight=tv_weight, tv_p=2, seed=99,
                   backend="triton")
    tol = dict(rtol=1e-12, atol=1e-12) if noise_std == 0.0 else dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("shape", [(5, 3, 29, 31), (4, 70, 9, 11)], ids=["C=3", "C=70: 2 channel blocks"])
def test_bn_stats_channels_last_in_place(shape):
    N, C, H, W = shape
    br, bc, iters, nchunk, grid = tbn.bn_partial_cl_grid(C, N * H * W)
    assert nchunk > 1 and grid[0] > 1 and (N * H * W) % (br * iters)
    x = _r(*shape).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    rm, rv = _r(C), _r(C).abs()
    xr = x.detach().contiguous().requires_grad_(True)
    got = bn_stats_loss(x, rm, rv, backend="triton")
    want = bn_stats_loss_reference(xr, rm, rv)
    torch.testing.assert_close(got, want, **F64)
    (gx,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(gx, torch.autograd.grad(want, xr)[0], **F64)
    assert gx.is_contiguous(memory_format=torch.channels_last)  # written in place, not via a copy
