"""Backend discovery and selection.

Every op in :mod:`fastkd.ops` accepts ``backend="auto" | "cuda" | "triton" | "cpp" |
"torch"``:

* ``cuda``   -- CUDA kernels compiled into ``fastkd._C`` (CUDA tensors);
* ``triton`` -- Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``);
* ``cpp``    -- C++ CPU kernels compiled into ``fastkd._C`` (CPU tensors);
* ``torch``  -- the plain-PyTorch reference implementation (any device).

``auto`` picks the fastest available backend for the tensor's device; the environment
variable ``FASTKD_BACKEND`` overrides it. :func:`backends` reports what is available and,
for what is not, why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

BACKENDS = ("cuda", "triton", "cpp", "torch")

# Preference order of ``backend="auto"`` by device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """Raised when an op is asked to run on a backend that cannot run here."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on

    def __bool__(self) -> bool:  # pragma: no cover - convenience
        return self.available


# --------------------------------------------------------------------------- extension
_C = None
_C_REASON = ""
_C_INFO: dict = {}

# The C++ operators this version of the Python package calls. An extension lacking any of
# them is out of date (built from older sources) and is not used at all.
EXPECTED_OPS = (
    "tv_loss_fwd",
    "cross_class_contrastive_fwd", "langevin_step_", "philox_normal",
    "image_distance_fwd", "pairwise_sqdist_fwd", "pairwise_sqdist_bwd", "sliced_project", "sliced_backproject",
    "linear_assignment", "sinkhorn_log",
    "bn_stats_fwd", "bn_stats_bwd",
)


def _load_extension() -> None:
    global _C, _C_REASON, _C_INFO
    if os.environ.get("FASTKD_DISABLE_EXT", "0") == "1":
        _C_REASON = "disabled by FASTKD_DISABLE_EXT=1"
        return
    try:
        from fastkd import _C as ext  # noqa: registers the fastkd:: operators
    except ImportError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "No module named" in msg:
            _C_REASON = ("fastkd._C is not built (installed with FASTKD_SKIP_EXT=1 or without a "
                         "compiler); reinstall with `pip install --no-build-isolation .`")
        else:
            _C_REASON = (f"fastkd._C failed to load ({msg}); it was probably built for another "
                         "torch: rebuild with `pip install --no-build-isolation .`")
        return
    except OSError as e:  # pragma: no cover - broken shared library
        _C_REASON = f"fastkd._C failed to load ({e}); rebuild with `pip install --no-build-isolation .`"
        return
    info = dict(ext.build_info())
    built = info.get("torch_version", "unknown")
    if built != torch.__version__:
        _C_REASON = (f"fastkd._C was built for torch {built} but torch {torch.__version__} is "
                     "running; rebuild with `pip install --no-build-isolation .`")
        return
    missing = [op for op in EXPECTED_OPS if not hasattr(torch.ops.fastkd, op)]
    if missing:
        _C_REASON = (f"fastkd._C is out of date (it lacks {', '.join(missing)}); rebuild with "
                     "`pip install --no-build-isolation .`")
        return
    _C, _C_INFO = ext, info


_load_extension()

# --------------------------------------------------------------------------- triton
_TRITON_REASON = ""
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception as e:  # pragma: no cover - depends on the environment
    HAS_TRITON = False
    _TRITON_REASON = f"triton is not importable ({type(e).__name__}: {e})"


def triton_interpret() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def has_extension() -> bool:
    return _C is not None


def extension_info() -> dict:
    return dict(_C_INFO)


# --------------------------------------------------------------------------- status
def _status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(name, True, "plain PyTorch reference, any device")
    if name == "cpp":
        if _C is None:
            return BackendStatus(name, False, _C_REASON)
        return BackendStatus(name, True, "compiled C++ kernels, CPU tensors" +
                             (" (OpenMP)" if _C_INFO.get("openmp") else " (no OpenMP)"))
    if name == "cuda":
        if _C is None:
            return BackendStatus(name, False, _C_REASON)
        if not _C_INFO.get("with_cuda"):
            return BackendStatus(name, False, "fastkd._C was built without CUDA kernels (torch "
                                 "without CUDA or nvcc not found at build time; set FASTKD_FORCE_CUDA=1)")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA device is available (torch.cuda.is_available() "
                                 "is False)")
        return BackendStatus(name, True, "compiled CUDA kernels, CUDA tensors")
    if name == "triton":
        if not HAS_TRITON:
            return BackendStatus(name, False, _TRITON_REASON)
        if triton_interpret():
            return BackendStatus(name, True, "Triton interpreter (TRITON_INTERPRET=1), CPU tensors")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA device for Triton (set TRITON_INTERPRET=1 "
                                 "before importing fastkd to run Triton kernels on the CPU)")
        return BackendStatus(name, True, "Triton kernels, CUDA tensors")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


_STATUS_CACHE: dict[str, BackendStatus] = {}


def backend_status(name: str) -> BackendStatus:
    st = _STATUS_CACHE.get(name)
    if st is None:
        st = _status(name)
        _STATUS_CACHE[name] = st
    return st


def backends() -> dict[str, BackendStatus]:
    """Which backends can run here and, for each that cannot, why."""
    return {name: backend_status(name) for name in BACKENDS}


# --------------------------------------------------------------------------- selection
def _device_ok(name: str, device_type: str) -> str | None:
    """None if ``name`` can take tensors of ``device_type``, else the reason."""
    if name == "torch":
        return None
    if name == "cpp":
        return None if device_type == "cpu" else f"the cpp backend takes CPU tensors, got {device_type}"
    if name == "cuda":
        return None if device_type == "cuda" else f"the cuda backend takes CUDA tensors, got {device_type}"
    if name == "triton":
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpret():
            return None
        return (f"the triton backend takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), "
                f"got {device_type}")
    return f"unknown backend {name!r}"


def resolve(op: str, backend: str, device: torch.device, supported=BACKENDS) -> str:
    """Return the backend ``op`` runs on for tensors on ``device``.

    Raises ValueError for an unknown name and BackendUnavailableError, saying why, when the
    requested backend cannot run here.
    """
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a string, got {type(backend).__name__}")
    if backend not in BACKENDS and backend != "auto":
        raise ValueError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    dev = device.type
    if backend == "auto":
        env = os.environ.get("FASTKD_BACKEND", "auto") or "auto"
        if env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"FASTKD_BACKEND must be 'auto' or one of {BACKENDS}, got {env!r}")
            backend = env
        else:
            for name in _AUTO_ORDER.get(dev, ("torch",)):
                if name in supported and backend_status(name).available:
                    return name
            return "torch"
    if backend not in supported:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is not implemented for this op "
                                      f"(supported: {supported})")
    st = backend_status(backend)
    if not st.available:
        raise BackendUnavailableError(f"{op}: backend {backend!r} is unavailable: {st.reason}")
    why = _device_ok(backend, dev)
    if why is not None:
        raise BackendUnavailableError(f"{op}: {why}")
    return backend
