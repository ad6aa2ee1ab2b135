"""Fused recurrent gated retention in Triton: one token at a time, for decode and short inputs.

One program owns one (sequence, head, value block) and keeps the state `[BK, BV]` in registers:
    S <- exp(g_t) S + k_t^T v_t,        o_t = scale * q_t S
The backward pass is the chunkwise backward (`chunk.chunk_gated_retention_bwd`), which computes the same gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import autotune_configs, next_power_of_2
from .chunk import apply_gated_retention


@triton.autotune(configs=autotune_configs(warps=(2, 4), stages=(1, 2)), key=["H", "K", "V", "BK", "BV"])
@triton.jit
def fused_recurrent_gated_retention_fwd_kernel(
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, H, V]
    g,  # [TT, H] fp32
    o,  # [TT, H, V]
    h0,  # [N, H, K, V] fp32
    ht,  # [N, H, K, V] fp32
    cu_seqlens,  # [N + 1]
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T  # int64 offsets: B * T * H * K can pass 2**31
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_h = m_k[:, None] & m_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0).to(
            tl.float32
        )
    for i_t in range(bos, eos):
        # Every access is also masked by `i_t < eos`, so a token a pipelined loop prefetches past the end reads
        # nothing (vector masks: the interpreter mishandles a scalar mask combined with a vector one).
        m_tk = m_k & (i_t + tl.zeros([BK], dtype=tl.int64) < eos)
        m_tv = m_v & (i_t + tl.zeros([BV], dtype=tl.int64) < eos)
        b_q = tl.load(q + (i_t * H + i_h) * K + o_k, mask=m_tk, other=0).to(tl.float32)  # [BK]
        b_k = tl.load(k + (i_t * H + i_h) * K + o_k, mask=m_tk, other=0).to(tl.float32)  # [BK]
        b_v = tl.load(v + (i_t * H + i_h) * V + o_v, mask=m_tv, other=0).to(tl.float32)  # [BV]
        b_g = tl.load(g + i_t * H + i_h, mask=i_t < eos, other=0).to(tl.float32)
        b_h = b_h * tl.exp(b_g) + b_k[:, None] * b_v[None, :]  # [BK, BV]
        b_o = tl.sum(b_h * b_q[:, None], axis=0) * scale  # [BV]
        tl.store(o + (i_t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_tv)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_h)


def fused_recurrent_gated_retention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.LongTensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the recurrent kernel: returns `o` `[B, T, H, V]` and the final state `[N, H, K, V]` (fp32) or None."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    num_seqs = batch if cu_seqlens is None else len(cu_seqlens) - 1
    bk = next_power_of_2(key_dim, minimum=1)
    bv = min(next_power_of_2(value_dim, minimum=1), 64)
    o = torch.empty_like(v)
    ht = q.new_empty(num_seqs, heads, key_dim, value_dim, dtype=torch.float32) if output_final_state else None
    fused_recurrent_gated_retention_fwd_kernel[(num_seqs * heads, triton.cdiv(value_dim, bv))](
        q, k, v, g, o, initial_state, ht, cu_seqlens, scale, length,
        H=heads, K=key_dim, V=value_dim, BK=bk, BV=bv,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None,
    )  # fmt: skip
    return o, ht


def fused_recurrent_gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Token-by-token gated retention (Triton), for decode and short inputs; differentiable like the chunk form.

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, K]`.
        k (torch.Tensor): keys of shape `[B, T, H, K]`.
        v (torch.Tensor): values of shape `[B, T, H, V]`.
        g (torch.Tensor): log decays (<= 0) of shape `[B, T, H]`, computed in fp32.
        scale (float, optional): query scale, defaults to `K ** -0.5`.
        initial_state (torch.Tensor, optional): fp32 states `[N, H, K, V]`; N = B, or the number of sequences.
        output_final_state (bool): also return the final states `[N, H, K, V]` in fp32.
        cu_seqlens (torch.LongTensor, optional): `[N + 1]` cumulative lengths of sequences packed in `B = 1`.

    Returns:
        `o` `[B, T, H, V]` (dtype of v) and the final state (or None).
    """
    return apply_gated_retention(
        fused_recurrent_gated_retention_fwd, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens
    )
