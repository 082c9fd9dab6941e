"""`fastkd info --check`: every available backend of every op against the reference.

For each device present (the CPU, every visible CUDA device) and each backend that can run
there (cpp, cuda, triton, torch; Triton on the CPU under ``TRITON_INTERPRET=1``), each op
runs on small fixed inputs in float32 and float64; its outputs and input gradients are
compared with the plain-PyTorch reference computed on the CPU from the same inputs. The
error is the largest absolute difference divided by the largest reference value. The
shapes span several thread blocks / programs with partial tails.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

F32, F64 = torch.float32, torch.float64


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable  # (backend or None for the reference, device, dtype) -> list of tensors
    backends: tuple = ("cuda", "triton", "cpp", "torch")
    tol: tuple = (1e-4, 1e-9)  # (float32, float64)


@dataclass
class Row:
    op: str
    device: str
    backend: str
    dtype: str
    error: float
    tol: float
    ok: bool
    note: str = ""


def _inp(shape, dtype, device, seed, grad=False, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)
    return t.requires_grad_(grad)


def _grad(y, x):
    return torch.autograd.grad(y, x)[0]


def _tv(be, dev, dt):
    from fastkd.ops import tv_loss, tv_loss_reference

    x = _inp((3, 2, 19, 37), dt, dev, 1, grad=True)  # 1406 per sample: 2 blocks, the last partial
    y = tv_loss_reference(x, 1, True, "mean") if be is None else \
        tv_loss(x, p=1, diagonal=True, reduction="mean", backend=be)
    return [y, _grad(y, x)]


def _image_distance(be, dev, dt):
    from fastkd.ops import image_distance, image_distance_reference

    a, b = _inp((3, 2, 33, 17), dt, dev, 2, grad=True), _inp((3, 2, 33, 17), dt, dev, 3)
    y = image_distance_reference(a, b, 1, "mean") if be is None else \
        image_distance(a, b, p=1, reduction="mean", backend=be)
    return [y, _grad(y, a)]


def _contrastive(be, dev, dt):
    from fastkd.ops import cross_class_contrastive, cross_class_contrastive_reference

    p = _inp((70, 9), dt, dev, 4, grad=True)
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (70,), generator=g).to(dev)
    groups = (torch.randint(0, 3, (70,), generator=g) * 5).to(dev)
    y = cross_class_contrastive_reference(p, labels, groups, "mean") if be is None else \
        cross_class_contrastive(p, labels, groups=groups, reduction="mean", backend=be)
    return [y, _grad(y, p)]


def _langevin(noise: bool):
    def run(be, dev, dt):
        from fastkd.ops import langevin_step_, langevin_step_reference

        x, gr = _inp((2, 3, 21, 37), dt, dev, 6), _inp((2, 3, 21, 37), dt, dev, 7)
        lr = _inp((2,), dt, dev, 8).abs() * 0.1 + 0.05
        std = 0.3 if noise else 0.0
        if be is None:
            out = [langevin_step_reference(x, gr, lr, std, (-1.1, 0.9), 0.7, 2, seed=1234),
                   langevin_step_reference(x, gr, 0.1, std, None, 0.0, 1, seed=99)]
        else:
            a, b = x.clone(), x.clone()
            langevin_step_(a, gr, lr, noise_std=std, clamp=(-1.1, 0.9), tv_weight=0.7, tv_p=2, seed=1234,
                           backend=be)
            langevin_step_(b, gr, 0.1, noise_std=std, seed=99, backend=be)
            out = [a, b]
        return out
    return run


def _sqdist(be, dev, dt):
    from fastkd.ops import pairwise_sqdist, pairwise_sqdist_reference

    a, b = _inp((40, 37), dt, dev, 9, grad=True), _inp((33, 37), dt, dev, 10)
    with torch.no_grad():
        b[5] = a[3]  # an exactly zero distance: the cancellation path
    w = _inp((40, 33), dt, dev, 11)
    d = pairwise_sqdist_reference(a, b) if be is None else pairwise_sqdist(a, b, backend=be)
    return [d, _grad((d * w).sum(), a)]


def _sliced(be, dev, dt):
    from fastkd.ops import wasserstein

    a, b = _inp((24, 70), dt, dev, 12, grad=True), _inp((24, 70), dt, dev, 13, shift=0.5)
    y = wasserstein(a, b, method="sliced", n_projections=20, seed=5, backend=be or "torch")
    return [y, _grad(y, a)]


def _bn_stats(channels_last: bool):
    def run(be, dev, dt):
        return _bn_stats_run(be, dev, dt, channels_last)
    return run


def _bn_stats_run(be, dev, dt, channels_last):
    from fastkd.ops import bn_stats_loss, bn_stats_loss_reference

    x = _inp((6, 4, 29, 31), dt, dev, 14)  # 5394 per channel: several chunks
    if channels_last:  # what a BN hook sees in a channels-last network
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    rm, rv = _inp((4,), dt, dev, 15), _inp((4,), dt, dev, 16).abs() + 0.5
    y = bn_stats_loss_reference(x, rm, rv) if be is None else bn_stats_loss(x, rm, rv, backend=be)
    return [y, _grad(y, x)]


def _gmm(be, dev, dt):
    from fastkd.ops import gmm_fit

    g = torch.Generator().manual_seed(17)
    x = torch.cat([torch.rand(180, generator=g) * 0.3, torch.rand(120, generator=g) * 0.4 + 0.6]).to(dt).to(dev)
    fit = gmm_fit(x, backend=be or "torch")
    return [fit.prob_low, fit.means]


CHECKS = (
    Check("tv_loss", _tv),
    Check("image_distance", _image_distance),
    Check("cross_class_contrastive", _contrastive),
    Check("langevin_step_ (no noise)", _langevin(False)),
    # the normals are float32 on every backend, from different log/cos implementations
    Check("langevin_step_ (noise)", _langevin(True), tol=(1e-4, 1e-5)),
    Check("pairwise_sqdist", _sqdist),
    # the directions are float32 normals, computed in the kernels
    Check("wasserstein (sliced)", _sliced, tol=(1e-4, 1e-5)),
    Check("bn_stats_loss", _bn_stats(False)),
    Check("bn_stats_loss (NHWC)", _bn_stats(True)),
    # one float32 program whatever the dtype (fastkd.ops.gmm)
    Check("gmm_fit", _gmm, backends=("triton", "torch"), tol=(1e-4, 1e-4)),
)


def devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


def backends_for(device: str, supported) -> list[str]:
    """The backends that can run ``supported`` ops on ``device`` here."""
    from fastkd import _backend as B

    dev = torch.device(device).type
    return [name for name in B.BACKENDS
            if name in supported and B.backend_status(name).available and B._device_ok(name, dev) is None]


def _error(got: list, want: list) -> float:
    err = 0.0
    for g, w in zip(got, want, strict=True):
        g, w = g.detach().cpu().double(), w.detach().double()
        if g.shape != w.shape:
            return math.inf
        if not torch.isfinite(g).all():
            return math.inf
        scale = max(float(w.abs().max()) if w.numel() else 0.0, 1e-30)
        if g.numel():
            err = max(err, float((g - w).abs().max()) / scale)
    return err


def run_checks(log=print, dtypes=(F32, F64)) -> list[Row]:
    rows = []
    for chk in CHECKS:
        for dt in dtypes:
            want = chk.run(None, "cpu", dt)
            tol = chk.tol[0 if dt == F32 else 1]
            for dev in devices():
                for be in backends_for(dev, chk.backends):
                    try:
                        err, note = _error(chk.run(be, dev, dt), want), ""
                    except Exception as e:  # noqa: BLE001 - a backend that raises fails the check
                        err, note = math.inf, f"{type(e).__name__}: {' '.join(str(e).split())}"[:160]
                    row = Row(chk.name, dev, be, str(dt).replace("torch.", ""), err, tol, err <= tol, note)
                    rows.append(row)
                    log(format_row(row))
    return rows


HEADER = f"{'op':<26} {'device':<7} {'backend':<7} {'dtype':<7} {'max error':>9}  {'tolerance':>9}  result"


def format_row(r: Row) -> str:
    err = "-" if math.isinf(r.error) else f"{r.error:.1e}"
    line = f"{r.op:<26} {r.device:<7} {r.backend:<7} {r.dtype:<7} {err:>9}  {r.tol:>9.0e}  " \
           f"{'ok' if r.ok else 'FAIL'}"
    return line + (f"  ({r.note})" if r.note else "")


def main(log=print) -> int:
    """Print the table; 0 when every check passes, 1 otherwise."""
    t0 = time.perf_counter()
    log("self-check: each backend against the plain-PyTorch reference; error = max |got - want| / "
        "max |want|")
    log(HEADER)
    rows = run_checks(log)
    bad = [r for r in rows if not r.ok]
    log(f"self-check: {len(rows)} checks on {', '.join(devices())}, {len(bad)} failed "
        f"({time.perf_counter() - t0:.1f}s)")
    return 1 if bad else 0
