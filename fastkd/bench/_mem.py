"""Peak host memory of a callable on Linux (the CPU counterpart of CUDA's peak statistics).

Resets the process's peak resident set size through /proc/self/clear_refs, runs the
callable and reads VmHWM: the resident memory the call adds beyond what the process
already holds. Memory the allocator recycles from earlier frees is not counted, so small
numbers can understate a call's allocations; large ones (an N x N matrix) show clearly.
None where /proc is not available.
"""
from __future__ import annotations

import gc


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_peak_extra_mb(fn) -> float | None:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status_kb("VmRSS")
    fn()
    peak = _status_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(0.0, (peak - base) / 1024.0)
