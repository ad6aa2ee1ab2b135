"""Pure-PyTorch references for gated retention (no triton). Ground truth for the kernel tests.

Recurrence (per head, fp32), with `g_t` the log decay and `scale` applied to the query:
    S_t = exp(g_t) * S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t
"""

from __future__ import annotations

import torch


def naive_recurrent_gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token recurrence, differentiable (autograd through the loop).

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, K]`.
        k (torch.Tensor): keys of shape `[B, T, H, K]`.
        v (torch.Tensor): values of shape `[B, T, H, V]`.
        g (torch.Tensor): log decays (<= 0) of shape `[B, T, H]`.
        scale (float, optional): query scale, defaults to `K ** -0.5`.
        initial_state (torch.Tensor, optional): `[N, H, K, V]`, N = B or the number of sequences with `cu_seqlens`.
        output_final_state (bool): also return the final states `[N, H, K, V]` (fp32).
        cu_seqlens (torch.LongTensor, optional): `[N + 1]` cumulative lengths of sequences packed in `B = 1`.

    Returns:
        `o` of shape `[B, T, H, V]` (dtype of v) and the final state or None.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if cu_seqlens is not None:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for i, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            h0 = None if initial_state is None else initial_state[i : i + 1]
            o, ht = naive_recurrent_gated_retention(
                q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], g[:, bos:eos], scale, h0, True
            )
            outs.append(o)
            states.append(ht)
        return torch.cat(outs, 1), torch.cat(states, 0) if output_final_state else None
    dtype = v.dtype
    batch, length, heads, key_dim = q.shape
    q, k, v, g = q.float() * scale, k.float(), v.float(), g.float()
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(length):
        state = g[:, t, :, None, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outputs.append((q[:, t, :, None, :] @ state).squeeze(-2))  # [B, H, V]
    out = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape)  # [B, T, H, V]
    return out.to(dtype), state if output_final_state else None
