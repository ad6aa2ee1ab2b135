"""Shared-KV attention for decode in Triton: split-K ("flash-decoding") over a long global KV, GQA-packed.

Few queries (T <= 16) face many keys (S), so one program per (KV split, batch, KV head) loads each K/V tile once for
all `G = H / H_kv` query heads and all T queries of its group (`G * T` rows), runs an online softmax over its slice
of keys, and writes a normalized partial output and its log-sum-exp; a second kernel merges the splits.
Causal and bottom-right aligned: query t sees keys `j <= t + S - T`. Forward only (decode is inference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import attention_inputs, autotune_configs, input_guard, is_interpreter, next_power_of_2

NEG_INF = tl.constexpr(-1e30)


@triton.autotune(configs=autotune_configs(), key=["H", "HKV", "D", "BR", "BN"])
@triton.jit
def shared_kv_attention_split_kernel(
    q,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    o_part,  # [NS, B, T, H, D] fp32
    lse_part,  # [NS, B, T, H] fp32
    scale,
    S,
    L,
    B: tl.constexpr,
    T: tl.constexpr,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BR: tl.constexpr,
    BN: tl.constexpr,
):
    i_bhk, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = (i_bhk // HKV).to(tl.int64), i_bhk % HKV  # int64 offsets: B * S * H_kv * D can pass 2**31
    G: tl.constexpr = H // HKV
    o_r = tl.arange(0, BR)
    m_r = o_r < G * T
    o_h = i_hk * G + o_r // T  # [BR] query head of each row
    o_t = o_r % T  # [BR] query index of each row
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q = ((i_b * T + o_t[:, None]) * H + o_h[:, None]) * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_r[:, None] & m_d[None, :], other=0)  # [BR, BD]
    b_m = tl.full([BR], NEG_INF, dtype=tl.float32)
    b_l = tl.zeros([BR], dtype=tl.float32)
    b_acc = tl.zeros([BR, BD], dtype=tl.float32)
    lo = i_s * L
    hi = tl.minimum(S, lo + L)
    for start in range(lo, hi, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < hi
        p_kv = ((i_b * S + o_n[:, None]) * HKV + i_hk) * D + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)  # [BN, BD]
        b_v = tl.load(v + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)  # [BN, BD]
        m_s = m_n[None, :] & (o_n[None, :] <= o_t[:, None] + S - T) & m_r[:, None]  # [BR, BN]
        b_s = tl.where(m_s, tl.dot(b_q, tl.trans(b_k)) * scale, NEG_INF)
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.where(m_s, tl.exp(b_s - b_mn[:, None]), 0)
        b_alpha = tl.exp(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_mn
    b_l_safe = tl.where(b_l > 0, b_l, 1.0)
    b_lse = tl.where(b_l > 0, b_m + tl.log(b_l_safe), NEG_INF)
    p_o = (((i_s * B + i_b) * T + o_t[:, None]) * H + o_h[:, None]) * D + o_d[None, :]
    tl.store(o_part + p_o, b_acc / b_l_safe[:, None], mask=m_r[:, None] & m_d[None, :])
    tl.store(lse_part + ((i_s * B + i_b) * T + o_t) * H + o_h, b_lse, mask=m_r)


@triton.jit
def shared_kv_attention_merge_kernel(
    o_part,  # [NS, R, D] fp32, R = B * T * H rows
    lse_part,  # [NS, R] fp32
    o,  # [R, D]
    R,
    NS: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
):
    i_r = tl.program_id(0).to(tl.int64)  # NS * R * D can pass 2**31
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    m_s = o_s < NS
    b_lse = tl.load(lse_part + o_s * R + i_r, mask=m_s, other=NEG_INF)  # [BS]
    b_w = tl.where(m_s, tl.exp(b_lse - tl.max(b_lse, 0)), 0)  # [BS]
    b_o = tl.load(
        o_part + (o_s[:, None] * R + i_r) * D + o_d[None, :], mask=m_s[:, None] & (o_d < D)[None, :], other=0
    )
    b_o = tl.sum(b_o * b_w[:, None], 0) / tl.sum(b_w, 0)  # [BD]
    tl.store(o + i_r * D + o_d, b_o.to(o.dtype.element_ty), mask=o_d < D)


@input_guard
def shared_kv_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, num_splits: int | None = None
) -> torch.Tensor:
    """Launch the split and merge kernels: returns `o` `[B, T, H, D]`."""
    batch, length, heads, head_dim = q.shape
    kv_length, kv_heads = k.shape[1], k.shape[2]
    bd = next_power_of_2(head_dim)
    br = next_power_of_2(heads // kv_heads * length)
    bn = 64 if is_interpreter() or bd <= 64 else 32
    if num_splits is None:  # enough programs to fill a GPU, each with at least a few key tiles
        num_splits = (
            1 if is_interpreter() else max(1, min(128, triton.cdiv(kv_length, 4 * bn), 256 // (batch * kv_heads) or 1))
        )
    split_len = triton.cdiv(triton.cdiv(kv_length, num_splits), bn) * bn
    num_splits = triton.cdiv(kv_length, split_len)
    o_part = q.new_empty(num_splits, batch, length, heads, head_dim, dtype=torch.float32)
    lse_part = q.new_empty(num_splits, batch, length, heads, dtype=torch.float32)
    shared_kv_attention_split_kernel[(batch * kv_heads, num_splits)](  # CUDA caps grid axis 1 at 65535
        q, k, v, o_part, lse_part, scale, kv_length, split_len,
        B=batch, T=length, H=heads, HKV=kv_heads, D=head_dim, BD=bd, BR=br, BN=bn,
    )  # fmt: skip
    o = torch.empty_like(q)
    rows = batch * length * heads
    shared_kv_attention_merge_kernel[(rows,)](
        o_part, lse_part, o, rows, NS=num_splits, D=head_dim, BD=bd, BS=next_power_of_2(num_splits, minimum=2)
    )
    return o


def shared_kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    r"""Causal GQA attention of a few queries over a long shared KV (Triton, split-K; forward only).

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, D]`, T small (decode: 1).
        k (torch.Tensor): keys of shape `[B, S, H_kv, D]`, `S >= T`; `H_kv` divides `H`.
        v (torch.Tensor): values of shape `[B, S, H_kv, D]`.
        scale (float, optional): softmax scale, defaults to `D ** -0.5`.
        num_splits (int, optional): number of KV splits; chosen from S and the grid size by default.

    Returns:
        `o` of shape `[B, T, H, D]`; query t attends keys `j <= t + S - T`.
    """
    dtype = q.dtype
    q, k, v = attention_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return shared_kv_attention_fwd(q, k, v, scale, num_splits).to(dtype)
