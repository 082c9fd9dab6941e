"""Every fastkd_triton op traces: torch.library.opcheck (schema, autograd registration,
fake tensors, AOT dispatch) and torch.compile(fullgraph=True) agree with the eager op.

Tracing needs compiled-kernel objects (``@triton.jit`` without TRITON_INTERPRET), running
needs a GPU; so these tests run in the main invocation and execute every launch on the
CPU tensors through Triton's interpreter (``_interpreted_launches``), while torch's
analysis of the kernels (which arguments they write) compiles their TTIR for sm_90.
On a GPU they run the real kernels.
"""
import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "") not in ("", "0"),
                                reason="tracing needs compiled-kernel objects: run without TRITON_INTERPRET")


def _load_aot():
    spec = importlib.util.spec_from_file_location("triton_aot", ROOT / "tools" / "triton_aot.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("triton_aot", mod)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def _interpreted_launches():
    """Launches of compiled kernels run in Triton's interpreter (CPU tensors, no GPU)."""
    if HAS_CUDA:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction, _patch_lang
    from triton.runtime.jit import JITFunction

    cache = {}

    def interp(jf):
        if jf.fn not in cache:
            cache[jf.fn] = InterpretedFunction(jf.fn)
        return cache[jf.fn]

    saved = JITFunction.run, JITFunction.__call__
    JITFunction.run = lambda self, *a, grid, warmup, **k: interp(self).run(*a, grid=grid, warmup=warmup, **k)
    def nested(self, *a, **k):
        # InterpretedFunction.__call__ patches triton.language and leaves the patches in
        # place, which breaks torch's later compile of the kernel: undo them after the call
        scope = _patch_lang(self.fn)
        try:
            return interp(self).rewrite()(*a, **k)
        finally:
            scope.restore()

    JITFunction.__call__ = nested
    try:
        with _load_aot().target_driver("cuda:90"):
            yield
    finally:
        JITFunction.run, JITFunction.__call__ = saved


@pytest.fixture(autouse=True)
def _launch_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    torch._dynamo.reset()
    with _interpreted_launches():
        yield
    torch._dynamo.reset()


def _t(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_(grad)


def _ops():
    from fastkd.ops._triton import bn_stats, contrastive, image_distance, langevin, ot, tv  # noqa: F401
    return torch.ops.fastkd_triton


def _cases():
    """(name, op, args): every fastkd_triton op, shapes with several programs and tails."""
    ops = _ops()
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0, 0, 1] * 4, device=DEVICE)
    groups = torch.tensor([0] * 17 + [3] * 23, device=DEVICE)
    x = _t(3, 2, 5, 7, grad=True)
    return [
        ("tv_loss_fwd", ops.tv_loss_fwd.default, (x, 1, True, 1, True)),
        ("image_distance_fwd", ops.image_distance_fwd.default, (_t(3, 2, 5, 7, grad=True), _t(3, 2, 5, 7), 1, 1, True)),
        ("cross_class_contrastive_fwd", ops.cross_class_contrastive_fwd.default,
         (_t(40, 5, grad=True), labels, groups, 1, True)),
        ("cross_class_contrastive_fwd/no groups", ops.cross_class_contrastive_fwd.default,
         (_t(40, 5, grad=True), labels, None, 2, True)),
        ("pairwise_sqdist_fwd", ops.pairwise_sqdist_fwd.default, (_t(37, 6, grad=True), _t(35, 6, grad=True))),
        ("sliced_project", ops.sliced_project.default, (_t(20, 70, grad=True), 18, 5)),
        ("sliced_backproject", ops.sliced_backproject.default, (_t(20, 18), _t(18).abs() + 0.1, 70, 5)),
        ("bn_stats_fwd", ops.bn_stats_fwd.default, (_t(4, 3, 5, 7, grad=True), _t(3), _t(3).abs())),
        ("bn_stats_fwd/channels_last", ops.bn_stats_fwd.default,
         (_t(4, 3, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_(True), _t(3), _t(3).abs())),
        ("bn_stats_bwd", ops.bn_stats_bwd.default,
         (_t(()), _t(4, 3, 5, 7), _t(3), _t(3).abs(), _t(3), _t(3).abs(), _t(2).abs() + 1)),
        ("langevin_step_", ops.langevin_step_.default,
         (_t(2, 3, 5, 7), _t(2, 3, 5, 7), None, 0.1, None, 0.3, True, -1.0, 1.0, 0.0, 1, 123)),
        ("langevin_step_/tv", ops.langevin_step_.default,
         (_t(2, 3, 5, 7), _t(2, 3, 5, 7), _t(2).abs(), 0.1, None, 0.3, False, 0.0, 0.0, 0.5, 2, 123)),
    ]


CASE_NAMES = [c[0] for c in _cases()]


def _case(name):
    return next(c for c in _cases() if c[0] == name)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_opcheck(name):
    _, op, args = _case(name)
    torch.library.opcheck(op, args)


def _clone(args):
    return tuple(a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args)


def _every_tensor_written(kernel_idx, constant_args_idx, kwargs, *rest):
    return [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("analysed", [True, False], ids=["analysed", "unanalysed"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_compile_fullgraph(name, analysed, monkeypatch):
    """analysed=False: torch could not analyse the kernels (as torch 2.11 with some kernels)
    and assumes that each launch writes every tensor argument; results must not change."""
    if not analysed:
        from torch._higher_order_ops import triton_kernel_wrap as tkw
        monkeypatch.setattr(tkw, "get_mutated_tensors", _every_tensor_written)
    _, op, args = _case(name)
    eager_args, comp_args = _clone(args), _clone(args)

    def f(*a):
        out = op(*a)
        return a[0] if out is None else out  # the in-place op returns nothing: compare x

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = f(*eager_args)
    got = compiled(*comp_args)
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if args[0].requires_grad:  # and the backward through the compiled graph
        w0 = want[0] if want[0].dim() == 0 else want[0].sum()
        g0 = got[0] if got[0].dim() == 0 else got[0].sum()
        (gw,) = torch.autograd.grad(w0, eager_args[0])
        (gg,) = torch.autograd.grad(g0, comp_args[0])
        torch.testing.assert_close(gg, gw, rtol=1e-12, atol=1e-12)
