"""Causal sliding-window attention (GQA). Exports the PyTorch reference only (no triton import); the Triton entry
point is `chunk.sliding_window_attention`.
"""

from .naive import naive_sliding_window_attention

__all__ = ["naive_sliding_window_attention"]
