#!/usr/bin/env python
"""Compile every Triton kernel of fastkd.ops._triton ahead of time for real GPU targets.

Triton's CPU interpreter (TRITON_INTERPRET=1) runs the kernels' Python without compiling
them, so it cannot see errors that a GPU hits on the first call: a value the launch
specialises into a compile-time constant, a 64-bit argument, a dtype a lowering rejects.
This script compiles each launch kernel to a cubin for each target, no GPU needed:

1. Record. The launch code (the ``fastkd_triton`` ops and ``gmm_fit_triton``) runs on
   small CPU tensors with ``JITFunction.run`` replaced by a recorder, for every input
   dtype, flag and block-size regime listed in ``CALLS`` below (one entry per op). So the
   dtypes, ``tl.constexpr`` values and launch options come from the real launch code.
   Every call is made twice: with freshly allocated inputs, and with inputs that are
   views at an odd element offset (which the launch code may pass through unaligned).
2. Specialise. Each recorded launch is compiled in four groups of its runtime scalars,
   the cases Triton specialises differently:
     div16  every integer argument a multiple of 16, every pointer 16-byte aligned
     plain  every integer argument not 1 and not a multiple of 16; the pointers that the
            offset run passed unaligned are unaligned
     one    every integer argument equal to 1 (Triton makes it a compile-time constant,
            unless the kernel lists it in do_not_specialize)
     i64    every integer argument >= 2**31 (passed as int64)
   A kernel's distinct configurations (pointer dtypes, constexpr values, launch options)
   are many (the Langevin TV kernel has 384), so each group compiles a covering subset
   (see ``_cover``): div16 covers every value of every constexpr and option, and every
   dtype paired with every value of every flag-like switch; the other groups cover every
   dtype and switch value with the smallest blocks. ``--exhaustive`` compiles every
   configuration in every group, with the slow regimes of ``CALLS`` added (tens of minutes).
3. Compile. Through Triton's own launch path (``JITFunction.warmup``: the same binder,
   specialisation and compile as a launch) with a stand-in driver that names the target,
   in a fresh temporary cache, in parallel processes (``--jobs``, default: all cores). A
   kernel needing more shared memory than the target has (it would compile, then fail to
   load) is a failure too.

A ``@triton.jit`` function of fastkd.ops._triton that no recorded launch reaches (neither
launched nor called from a launched kernel) is a failure: add its op to ``CALLS``.

Refuses to run with TRITON_INTERPRET on: the interpreter replaces the compiler.

Output: one line per kernel x target x group, a summary, exit status 1 on any failure.

    python tools/triton_aot.py [--target cuda:90 --target cuda:80] [--jobs N] [--exhaustive]

Works with Triton 3.6 and 3.8: it relies only on JITFunction.run / warmup and on
triton.runtime.driver's active driver, which both have.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import concurrent.futures as cf
import contextlib
import importlib
import inspect
import itertools
import math
import multiprocessing
import os
import pkgutil
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

PACKAGE = "fastkd.ops._triton"
DEFAULT_TARGETS = ("cuda:90", "cuda:80")
GROUPS = ("div16", "plain", "one", "i64")
_INT_VALUE = {"div16": 32, "plain": 7, "one": 1, "i64": 2**31 + 3}
_BASE_PTR = 1 << 20


# The most shared memory one block may use (the opt-in limit a launch checks), by arch.
SHARED_MEM = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448,
              120: 101376}


def interpreter_on() -> bool:
    """TRITON_INTERPRET set to a value that turns Triton's interpreter on."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on", "y")


# --------------------------------------------------------------------------- descriptors
# A recorded launch argument, in a form that pickles to the compile processes:
#   ("ptr", torch dtype, aligned)  a tensor        ("int", value)    a Python int
#   ("float", value)               a Python float  ("const", value)  anything else
class _Ptr:
    """Stands for a tensor in a launch: Triton reads only its dtype and data_ptr()."""

    def __init__(self, dtype, aligned: bool):
        self.dtype = dtype
        self._ptr = _BASE_PTR if aligned else _BASE_PTR + 4

    def data_ptr(self) -> int:
        return self._ptr


def _describe(v):
    import torch

    if isinstance(v, torch.Tensor):
        return ("ptr", v.dtype, v.data_ptr() % 16 == 0)
    if isinstance(v, bool):
        return ("const", v)
    if isinstance(v, int):
        return ("int", v)
    if isinstance(v, float):
        return ("float", v)
    return ("const", v)


def _materialise(d):
    kind = d[0]
    if kind == "ptr":
        return _Ptr(d[1], d[2])
    return d[1]


@dataclass
class Launch:
    """One recorded launch of one kernel: its arguments bound to parameter names."""
    module: str
    kernel: str
    params: dict            # name -> descriptor, in signature order
    options: dict           # launch options (num_warps, ...) -> value
    constexprs: tuple       # names of the tl.constexpr parameters

    def config_key(self):
        """What distinguishes compilations apart from the runtime scalars' values and
        the pointers' alignment: pointer dtypes, scalar kinds, constexpr values, options."""
        key = []
        for name, d in self.params.items():
            if name in self.constexprs:
                key.append((name, "dtype" if _is_dtype(d[1]) else "=", repr(d[1])))
            elif d[0] == "ptr":
                key.append((name, "*", str(d[1])))
            else:
                key.append((name, d[0]))
        key.extend((k, "opt", repr(v)) for k, v in sorted(self.options.items()))
        return tuple(key)

    def features(self):
        """(argument, value) facts a covering set must include: pointer dtypes, constexpr
        values, options."""
        return frozenset(k for k in self.config_key() if len(k) == 3)

    def describe(self) -> str:
        parts = []
        for name, d in self.params.items():
            if name in self.constexprs:
                parts.append(f"{name}={_short(d[1])}")
            elif d[0] == "ptr":
                parts.append(f"{name}:{str(d[1]).replace('torch.', '')}")
        parts.extend(f"{k}={v}" for k, v in sorted(self.options.items()))
        return " ".join(parts)

    def specialised(self, group: str, unaligned: frozenset) -> "Launch":
        params = {}
        for name, d in self.params.items():
            if name in self.constexprs:
                params[name] = d
            elif d[0] == "int":
                params[name] = ("int", _INT_VALUE[group])
            elif d[0] == "ptr":
                params[name] = ("ptr", d[1], not (group == "plain" and name in unaligned))
            else:
                params[name] = d
        return Launch(self.module, self.kernel, params, dict(self.options), self.constexprs)


def _is_dtype(v) -> bool:
    import torch
    import triton.language as tl

    return isinstance(v, (tl.dtype, torch.dtype))


def _short(v) -> str:
    s = str(v)
    return s.replace("torch.", "")


# --------------------------------------------------------------------------- the call table
# One entry per op with Triton kernels: a function that calls the op's launch code for
# every input dtype, flag and block-size regime a real call can produce. ``t(shape,
# dtype)`` makes an input tensor (fresh, or a view at an odd offset in the offset run);
# ``full`` (--exhaustive) adds regimes too slow to compile by default.
def _floats():
    import torch

    return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _calls_langevin(t, full):
    import torch
    from fastkd.ops._triton import langevin as m

    # (N, C, H, W) regimes of the TV kernel's tile: BW = next_pow2(W), R = rows per tile.
    tv_shapes = [(2, 1, 2, 1), (2, 3, 5, 7), (1, 2, 64, 64), (1, 1, 3, 3000)]
    for dtype in _floats():
        for lr_t, (std_t, std), clamp in itertools.product(
                (False, True), ((False, 0.0), (False, 0.3), (True, 0.3)), (False, True)):
            for tv_weight, tv_p, shape in [(0.0, 1, (4, 3, 5, 7))] + [
                    (0.5, p, s) for p in (1, 2) for s in tv_shapes]:
                x = t(shape, dtype)
                g = t(shape, dtype)
                lr = t((shape[0],), torch.float32) if lr_t else None
                sd = t((shape[0],), torch.float32) if std_t else None
                m.langevin_step_(x, g, lr, 0.1, sd, std, clamp, -1.0 if clamp else 0.0,
                                 1.0 if clamp else 0.0, tv_weight, tv_p, 12345)


def _calls_tv(t, full):
    from fastkd.ops._triton import tv as m

    for dtype in _floats():
        for p, diag, red, need_grad in itertools.product((1, 2), (False, True), (0, 1), (False, True)):
            m.tv_loss_fwd(t((2, 3, 5, 7), dtype), p, diag, red, need_grad)


def _calls_image_distance(t, full):
    from fastkd.ops._triton import image_distance as m

    for dtype in _floats():
        for p, red, need_grad in itertools.product((1, 2), (0, 1), (False, True)):
            m.image_distance_fwd(t((3, 2, 5, 7), dtype), t((3, 2, 5, 7), dtype), p, red, need_grad)


def _calls_bn_stats(t, full):
    import torch
    from fastkd.ops._common import compute_dtype
    from fastkd.ops._triton import bn_stats as m

    # i32_end 0: the 64-bit index path (inputs of 2**31 elements and more)
    saved = m._I32_END
    try:
        for dtype, i32_end in itertools.product(_floats(), (saved, 0)):
            m._I32_END = i32_end
            cd = compute_dtype(dtype)
            for shape, cl in (((4, 3, 5, 7), False), ((6, 3), False), ((4, 3, 5, 7), True), ((2, 70, 3, 5), True)):
                x = t(shape, dtype)
                if cl:  # channels-last activations: read in place
                    x = x.contiguous(memory_format=torch.channels_last)
                C = shape[1]
                loss, mean, var, norms = m.bn_stats_fwd(x, t((C,), cd), t((C,), cd))
                m.bn_stats_bwd(t((), dtype), x, mean, var, t((C,), cd), t((C,), cd), norms.abs() + 1.0)
    finally:
        m._I32_END = saved


def _calls_contrastive(t, full):
    import torch
    from fastkd.ops._triton import contrastive as m

    # K regimes: BLOCK_K = min(next_pow2(K), 64) from 1 up to 64.
    for dtype in _floats():
        for K, red, need_grad in itertools.product((1, 3, 64, 100), (1, 2), (False, True)):
            labels = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0, 0, 1])
            groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
            m.cross_class_contrastive_fwd(t((10, K), dtype), labels, groups, red, need_grad)


def _calls_ot(t, full):
    import torch
    from fastkd.ops._triton import ot as m

    for dtype in _floats():
        a, b = t((5, 70), dtype), t((37, 70), dtype)
        m.pairwise_sqdist_fwd(a, b)
        proj, inv = m.sliced_project(a, 50, 7)
        ct = torch.float64 if dtype == torch.float64 else torch.float32
        m.sliced_backproject(t((5, 50), dtype), t((50,), ct), 70, 7)


def _calls_gmm(t, full):
    import torch
    from fastkd.ops._triton import gmm as m

    # N regimes: BLOCK = max(16, next_pow2(N)) and num_warps 4 / 8 / 16. The largest
    # block (N up to 2**16) compiles like 16384 but takes ~25 s: only with ``full``.
    for dtype in _floats():
        for n in (2, 100, 3000, 9000) + ((1 << 16,) if full else ()):
            s = t((n,), dtype)
            m.gmm_fit_triton(s, torch.isfinite(s), 10, 1e-2, 5e-4)


CALLS = {
    "langevin_step_": _calls_langevin,
    "tv_loss": _calls_tv,
    "image_distance": _calls_image_distance,
    "bn_stats_loss": _calls_bn_stats,
    "cross_class_contrastive": _calls_contrastive,
    "pairwise_sqdist / sliced projections": _calls_ot,
    "gmm_fit": _calls_gmm,
}


# --------------------------------------------------------------------------- recording
def _make_input(offset: bool):
    import torch

    gen = torch.Generator().manual_seed(0)

    def t(shape, dtype):
        n = 1
        for s in shape:
            n *= s
        base = torch.rand(n + 1, generator=gen, dtype=torch.float64) + 0.5
        base = base.to(dtype)
        return (base[1:] if offset else base[:n]).view(shape)

    return t


@contextlib.contextmanager
def _recording(sink: list):
    """Replace JITFunction.run: a launch records its kernel and arguments, runs nothing."""
    from triton.runtime.jit import JITFunction

    def run(self, *args, grid, warmup, **kwargs):
        sig = inspect.signature(self.fn)
        names = list(sig.parameters)
        opts = {k: v for k, v in kwargs.items() if k not in names}
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        constexprs = tuple(p.name for p in self.params if p.is_constexpr)
        sink.append(Launch(self.fn.__module__, self.fn.__name__,
                           {k: _describe(v) for k, v in bound.arguments.items()}, opts, constexprs))
        return None

    saved = JITFunction.run
    JITFunction.run = run
    try:
        yield
    finally:
        JITFunction.run = saved


def record(calls=None, full: bool = False):
    """Run the call table; returns (launches of the fresh run, of the offset run, errors)."""
    calls = CALLS if calls is None else calls
    runs = {False: [], True: []}
    errors = []
    for offset in (False, True):
        for op, fn in calls.items():
            sink = []
            try:
                with _recording(sink):
                    fn(_make_input(offset), full)
            except Exception as e:  # a broken table entry is a failure, not a crash
                errors.append(f"{op}: the recorded call raised {type(e).__name__}: {e}")
            runs[offset].extend(sink)
    return runs[False], runs[True], errors


# --------------------------------------------------------------------------- coverage check
def jit_functions(package: str = PACKAGE) -> dict:
    """(module, name) -> JITFunction for every @triton.jit function of the package."""
    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(package)
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{package}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                out[(mod.__name__, obj.fn.__name__)] = obj
    return out


def _callees(jf) -> set:
    """(module, name) of the JIT functions a JIT function's body names."""
    from triton.runtime.jit import JITFunction

    out = set()
    glb = jf.fn.__globals__
    for node in ast.walk(ast.parse(jf.src)):
        obj = None
        if isinstance(node, ast.Name):
            obj = glb.get(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            obj = getattr(glb.get(node.value.id), node.attr, None)
        if isinstance(obj, JITFunction):
            out.add((obj.fn.__module__, obj.fn.__name__))
    return out


def uncovered(launched: set, package: str = PACKAGE) -> list:
    """JIT functions of the package neither launched nor called from a launched kernel."""
    allf = jit_functions(package)
    seen, todo = set(), [k for k in launched if k in allf]
    while todo:
        k = todo.pop()
        if k in seen:
            continue
        seen.add(k)
        todo.extend(c for c in _callees(allf[k]) if c in allf and c not in seen)
    return sorted(k for k in allf if k not in seen)


# --------------------------------------------------------------------------- selection
def _cost(ln: Launch) -> int:
    """A launch's size, a proxy for its compile time: its integer constexprs (block sizes)
    and warps multiplied."""
    c = ln.options.get("num_warps", 4)
    for name in ln.constexprs:
        d = ln.params[name]
        if d[0] == "int" and d[1] > 0:
            c *= d[1]
    return c


def _cover(launches: list, baseline: bool) -> list:
    """A small subset of launches (greedy) that covers

    * baseline (group div16): every value of every feature, and every dtype (a pointer's
      dtype, a dtype constexpr such as ACC) paired with every value of every switch (an
      argument taking at most two values: a flag, P) that occur together;
    * otherwise: every dtype and every switch value. These groups vary the runtime
      scalars, whose code does not depend on block sizes and warps; those are compiled
      once each in the baseline.
    """
    nvals: dict = {}
    for ln in launches:
        for f in ln.features():
            nvals.setdefault((f[0], f[1]), set()).add(f[2])

    def is_dtype(f):
        return f[1] in ("*", "dtype")

    def is_switch(f):
        return not is_dtype(f) and len(nvals[(f[0], f[1])]) <= 2

    def units(ln):
        f = sorted(ln.features())
        if not baseline:
            return {(x,) for x in f if is_dtype(x) or is_switch(x)}
        return {(x,) for x in f} | {(a, b) for a, b in itertools.combinations(f, 2)
                                    if (is_dtype(a) and is_switch(b)) or (is_dtype(b) and is_switch(a))}

    us = [units(ln) for ln in launches]
    # Among equally useful launches prefer a typical block: the (lower) median size, not
    # the largest (slow to compile) nor a degenerate one-element block.
    sizes = sorted({_cost(ln) for ln in launches})
    typical = math.log(sizes[(len(sizes) - 1) // 2]) if sizes else 0.0
    cost = [abs(math.log(_cost(ln)) - typical) for ln in launches]
    everything = set().union(*us) if us else set()
    rng = random.Random(0)  # greedy from a few fixed tie-break orders; keep the smallest
    best = None
    for attempt in range(32):
        order = list(range(len(launches)))
        if attempt:
            rng.shuffle(order)
        todo, pick = set(everything), []
        while todo:
            i = max(order, key=lambda i: (len(us[i] & todo), -cost[i]))
            pick.append(i)
            todo -= us[i]
        if best is None or (len(pick), sum(cost[i] for i in pick)) < (len(best), sum(cost[i] for i in best)):
            best = pick
    if not best and launches:  # nothing to tell apart: compile the most typical one
        best = [min(range(len(launches)), key=lambda i: cost[i])]
    return [launches[i] for i in sorted(best or [])]


@dataclass
class Job:
    module: str
    kernel: str
    target: str
    group: str
    launches: list = field(default_factory=list)


def plan(fresh: list, offset: list, targets, exhaustive: bool = False) -> list:
    """Jobs, one per kernel x target x group, each with the launches to compile."""
    by_kernel: dict = {}
    for ln in fresh:
        by_kernel.setdefault((ln.module, ln.kernel), {}).setdefault(ln.config_key(), ln)
    unaligned: dict = {}
    for ln in offset:
        u = unaligned.setdefault((ln.module, ln.kernel), set())
        u.update(n for n, d in ln.params.items() if d[0] == "ptr" and not d[2] and n not in ln.constexprs)
    jobs = []
    for (module, kernel), configs in by_kernel.items():
        cfgs = list(configs.values())
        ua = frozenset(unaligned.get((module, kernel), ()))
        for target in targets:
            for group in GROUPS:
                if exhaustive:
                    pick = cfgs
                else:
                    pick = _cover(cfgs, baseline=group == "div16")
                jobs.append(Job(module, kernel, target, group, [c.specialised(group, ua) for c in pick]))
    return jobs


# --------------------------------------------------------------------------- compiling
def parse_target(s: str):
    from triton.backends.compiler import GPUTarget

    backend, _, arch = s.partition(":")
    if backend != "cuda" or not arch.isdigit():
        raise argparse.ArgumentTypeError(f"target must look like cuda:90, got {s!r}")
    return GPUTarget("cuda", int(arch), 32)


class _TargetDriver:
    """The part of a Triton driver that compiling needs: the current device and target."""

    def __init__(self, target, device: int):
        self.target = target
        self.device = device

    def is_active(self):
        return True

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def target_driver(target: str):
    """Make Triton compile for ``target`` ("cuda:90") with no GPU, restoring the driver."""
    from triton.runtime.driver import driver

    tgt = parse_target(target)
    saved = driver._active
    # One device id per target keeps the kernels' per-device caches apart.
    driver.set_active(_TargetDriver(tgt, 1000 + tgt.arch))
    try:
        yield tgt
    finally:
        driver._active = saved


def _reason(e: BaseException) -> str:
    """One line: where (innermost kernel source line) and the root error."""
    from triton.compiler.errors import CompilationError

    where, chain, seen = "", [], set()
    c = e
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        chain.append(c)
        c = c.__cause__ if c.__cause__ is not None or c.__suppress_context__ else c.__context__
    for c in chain:
        if isinstance(c, CompilationError) and getattr(c, "node", None) is not None and c.src:
            fn = c.src.split("(")[0].split()[-1] if c.src.lstrip().startswith("def") else "?"
            where = f"in {fn}, line {getattr(c.node, 'lineno', '?')} of its def: "
    root = chain[-1]
    if isinstance(root, CompilationError) and root.error_message:
        msg = " ".join(str(root.error_message).split())
    else:
        msg = f"{type(root).__name__}: " + (" ".join(str(root).split()) or repr(root))
    return f"{where}{msg}"[:400]


class OutOfResources(RuntimeError):
    """A compiled kernel the target could not load."""


def compile_launch(launch: Launch, target: str):
    """Compile one launch for ``target`` through Triton's launch path; returns the
    CompiledKernel. Raises what the compiler raises, and OutOfResources for a kernel
    that would compile but not load (more shared memory than the target has)."""
    mod = importlib.import_module(launch.module)
    jf = getattr(mod, launch.kernel)
    args = [_materialise(d) for d in launch.params.values()]
    with target_driver(target) as tgt:
        kernel = jf.warmup(*args, grid=(1,), **launch.options)
    limit = SHARED_MEM.get(tgt.arch)
    shared = getattr(kernel.metadata, "shared", 0)
    if limit is not None and shared > limit:
        raise OutOfResources(f"needs {shared} bytes of shared memory, sm_{tgt.arch} has {limit}")
    return kernel


def _compile_one(launch: Launch, target: str):
    """Worker: compile one launch; returns (failure reason or "", seconds)."""
    t0 = time.perf_counter()
    try:
        compile_launch(launch, target)
        err = ""
    except Exception as e:
        err = _reason(e)
    return err, time.perf_counter() - t0


def _worker_init(cache_dir: str):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    jit_functions()  # import torch, triton and the kernels while the parent records


def _ready():
    return os.getpid()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", default=None,
                    help="cuda:<arch>, repeatable (default: cuda:90 and cuda:80)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--exhaustive", action="store_true",
                    help="compile every recorded configuration in every group (slow)")
    args = ap.parse_args(argv)
    if interpreter_on():
        print(f"triton_aot: refusing to run with TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}: the "
              "interpreter compiles nothing; unset it (`env -u TRITON_INTERPRET python tools/triton_aot.py`)")
        return 2
    targets = args.target or list(DEFAULT_TARGETS)
    for tg in targets:
        try:
            parse_target(tg)
        except argparse.ArgumentTypeError as e:
            ap.error(str(e))

    t0 = time.perf_counter()
    cache_dir = tempfile.mkdtemp(prefix="triton-aot-")
    atexit.register(shutil.rmtree, cache_dir, True)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    import triton

    ok = fails = n_comp = 0
    jobs = []
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx,
                                initializer=_worker_init, initargs=(cache_dir,)) as pool:
        for _ in range(max(1, args.jobs)):  # start the compile processes now
            pool.submit(_ready)
        fresh, offset, errors = record(full=args.exhaustive)
        launched = {(ln.module, ln.kernel) for ln in fresh}
        missing = uncovered(launched)
        jobs = plan(fresh, offset, targets, args.exhaustive)
        n_comp = sum(len(j.launches) for j in jobs)
        print(f"triton {triton.__version__}: {len(launched)} launch kernels, {len(targets)} targets, "
              f"{len(GROUPS)} groups, {n_comp} compilations, {args.jobs} processes", flush=True)
        for e in errors:
            print(f"FAIL  table  {e}")
            fails += 1
        for module, name in missing:
            print(f"FAIL  {name} ({module}): @triton.jit function neither launched by a call in CALLS "
                  "nor called from a launched kernel; add its op to CALLS in tools/triton_aot.py")
            fails += 1

        # Largest kernels first so that no long compile is left for the end; report in order.
        order = sorted(((ji, li) for ji, j in enumerate(jobs) for li in range(len(j.launches))),
                       key=lambda k: -_cost(jobs[k[0]].launches[k[1]]))
        futs = {k: pool.submit(_compile_one, jobs[k[0]].launches[k[1]], jobs[k[0]].target) for k in order}
        for ji, job in enumerate(jobs):
            why, bad, dt = "", 0, 0.0
            for li, ln in enumerate(job.launches):
                try:
                    err, sec = futs[(ji, li)].result()
                except Exception as e:
                    err, sec = f"compile process failed: {type(e).__name__}: {e}", 0.0
                dt += sec
                if err:
                    bad += 1
                    why = why or f"first [{ln.describe()}]: {err}"
            name = f"{job.kernel:<24s} {job.target:<8s} {job.group:<6s}"
            if not bad:
                ok += 1
                print(f"ok    {name} {len(job.launches):3d} configs {dt:6.1f}s", flush=True)
            else:
                fails += 1
                print(f"FAIL  {name} {bad}/{len(job.launches)} configs failed, {why}", flush=True)
    print(f"summary: {ok} ok, {fails} failed ({len(jobs)} kernel x target x group lines, "
          f"{n_comp} compilations) in {time.perf_counter() - t0:.0f}s")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
