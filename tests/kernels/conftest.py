"""Kernel tests run on CPU CI through the Triton interpreter.

`TRITON_INTERPRET=1` must be set before the kernels are decorated (their modules are only imported lazily, inside
the tests). It is set only when no CUDA device is present, and it never changes the rest of the suite: with
`kernel_backend="auto"` CPU tensors stay on PyTorch whatever the variable says.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
