"""``fastkd.optim.Langevin``: the fused Langevin step as a torch.optim.Optimizer."""
from __future__ import annotations

import torch

from ..ops.langevin import langevin_step_

_MIX0, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix_seed(seed: int, step: int, index: int) -> int:
    z = (seed * _MIX0 + (step + 1) * _MIX1 + (index + 1) * _MIX2) & (2**64 - 1)
    z ^= z >> 31
    z = (z * _MIX1) & (2**64 - 1)
    z ^= z >> 29
    return z & (2**63 - 1)


class Langevin(torch.optim.Optimizer):
    """x <- clamp(x - lr * (grad + tv_weight * d TV / dx) + noise_std * xi) per parameter.

    A drop-in for ``torch.optim.SGD`` in synthesis loops (LAKE's explicit Langevin
    dynamics); see :func:`fastkd.ops.langevin_step_` for the arguments. lr may be a float
    or a per-sample tensor (N,). With ``seed`` set, step t of parameter i uses a seed
    derived from (seed, t, i), so a run is reproducible; with ``seed=None`` every step
    draws one from torch's default generator.
    """

    def __init__(self, params, lr=1e-2, *, noise_std=None, clamp=None, tv_weight: float = 0.0,
                 tv_p: int = 1, seed: int | None = None, backend: str = "auto") -> None:
        if not isinstance(lr, torch.Tensor):
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
                raise ValueError(f"Langevin: lr must be > 0, got {lr!r}")
        if clamp is not None and (not isinstance(clamp, (tuple, list)) or len(clamp) != 2
                                  or not clamp[0] < clamp[1]):
            raise ValueError(f"Langevin: clamp must be None or (lo, hi) with lo < hi, got {clamp!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"Langevin: seed must be None or a non-negative int, got {seed!r}")
        defaults = dict(lr=lr, noise_std=noise_std, clamp=clamp, tv_weight=tv_weight, tv_p=tv_p,
                        backend=backend)
        super().__init__(params, defaults)
        self.seed = seed
        self._steps = 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    index += 1
                    continue
                seed = None if self.seed is None else _mix_seed(self.seed, self._steps, index)
                langevin_step_(p, p.grad, group["lr"], noise_std=group["noise_std"], clamp=group["clamp"],
                               tv_weight=group["tv_weight"], tv_p=group["tv_p"], seed=seed,
                               backend=group["backend"])
                index += 1
        self._steps += 1
        return loss
