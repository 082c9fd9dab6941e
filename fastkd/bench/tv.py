"""tv_loss benchmark: fused backends vs eager slicing, torch.compile of it, and kornia."""
from __future__ import annotations

import torch

import fastkd
from fastkd.ops import tv_loss, tv_loss_and_grad

from .core import Case


def _eager_tv(x):
    # What users write by hand (and what kornia.losses.total_variation does): slicing.
    dh = x[:, :, 1:, :] - x[:, :, :-1, :]
    dw = x[:, :, :, 1:] - x[:, :, :, :-1]
    return (dh.abs().sum() + dw.abs().sum()) / (dh.numel() + dw.numel())


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        shapes = [(256, 3, 224, 224)] if quick else [(256, 3, 32, 32), (64, 3, 64, 64), (256, 3, 224, 224)]
    else:
        shapes = [(64, 3, 64, 64)] if quick else [(64, 3, 64, 64), (256, 3, 32, 32), (8, 3, 224, 224)]
    fused = [b for b in ("cuda", "triton", "cpp") if fastkd.backends()[b].available
             and (b != "triton" or device == "cuda") and (b != "cpp" or device == "cpu")
             and (b != "cuda" or device == "cuda")]
    out = []
    compiled = torch.compile(_eager_tv)
    try:
        import kornia

        kornia_tv = kornia.losses.total_variation
    except Exception:
        kornia_tv = None
    for shape in shapes:
        x = torch.randn(shape, device=device, requires_grad=True)

        def zero(x=x):
            x.grad = None

        def bwd(f, x=x):
            def go():
                f(x).backward()
            return go

        impls = {"eager": bwd(_eager_tv), "torch.compile(eager)": bwd(compiled)}
        if kornia_tv is not None:
            n_terms = x[:, :, 1:].numel() + x[..., 1:].numel()
            impls["kornia.total_variation"] = bwd(lambda t: kornia_tv(t, reduction="sum").sum() / n_terms)
        for b in fused:
            impls[f"fastkd[{b}]"] = bwd(lambda t, b=b: tv_loss(t, backend=b))
            impls[f"fastkd[{b}] fused fwd+grad only"] = (
                lambda b=b, x=x: tv_loss_and_grad(x.detach(), backend=b))
        out.append(Case("tv_loss", "x".join(map(str, shape)), "float32", impls,
                        bytes=8.0 * x.numel(), setup=zero,
                        note="fwd+bwd; bytes bound = read x + write grad (8 B/elem)"))
    return out


OPS = {"tv_loss": cases}
