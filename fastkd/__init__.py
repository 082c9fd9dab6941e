"""fastkd: fast knowledge distillation without the teacher's data.

Fused kernels (C++/CUDA and Triton, with plain-PyTorch fallbacks) for the hot paths of
data-free (CAKE/LAKE, TA-DFKD) and black-box (MEKD) distillation.
"""
from ._backend import BACKENDS, BackendStatus, BackendUnavailableError, ExtensionWarning, backends
from . import ops, nn  # noqa: E402
from . import optim  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BACKENDS", "BackendStatus", "BackendUnavailableError", "ExtensionWarning", "backends", "ops", "nn", "__version__"]
