"""Shared-KV cross attention for decode / short queries over YOCO's long global KV (split-K, GQA). Exports the
PyTorch reference only (no triton import); the Triton entry point is `decode.shared_kv_attention`.
"""

from .naive import naive_shared_kv_attention

__all__ = ["naive_shared_kv_attention"]
