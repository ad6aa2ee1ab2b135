"""Pure-PyTorch reference for shared-KV (cross-decoder) attention of a few queries over a long global KV."""

from __future__ import annotations

import torch

from ..sliding_window_attention.naive import naive_sliding_window_attention


def naive_shared_kv_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal GQA attention, queries bottom-right aligned: q `[B, T, H, D]`, k/v `[B, S, H_kv, D]` -> `[B, T, H, D]`."""
    return naive_sliding_window_attention(q, k, v, window_size=None, scale=scale)
