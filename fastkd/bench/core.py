"""Benchmark runner: timing, bandwidth, peak memory, ratios, CSV/JSON/PNG output."""
from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

# Known HBM bandwidths (GB/s) for the "fraction of the bound" column; FASTKD_HBM_GBPS overrides.
_HBM_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0,
             "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0,
             "RTX 4090": 1008.0}

# op name -> cases(device, quick) function. Filled by discovering every module of
# fastkd.bench that defines ``OPS = {"op_name": cases_function}``.
_REGISTRY: dict[str, Callable] = {}


def register(op: str, cases_fn: Callable) -> None:
    _REGISTRY[op] = cases_fn


_DISCOVERED = False


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import pkgutil

    here = os.path.dirname(os.path.abspath(__file__))  # the op modules beside this one
    for mod in sorted(m.name for m in pkgutil.iter_modules([here])):
        if mod == "core":
            continue
        m = importlib.import_module(f"{__package__}.{mod}")
        for op, fn in getattr(m, "OPS", {}).items():
            _REGISTRY.setdefault(op, fn)


def registered_ops() -> list[str]:
    _discover()
    return list(_REGISTRY)


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    impls: dict[str, Callable[[], object]]
    bytes: float = 0.0  # lower bound of unavoidable memory traffic, for GB/s
    baseline: str = "eager"
    setup: Callable[[], None] | None = None  # called before each impl (e.g. zero grads)
    accuracy: dict[str, float] = field(default_factory=dict)  # impl -> error vs reference
    note: str = ""


@dataclass
class Result:
    op: str
    shape: str
    dtype: str
    impl: str
    device: str
    median_ms: float
    gbps: float | None
    frac_bound: float | None
    peak_mem_mb: float | None
    speedup_vs_baseline: float | None
    error: float | None
    note: str = ""


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def device_slug(device: str) -> str:
    if device == "cuda":
        base = torch.cuda.get_device_name()
    else:
        base = device_name("cpu").split(" (")[0] + f"-{torch.get_num_threads()}threads"
    base = base.replace("NVIDIA ", "")
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{device}-{base}").strip("-").lower()


def hbm_gbps(device: str) -> float | None:
    env = os.environ.get("FASTKD_HBM_GBPS")
    if env:
        return float(env)
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, val in _HBM_GBPS.items():
        if key in name:
            return val
    return None


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, setup=None, min_time: float = 0.3,
            max_reps: int = 200) -> float:
    """Median seconds of fn() over repetitions (after warm-up), syncing the device."""
    for _ in range(3):  # warm-up (compilation, caches, allocator)
        if setup:
            setup()
        fn()
    _sync(device)
    times = []
    total = 0.0
    while total < min_time and len(times) < max_reps:
        if setup:
            setup()
        _sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
        if len(times) >= 5 and total > 10 * min_time:
            break
    times.sort()
    return times[len(times) // 2]


def peak_memory_mb(fn: Callable[[], object], device: str, setup=None) -> float | None:
    if device != "cuda":
        return None
    if setup:
        setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _load_cases(op: str, device: str, quick: bool) -> list[Case]:
    _discover()
    if op not in _REGISTRY:
        raise SystemExit(f"fastkd bench: unknown op {op!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[op](device, quick)


# Modules of the peer libraries compared against (the `bench` extra): kornia, geomloss, POT.
PEER_MODULES = ("kornia", "geomloss", "ot")


def run(ops: list[str] | None = None, device: str = "cpu", quick: bool = False,
        out_dir: str | None = "benchmarks/results", csv_path: str | None = None,
        plot_path: str | None = None, min_time: float = 0.3, log=print) -> list[Result]:
    ops = ops or registered_ops()
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastkd bench: --device cuda requested but no CUDA device is available")
    bound = hbm_gbps(device)
    results: list[Result] = []
    log(f"fastkd bench on {device_name(device)}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads" + (f", HBM bound {bound:.0f} GB/s" if bound else ""))
    missing = [m for m in PEER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        log(f"peer libraries not installed ({', '.join(missing)}): their rows are left out; "
            "pip install 'fastkd[bench]' adds them")
    load = _load_average()
    if device == "cpu" and load is not None and load > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes compete "
            "for the CPU and CPU timings will be noisy")
    for op in ops:
        cases = _load_cases(op, device, quick)
        for ci, case in enumerate(cases):
            log(f"[{op}] case {ci + 1}/{len(cases)}: shape {case.shape} {case.dtype}")
            timings: dict[str, float] = {}
            for name, fn in case.impls.items():
                try:
                    t = time_fn(fn, device, case.setup, min_time=min_time)
                    mem = peak_memory_mb(fn, device, case.setup)
                except Exception as e:  # a peer library failing must not stop the run
                    log(f"    {name:<32} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                    continue
                timings[name] = t
                gbps = case.bytes / t / 1e9 if case.bytes else None
                results.append(Result(op, case.shape, case.dtype, name, device, t * 1e3, gbps,
                                      gbps / bound if (gbps and bound) else None, mem, None,
                                      case.accuracy.get(name), case.note))
            base = timings.get(case.baseline)
            for r in results:
                if r.op == op and r.shape == case.shape and r.dtype == case.dtype and base:
                    r.speedup_vs_baseline = base / (r.median_ms / 1e3)
            for r in results:
                if r.op == op and r.shape == case.shape and r.dtype == case.dtype:
                    log("    " + _fmt_row(r))
    _write(results, device, out_dir, csv_path, plot_path, log)
    return results


def _fmt_row(r: Result) -> str:
    s = f"{r.impl:<34} {r.median_ms:10.4f} ms"
    s += f" {r.gbps:8.1f} GB/s" if r.gbps is not None else " " * 14
    s += f" {100 * r.frac_bound:5.1f}% of HBM" if r.frac_bound is not None else ""
    s += f"  x{r.speedup_vs_baseline:7.2f} vs baseline" if r.speedup_vs_baseline is not None else ""
    s += f"  peak {r.peak_mem_mb:.1f} MiB" if r.peak_mem_mb is not None else ""
    s += f"  err {r.error:.2e}" if r.error is not None else ""
    return s


def _write(results: list[Result], device: str, out_dir, csv_path, plot_path, log) -> None:
    if not results:
        return
    slug = device_slug(device)
    ops = sorted({r.op for r in results})
    stem = "_".join(ops) if len(ops) <= 3 else "all"
    if out_dir:
        d = os.path.join(out_dir, slug)
        os.makedirs(d, exist_ok=True)
        csv_path = csv_path or os.path.join(d, f"{stem}.csv")
        plot_path = plot_path or os.path.join(d, f"{stem}.png")
        json_path = os.path.join(d, f"{stem}.json")
    else:
        json_path = None
    rows = [asdict(r) for r in results]
    if csv_path:
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        log(f"wrote {csv_path}")
    if json_path:
        meta = {"device": device_name(device), "torch": torch.__version__, "python": sys.version.split()[0],
                "threads": torch.get_num_threads(), "argv": sys.argv, "hbm_gbps": hbm_gbps(device),
                "load_average_1min": _load_average()}
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        log(f"wrote {json_path}")
    if plot_path:
        try:
            _plot(results, plot_path, device)
            log(f"wrote {plot_path}")
        except ImportError:
            log("matplotlib is not importable: no plot written (it is a dependency of fastkd: "
                "pip install matplotlib)")


def _plot(results: list[Result], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for r in results:
        key = (r.op, r.shape, r.dtype)
        if key not in groups:
            groups.append(key)
    impls = []
    for r in results:
        if r.impl not in impls:
            impls.append(r.impl)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) + 3), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        vals = []
        for g in groups:
            m = [r.median_ms for r in results if (r.op, r.shape, r.dtype) == g and r.impl == impl]
            vals.append(m[0] if m else math.nan)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{o}\n{s}\n{d}" for o, s, d in groups], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median time per fwd+bwd (ms, log)")
    ax.set_title(f"fastkd bench - {device_name(device)}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
