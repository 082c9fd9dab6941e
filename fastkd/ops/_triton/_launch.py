"""What every Triton launch of fastkd shares: the device it runs on, the grid's limits, and
exact float64 scalar arguments.

* Device. Triton launches on the *current* CUDA device, whatever the tensors' device:
  every launch runs inside ``on_device(tensor)`` so that inputs on ``cuda:1`` run on
  ``cuda:1``.
* Grid. CUDA allows 2**31 - 1 programs on grid axis 0 and 65535 on axes 1 and 2. Every
  kernel here takes a one-dimensional grid and splits the program id itself; ``grid_1d``
  checks the count.
* Scalars. A compiled kernel receives a Python float as fp32 (the interpreter keeps it a
  double), which puts float64 results ~1e-7 relatively off. A kernel that may compute in
  float64 takes such a value as its IEEE-754 bit pattern in an int64 (``f64_bits`` on the
  host, ``from_bits`` in the kernel), or derives it from integers in the kernel. Those
  parameters are listed in ``do_not_specialize``: a pattern equal to 1 would otherwise
  become a compile-time constant.
"""
from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

# The most programs a CUDA grid may have on each axis.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def on_device(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current for a launch (nothing for a CPU tensor,
    which only Triton's interpreter runs)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def grid_1d(programs: int, op: str) -> tuple[int]:
    """A one-axis grid of ``programs`` programs; a clear error past the axis-0 limit."""
    if programs > GRID_LIMITS[0]:
        raise ValueError(f"{op} (triton backend): the input needs {programs} programs, more than the "
                         f"{GRID_LIMITS[0]} a CUDA grid allows; split the input")
    return (int(programs),)


def f64_bits(v: float) -> int:
    """The float64 bit pattern of ``v`` as a signed 64-bit integer (see ``from_bits``)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


@triton.jit
def from_bits(bits, ACC: tl.constexpr):
    """The float64 whose bit pattern is ``bits`` (from ``f64_bits``), in dtype ACC."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
