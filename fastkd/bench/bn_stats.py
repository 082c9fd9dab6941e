"""bn_stats_loss benchmark: fused backends vs DeepInversion's eager code and torch.compile of it."""
from __future__ import annotations

import torch

import fastkd
from fastkd.ops import bn_stats_loss, bn_stats_loss_reference

from .core import Case


def _eager_bn(x, rm, rv):
    # What DeepInversion's hook computes (mean, permute + contiguous + biased var, two norms).
    nch = x.shape[1]
    mean = x.mean([0, 2, 3]) if x.dim() == 4 else x.mean(0)
    xt = x.permute(1, 0, 2, 3) if x.dim() == 4 else x.t()
    var = xt.contiguous().view([nch, -1]).var(1, unbiased=False)
    return torch.norm(rv - var, 2) + torch.norm(rm - mean, 2)


def _fused(device: str) -> list[str]:
    st = fastkd.backends()
    out = []
    if device == "cuda":
        out += [b for b in ("cuda", "triton") if st[b].available]
    elif st["cpp"].available:
        out.append("cpp")
    return out


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        shapes = [(256, 64, 32, 32)] if quick else [(256, 64, 16, 16), (256, 64, 32, 32), (256, 512),
                                                     (128, 256, 56, 56)]
    else:
        shapes = [(256, 64, 8, 8)] if quick else [(256, 16, 16, 16), (256, 64, 8, 8), (256, 128),
                                                   (64, 64, 32, 32)]
    compiled = torch.compile(_eager_bn)
    out = []
    for shape in shapes:
        x = torch.randn(shape, device=device).mul_(1.3).add_(0.2).requires_grad_(True)
        rm = torch.randn(shape[1], device=device) * 0.1
        rv = torch.rand(shape[1], device=device) + 0.5

        def zero(x=x):
            x.grad = None

        def bwd(f, x=x, rm=rm, rv=rv):
            def go():
                f(x, rm, rv).backward()
            return go

        impls = {"eager": bwd(_eager_bn), "torch.compile(eager)": bwd(compiled),
                 "fastkd[torch] (reference)": bwd(bn_stats_loss_reference)}
        acc = {}
        with torch.no_grad():
            ref = bn_stats_loss_reference(x.double(), rm.double(), rv.double()).item()
        for b in _fused(device):
            impls[f"fastkd[{b}]"] = bwd(lambda t, m, v, b=b: bn_stats_loss(t, m, v, backend=b))
            with torch.no_grad():
                acc[f"fastkd[{b}]"] = abs(bn_stats_loss(x, rm, rv, backend=b).item() - ref) / abs(ref)
        with torch.no_grad():
            acc["eager"] = abs(_eager_bn(x, rm, rv).item() - ref) / abs(ref)
        out.append(Case("bn_stats_loss", "x".join(map(str, shape)), "float32", impls,
                        bytes=12.0 * x.numel(), setup=zero, accuracy=acc,
                        note="fwd+bwd; bytes bound = read x twice + write grad (12 B/elem); "
                             "err = relative loss error vs fp64"))
    return out


OPS = {"bn_stats_loss": cases}
