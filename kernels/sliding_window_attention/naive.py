"""Pure-PyTorch reference for causal (sliding-window) attention with GQA (no triton)."""

from __future__ import annotations

import torch

from ..utils import causal_band


def naive_sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int | None = None,
    scale: float | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """Dense masked softmax attention in fp32; same arguments and shapes as `chunk.sliding_window_attention`.

    Args:
        q (torch.Tensor): queries `[B, T, H, D]`.
        k (torch.Tensor): keys `[B, S, H_kv, D]` (S >= T, bottom-right aligned).
        v (torch.Tensor): values `[B, S, H_kv, D]`.
        window_size (int, optional): keys each query sees, itself included; None or 0 = full causal.
        scale (float, optional): defaults to `D ** -0.5`.
        sinks (int): keys `j < sinks` stay visible (causally) beside the window (attention sinks).

    Returns:
        `o` `[B, T, H, D]` in q's dtype.
    """
    length, head_dim = q.shape[1], q.shape[3]
    kv_length, groups = k.shape[1], q.shape[2] // k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    qf = q.float().transpose(1, 2)  # [B, H, T, D]
    kf, vf = (x.float().repeat_interleave(groups, dim=2).transpose(1, 2) for x in (k, v))  # [B, H, S, D]
    allowed = causal_band(length, kv_length, window_size, q.device, sinks)
    scores = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1).nan_to_num(0.0) @ vf  # rows without keys give 0
    return out.transpose(1, 2).to(q.dtype)
