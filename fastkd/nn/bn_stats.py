"""``BNStatsLoss``: DeepInversion's BatchNorm-statistics prior over every BN layer of a teacher."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .. import ops


class BNStatsLoss(nn.Module):
    """Sum over a teacher's BatchNorm layers of ||batch mean - running mean|| + ||batch var - running var||.

    Forward hooks on every BatchNorm layer (1d, 2d, 3d; with running statistics) record
    :func:`fastkd.ops.bn_stats_loss` of the layer's input during each teacher forward
    pass; calling the module returns the sum of the terms recorded since the last call
    (and forgets them)::

        bn = BNStatsLoss(teacher)
        logits = teacher(x)          # terms recorded
        loss = ce + 10.0 * bn()      # summed and cleared

    Recording can be switched off for forward passes that do not need it
    (``with bn.paused(): ...``); :meth:`remove` detaches the hooks. The teacher is
    normally in eval mode, so the layers normalise with their running statistics.

    Raises ValueError when the teacher has no BatchNorm layer with running statistics.
    """

    def __init__(self, teacher: nn.Module, *, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"BNStatsLoss: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        layers = [(name, m) for name, m in teacher.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
                  and m.running_var is not None]
        if not layers:
            raise ValueError(
                f"BNStatsLoss: the teacher ({type(teacher).__name__}) has no BatchNorm layer with running "
                "statistics, so there is nothing to align; turn the BN-statistics term off (weight 0) "
                "for this teacher")
        self.backend = backend
        self.layer_names = [name for name, _ in layers]
        self.enabled = True
        self._terms: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for _, m in layers]

    def _hook(self, module, inputs, output) -> None:
        if not self.enabled:
            return
        x = inputs[0]
        if x.dim() == 3:        # BatchNorm1d on (N, C, L)
            x = x.unsqueeze(-1)
        elif x.dim() == 5:      # BatchNorm3d on (N, C, D, H, W)
            x = x.flatten(3)
        self._terms.append(ops.bn_stats_loss(x, module.running_mean, module.running_var,
                                             backend=self.backend))

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @contextlib.contextmanager
    def paused(self):
        """Run teacher forward passes without recording the term."""
        prev, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = prev

    def reset(self) -> None:
        self._terms = []

    def forward(self) -> torch.Tensor:
        if not self._terms:
            raise RuntimeError("BNStatsLoss: no term recorded; run the teacher forward first "
                               "(with recording enabled)")
        out = self._terms[0]
        for t in self._terms[1:]:
            out = out + t
        self._terms = []
        return out

    def remove(self) -> None:
        """Detach the hooks from the teacher."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._terms = []

    def extra_repr(self) -> str:
        return f"layers={self.num_layers}, backend={self.backend!r}"
