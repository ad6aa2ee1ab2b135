"""Triton kernels for hf_yoco, installed as `hf_yoco.kernels`. Importing this package never imports triton.

Each op lives in `hf_yoco.kernels.<op>` with a pure-PyTorch reference in `naive.py` beside the Triton files
(`chunk.py`, `fused_recurrent.py`, ...). Only those Triton files import triton; `utils` resolves the backend.
"""

from .utils import KERNEL_BACKENDS, is_interpreter, is_triton_available, is_triton_usable, use_triton

__all__ = ["KERNEL_BACKENDS", "is_interpreter", "is_triton_available", "is_triton_usable", "use_triton"]
