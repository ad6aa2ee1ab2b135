"""Triton kernels for hf_yoco, installed as `hf_yoco.kernels`. Importing this package never imports triton.

Each op lives in `hf_yoco.kernels.<op>` with a pure-PyTorch reference in `naive.py` beside the Triton files
(`chunk.py`, `fused_recurrent.py`, ...). Only those Triton files import triton; `utils` resolves the backend.
"""

_handed_over = False
if __name__ == "kernels":
    # Imported as a top-level `kernels`: a checkout's root is on `sys.path` (`python -m pytest`, a REPL in the repo),
    # where this folder shadows Hugging Face's `kernels` library, which transformers >= 5.25 imports. When that
    # library is installed, hand the name over to it; otherwise load as this package, as before.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    )
    if _spec is not None and _spec.origin is not None and _spec.loader is not None:  # a module, not a folder
        _library = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _library  # the import system returns what this name holds once this file has run
        _spec.loader.exec_module(_library)
        _handed_over = True

if not _handed_over:
    from .utils import KERNEL_BACKENDS, is_interpreter, is_triton_available, is_triton_usable, use_triton

__all__ = ["KERNEL_BACKENDS", "is_interpreter", "is_triton_available", "is_triton_usable", "use_triton"]
