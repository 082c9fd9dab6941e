"""Triton kernels. Imported lazily, and only where triton is importable."""
