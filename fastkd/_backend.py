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

import importlib.util
import os
import sys
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
# "ok", "disabled" (FASTKD_DISABLE_EXT=1), "not built" (no compiled extension installed),
# "stale" (built for another torch or from older sources) or "broken" (fails to load).
# Stale and broken extensions are reported loudly: fastkd info, fastkd.backends() and a
# one-time warning on the first op call.
_C_STATE = "not built"

# The C++ operators this version of the Python package calls. An extension lacking any of
# them is out of date (built from older sources) and is not used at all.
EXPECTED_OPS = (
    "tv_loss_fwd",
    "cross_class_contrastive_fwd", "langevin_step_", "philox_normal",
    "image_distance_fwd", "pairwise_sqdist_fwd", "pairwise_sqdist_bwd", "sliced_project", "sliced_backproject",
    "linear_assignment", "sinkhorn_log",
    "bn_stats_fwd", "bn_stats_bwd",
)

_TAG = b"fastkd-build-tag "


class ExtensionWarning(RuntimeWarning):
    """The compiled extension is installed but cannot be used (stale or broken)."""


def rebuild_command() -> str:
    """The command that rebuilds fastkd._C against the running torch, for this install."""
    import json
    import shlex

    py = shlex.quote(sys.executable)
    src, editable = None, False
    try:
        from importlib.metadata import distribution

        raw = distribution("fastkd").read_text("direct_url.json")
        if raw:
            d = json.loads(raw)
            url = d.get("url", "")
            if url.startswith("file://") and os.path.isdir(url[len("file://"):]):  # a source tree
                src = url[len("file://"):]
                editable = bool(d.get("dir_info", {}).get("editable"))
    except Exception:  # pragma: no cover - metadata missing or unreadable
        pass
    if src is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isfile(os.path.join(root, "setup.py")):
            src, editable = root, True
    if src is None:
        # installed from a wheel or an index: rebuild from fastkd's source (the sdist)
        return f"{py} -m pip install --no-build-isolation --no-deps --force-reinstall --no-binary fastkd fastkd"
    flag = "-e " if editable else "--force-reinstall "
    return f"{py} -m pip install --no-build-isolation --no-deps {flag}{shlex.quote(src)}"


def _read_build_tag(path: str) -> dict | None:
    """The build tag compiled into the library at ``path`` (read from the file, not loaded)."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            i = m.find(_TAG)
            if i < 0:
                return None
            j = m.find(b"\n", i)
            raw = m[i + len(_TAG): j if j > 0 else i + 512].decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    out = {}
    for part in raw.split(" "):
        k, _, v = part.partition("=")
        out[k] = v
    return out


def _load_extension() -> None:
    global _C, _C_REASON, _C_INFO, _C_STATE
    if os.environ.get("FASTKD_DISABLE_EXT", "0") == "1":
        _C_STATE, _C_REASON = "disabled", "disabled by FASTKD_DISABLE_EXT=1"
        return
    loaded = sys.modules.get("fastkd._C")
    if loaded is not None:  # already imported (or provided) by the embedding program
        origin = getattr(loaded, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec("fastkd._C")
        except (ImportError, ValueError):  # pragma: no cover
            spec = None
        origin = spec.origin if spec is not None else None
        if not origin:
            _C_STATE = "not built"
            _C_REASON = ("fastkd._C is not built (installed with FASTKD_SKIP_EXT=1 or without a "
                         f"compiler); build it with `{rebuild_command()}`")
            return
    tag = _read_build_tag(origin) if origin else None
    if tag is not None and tag.get("torch") != torch.__version__:
        # not loaded at all: a library built against another torch's ABI may crash on load
        _C_STATE = "stale"
        _C_REASON = (f"fastkd._C was built for torch {tag.get('torch')} but torch {torch.__version__} "
                     f"is running, so the compiled kernels are not in use; rebuild with "
                     f"`{rebuild_command()}`")
        return
    try:
        from fastkd import _C as ext  # noqa: registers the fastkd:: operators
    except (ImportError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        _C_STATE = "broken"
        _C_REASON = (f"fastkd._C failed to load ({msg}), so the compiled kernels are not in use; it was "
                     f"probably built for another torch: rebuild with `{rebuild_command()}`")
        return
    info = dict(ext.build_info())
    built = info.get("torch_version", "unknown")
    if built != torch.__version__:
        _C_STATE = "stale"
        _C_REASON = (f"fastkd._C was built for torch {built} but torch {torch.__version__} is "
                     f"running, so the compiled kernels are not in use; rebuild with `{rebuild_command()}`")
        return
    missing = [op for op in EXPECTED_OPS if not hasattr(torch.ops.fastkd, op)]
    if missing:
        _C_STATE = "stale"
        _C_REASON = (f"fastkd._C is out of date (it lacks {', '.join(missing)}), so the compiled kernels "
                     f"are not in use; rebuild with `{rebuild_command()}`")
        return
    _C, _C_INFO, _C_STATE = ext, info, "ok"


_load_extension()

_WARNED = False


def _warn_unusable_extension_once() -> None:
    """One warning, on the first op call, when an installed extension cannot be used."""
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    import warnings

    if _C_STATE in ("stale", "broken"):
        warnings.warn(f"fastkd: {_C_REASON}", ExtensionWarning, stacklevel=4)
    elif _C_STATE == "ok" and not _C_INFO.get("with_cuda") and torch.cuda.is_available():
        warnings.warn(f"fastkd: {backend_status('cuda').reason}", ExtensionWarning, stacklevel=4)


def extension_state() -> str:
    """'ok', 'disabled', 'not built', 'stale' or 'broken' (see :data:`_C_STATE`)."""
    return _C_STATE


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
            why = _C_INFO.get("no_cuda_reason") or "the build did not compile them"
            return BackendStatus(name, False, f"fastkd._C was built without CUDA kernels ({why}); "
                                 f"once that is fixed, rebuild with `{rebuild_command()}`")
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


#: (op, device type) -> the backend it last ran on in this process (see :func:`backends_used`).
_USED: dict[tuple[str, str], str] = {}


def backends_used() -> dict[str, str]:
    """``"op@device": backend`` for every op resolved in this process so far: what a run
    records in its summary (which kernel each hot path actually ran on)."""
    return {f"{op}@{dev}": name for (op, dev), name in sorted(_USED.items())}


def resolve(op: str, backend: str, device: torch.device, supported=BACKENDS) -> str:
    """Return the backend ``op`` runs on for tensors on ``device``.

    Raises ValueError for an unknown name and BackendUnavailableError, saying why, when the
    requested backend cannot run here.
    """
    name = _resolve(op, backend, device, supported)
    _USED[(op, device.type)] = name
    return name


def _resolve(op: str, backend: str, device: torch.device, supported) -> str:
    if not _WARNED:
        _warn_unusable_extension_once()
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
