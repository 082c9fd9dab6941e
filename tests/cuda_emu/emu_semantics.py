"""The host emulation's own CUDA semantics (probe kernels of emu_ops.cpp): warp shuffles and
ballots with partial warps, masks and exited lanes (reading a lane that does not take part
gives poison), barriers with exited threads, atomics, and rejected launch configurations."""
import math

import pytest
import torch

import emu_build

POISON_INT = float(0xDEADBEEF - 2**32)  # 0xdeadbeef read as a signed 32-bit int


@pytest.fixture(scope="module", autouse=True)
def _lib():
    emu_build.library()


def probe(name, threads, arg=0, blocks=1):
    return torch.ops.fastkd_emu.probe(name, threads, blocks, arg).tolist()


def test_shfl_down_full_and_partial_warp():
    out = probe("shfl_down", 40, 1)  # warp 0 full, warp 1 has lanes 0..7 only
    assert out[:31] == [float(t + 1) for t in range(31)]
    assert out[31] == 31.0  # source lane 32 is past the warp: own value (CUDA semantics)
    assert out[32:39] == [float(t + 1) for t in range(32, 39)]
    assert math.isnan(out[39])  # lane 8 of warp 1 does not exist: poison


def test_shfl_down_reads_exited_lane_as_poison():
    out = probe("shfl_down_exited", 32, 20)  # lanes 20..31 returned before the shuffle
    assert out[:19] == [float(t + 1) for t in range(19)]
    assert math.isnan(out[19])  # lane 20 has exited
    assert out[20:] == [-7.0] * 12  # (never written)


def test_shfl_down_delta_3():
    out = probe("shfl_down", 32, 3)
    assert out[:29] == [float(t + 3) for t in range(29)] and out[29:] == [29.0, 30.0, 31.0]


def test_shfl_xor_and_poison_for_integers():
    out = probe("shfl_xor", 48, 8)
    assert out[:48] == [float(t ^ 8) for t in range(48)]
    out = probe("shfl_xor", 40, 8)
    assert out[32:40] == [POISON_INT] * 8  # their partners, lanes 8..15 of warp 1, do not exist


def test_shfl_outside_mask_is_poison():
    out = probe("shfl_masked", 32, 4)
    assert all(out[t] == 4.0 for t in range(0, 32, 2))
    out = probe("shfl_masked", 32, 5)  # lane 5 is not in the mask
    assert all(math.isnan(out[t]) for t in range(0, 32, 2))


def test_ballot_partial_warp():
    out = probe("ballot", 40)
    assert out[0] == float(0xAAAAAAAA) and out[39] == float(0xAA)


def test_barrier_with_exited_threads():
    out = probe("barrier", 100, 10)  # threads 0..9 exit before the barrier
    assert out[10:99] == [float(t + 1) for t in range(10, 99)] and out[99] == -1.0


def test_atomics_across_blocks():
    out = probe("atomics", 96, blocks=5)
    assert out[1] == 480.0
    assert torch.tensor([out[2]], dtype=torch.float64).view(torch.float32)[0].item() == 480.0  # float atomics


@pytest.mark.parametrize("threads,blocks", [(0, 1), (32, 0), (1025, 1)])
def test_invalid_launch_raises(threads, blocks):
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        probe("ballot", threads, blocks=blocks)
