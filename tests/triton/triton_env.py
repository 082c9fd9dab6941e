"""What every Triton test module shares: the device the kernels run on (the CPU under
TRITON_INTERPRET=1 when there is no GPU) and the skip marker when Triton is unavailable."""
import os

import pytest
import torch

import fastkd

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERP and not torch.cuda.is_available() else "cuda"
requires_triton = pytest.mark.skipif(
    not fastkd.backends()["triton"].available,
    reason=f"triton backend unavailable here ({fastkd.backends()['triton'].reason}); "
           "run `TRITON_INTERPRET=1 python -m pytest tests/triton`")
