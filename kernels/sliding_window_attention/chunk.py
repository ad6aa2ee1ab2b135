"""Causal (sliding-window) attention in Triton: flash-style online softmax, forward + backward, GQA.

Queries are aligned bottom-right with the keys (query i sits at key position i + S - T, as with a KV cache), and
query i sees keys j with `i + S - T - W < j <= i + S - T` (`W = window_size` keys, itself included; 0 = no window),
plus the attention sinks `j < sinks` (causally). Key blocks outside that band and the sinks are skipped, so the cost
is O(T * (W + sinks)) instead of O(T * S).
The backward pass recomputes P from the saved log-sum-exp: one kernel for dq (over key blocks), one for dk/dv
(per key block and KV head, looping over the query heads of its group, so no atomics are needed).
Tiles: autotuned on a GPU over `GPU_TILES` x warps x stages (+ `SMALL_TILE`), once per (H, H_kv, D, window); one
fixed tile in the Triton interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import attention_inputs, autotune_configs, input_guard, next_power_of_2

NEG_INF = tl.constexpr(-1e30)  # finite: a fully masked row must not give exp(-inf - -inf) = NaN
# (BM, BN) query x key tiles tried by the autotuner on a GPU (each with 4/8 warps and 2/3 pipeline stages), and
# SMALL_TILE with 4 warps and one stage.
GPU_TILES = ((128, 64), (64, 64), (64, 32))
SMALL_TILE = (32, 32)  # unpipelined, for GPUs with 99 KB of shared memory (fp32, 128-wide heads)
INTERPRETER_TILE = (64, 64)  # the interpreter's cost scales with the number of block operations: big tiles

# Tuned once per head layout, head dim and window (not per length: prefill lengths vary call to call).
autotune = triton.autotune(
    configs=autotune_configs(
        warps=(4, 8),
        stages=(2, 3),
        tiles=tuple({"BM": bm, "BN": bn} for bm, bn in GPU_TILES),
        interpreter_tile=dict(zip(("BM", "BN"), INTERPRETER_TILE)),
        small_tile=dict(zip(("BM", "BN"), SMALL_TILE)),
    ),
    key=["H", "HKV", "D", "WINDOW", "SINKS"],
)


@autotune
@triton.jit
def attention_fwd_kernel(
    q,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    o,  # [B, T, H, D]
    lse,  # [B, T, H] fp32
    scale,
    T,
    S,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    WINDOW: tl.constexpr,
    SINKS: tl.constexpr,
):
    i_bh, i_m = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # int64 offsets: B * S * H * D can pass 2**31
    i_hk = i_h // (H // HKV)
    off = S - T
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = o_m < T
    m_d = o_d < D
    b_q = tl.load(
        q + ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0
    )
    b_m = tl.full([BM], NEG_INF, dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, BD], dtype=tl.float32)
    hi = tl.minimum(S, (i_m + 1) * BM + off)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(0, i_m * BM + off - WINDOW + 1) // BN * BN
    # The blocks holding sinks below the band first, then the band: each block once.
    sink_blocks = 0
    if SINKS > 0:
        sink_blocks = tl.cdiv(tl.minimum(lo, SINKS), BN)
    for i in range(0, sink_blocks + tl.cdiv(hi - lo, BN)):
        start = tl.where(i < sink_blocks, i * BN, lo + (i - sink_blocks) * BN)
        o_n = start + tl.arange(0, BN)
        m_n = o_n < S
        p_kv = ((i_b * S + o_n[:, None]) * HKV + i_hk) * D + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)  # [BN, BD]
        b_v = tl.load(v + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)  # [BN, BD]
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale  # [BM, BN]
        m_s = (o_n[None, :] <= o_m[:, None] + off) & m_n[None, :]
        if WINDOW > 0:  # below the band only the sinks pass
            m_s = m_s & ((o_n[None, :] > o_m[:, None] + off - WINDOW) | (o_n[None, :] < SINKS))
        b_s = tl.where(m_s, b_s, NEG_INF)
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.where(m_s, tl.exp(b_s - b_mn[:, None]), 0)  # [BM, BN]
        b_alpha = tl.exp(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
        b_m = b_mn
    b_l_safe = tl.where(b_l > 0, b_l, 1.0)
    b_o = b_acc / b_l_safe[:, None]
    tl.store(
        o + ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :],
        b_o.to(o.dtype.element_ty),
        mask=m_m[:, None] & m_d[None, :],
    )
    tl.store(lse + (i_b * T + o_m) * H + i_h, b_m + tl.log(b_l_safe), mask=m_m)


@autotune
@triton.jit
def attention_bwd_kernel_dq(
    q,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    do,  # [B, T, H, D]
    lse,  # [B, T, H] fp32
    delta,  # [B, T, H] fp32
    dq,  # [B, T, H, D]
    scale,
    T,
    S,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    WINDOW: tl.constexpr,
    SINKS: tl.constexpr,
):
    i_bh, i_m = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H  # int64 offsets: B * S * H * D can pass 2**31
    i_hk = i_h // (H // HKV)
    off = S - T
    o_m = i_m * BM + tl.arange(0, BM)
    o_d = tl.arange(0, BD)
    m_m = o_m < T
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    p_q = ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :]
    b_q = tl.load(q + p_q, mask=m_md, other=0)  # [BM, BD]
    b_do = tl.load(do + p_q, mask=m_md, other=0)  # [BM, BD]
    b_lse = tl.load(lse + (i_b * T + o_m) * H + i_h, mask=m_m, other=0)  # [BM]
    b_delta = tl.load(delta + (i_b * T + o_m) * H + i_h, mask=m_m, other=0)  # [BM]
    b_dq = tl.zeros([BM, BD], dtype=tl.float32)
    hi = tl.minimum(S, (i_m + 1) * BM + off)
    lo = 0
    if WINDOW > 0:
        lo = tl.maximum(0, i_m * BM + off - WINDOW + 1) // BN * BN
    sink_blocks = 0  # the blocks holding sinks below the band, then the band (as in the forward kernel)
    if SINKS > 0:
        sink_blocks = tl.cdiv(tl.minimum(lo, SINKS), BN)
    for i in range(0, sink_blocks + tl.cdiv(hi - lo, BN)):
        start = tl.where(i < sink_blocks, i * BN, lo + (i - sink_blocks) * BN)
        o_n = start + tl.arange(0, BN)
        m_n = o_n < S
        p_kv = ((i_b * S + o_n[:, None]) * HKV + i_hk) * D + o_d[None, :]
        b_k = tl.load(k + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)  # [BN, BD]
        b_v = tl.load(v + p_kv, mask=m_n[:, None] & m_d[None, :], other=0)  # [BN, BD]
        m_s = (o_n[None, :] <= o_m[:, None] + off) & m_n[None, :] & m_m[:, None]
        if WINDOW > 0:
            m_s = m_s & ((o_n[None, :] > o_m[:, None] + off - WINDOW) | (o_n[None, :] < SINKS))
        b_p = tl.where(m_s, tl.exp(tl.dot(b_q, tl.trans(b_k)) * scale - b_lse[:, None]), 0)  # [BM, BN]
        b_dp = tl.dot(b_do, tl.trans(b_v))  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    tl.store(dq + p_q, (b_dq * scale).to(dq.dtype.element_ty), mask=m_md)


@autotune
@triton.jit
def attention_bwd_kernel_dkv(
    q,  # [B, T, H, D]
    k,  # [B, S, HKV, D]
    v,  # [B, S, HKV, D]
    do,  # [B, T, H, D]
    lse,  # [B, T, H] fp32
    delta,  # [B, T, H] fp32
    dk,  # [B, S, HKV, D]
    dv,  # [B, S, HKV, D]
    scale,
    T,
    S,
    H: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    WINDOW: tl.constexpr,
    SINKS: tl.constexpr,
):
    i_bhk, i_n = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = (i_bhk // HKV).to(tl.int64), i_bhk % HKV
    G: tl.constexpr = H // HKV
    off = S - T
    o_n = i_n * BN + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m_n = o_n < S
    m_d = o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    p_kv = ((i_b * S + o_n[:, None]) * HKV + i_hk) * D + o_d[None, :]
    b_k = tl.load(k + p_kv, mask=m_nd, other=0)  # [BN, BD]
    b_v = tl.load(v + p_kv, mask=m_nd, other=0)  # [BN, BD]
    b_dk = tl.zeros([BN, BD], dtype=tl.float32)
    b_dv = tl.zeros([BN, BD], dtype=tl.float32)
    lo = tl.maximum(0, i_n * BN - off) // BM * BM
    hi = T
    if WINDOW > 0:
        hi = tl.minimum(T, (i_n + 1) * BN - 1 - off + WINDOW)
        if SINKS > 0:
            hi = tl.where(i_n * BN < SINKS, T, hi)  # a block holding sinks is seen by every later query
    for i_g in range(G):
        i_h = i_hk * G + i_g
        for start in range(lo, hi, BM):
            o_m = start + tl.arange(0, BM)
            m_m = o_m < T
            p_q = ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :]
            b_q = tl.load(q + p_q, mask=m_m[:, None] & m_d[None, :], other=0)  # [BM, BD]
            b_do = tl.load(do + p_q, mask=m_m[:, None] & m_d[None, :], other=0)  # [BM, BD]
            b_lse = tl.load(lse + (i_b * T + o_m) * H + i_h, mask=m_m, other=0)  # [BM]
            b_delta = tl.load(delta + (i_b * T + o_m) * H + i_h, mask=m_m, other=0)  # [BM]
            m_s = (o_n[:, None] <= o_m[None, :] + off) & m_n[:, None] & m_m[None, :]  # [BN, BM]
            if WINDOW > 0:
                m_s = m_s & ((o_n[:, None] > o_m[None, :] + off - WINDOW) | (o_n[:, None] < SINKS))
            b_pT = tl.where(m_s, tl.exp(tl.dot(b_k, tl.trans(b_q)) * scale - b_lse[None, :]), 0)  # [BN, BM]
            b_dv += tl.dot(b_pT.to(b_do.dtype), b_do)
            b_dsT = b_pT * (tl.dot(b_v, tl.trans(b_do)) - b_delta[None, :])  # [BN, BM]
            b_dk += tl.dot(b_dsT.to(b_q.dtype), b_q)
    tl.store(dk + p_kv, (b_dk * scale).to(dk.dtype.element_ty), mask=m_nd)
    tl.store(dv + p_kv, b_dv.to(dv.dtype.element_ty), mask=m_nd)


def _launch(kernel, grid, args: tuple, tile: tuple[int, int] | None, **meta) -> None:
    """Run an autotuned kernel; `tile=(BM, BN)` pins the tile instead (tests check every GPU tile this way)."""
    if tile is None:
        kernel[grid](*args, **meta)
    else:
        kernel.fn[grid](*args, BM=tile[0], BN=tile[1], **meta)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window_size: int,
    tile: tuple[int, int] | None = None,
    sinks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: returns `o` `[B, T, H, D]` and the log-sum-exp `[B, T, H]` (fp32)."""
    batch, length, heads, head_dim = q.shape
    kv_length, kv_heads = k.shape[1], k.shape[2]
    o = torch.empty_like(q)
    lse = q.new_empty(batch, length, heads, dtype=torch.float32)

    def grid(meta):  # (batch x heads) first: CUDA caps grid axes 1 and 2 at 65535 programs
        return batch * heads, triton.cdiv(length, meta["BM"])

    meta = dict(H=heads, HKV=kv_heads, D=head_dim, BD=next_power_of_2(head_dim), WINDOW=window_size, SINKS=sinks)
    _launch(attention_fwd_kernel, grid, (q, k, v, o, lse, scale, length, kv_length), tile, **meta)
    return o, lse


def attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    scale: float,
    window_size: int,
    tile: tuple[int, int] | None = None,
    sinks: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: returns dq, dk, dv (dtypes of q, k, v)."""
    batch, length, heads, head_dim = q.shape
    kv_length, kv_heads = k.shape[1], k.shape[2]
    delta = (o.float() * do.float()).sum(-1)  # [B, T, H]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    meta = dict(H=heads, HKV=kv_heads, D=head_dim, BD=next_power_of_2(head_dim), WINDOW=window_size, SINKS=sinks)

    def grid_dq(meta):
        return batch * heads, triton.cdiv(length, meta["BM"])

    def grid_dkv(meta):
        return batch * kv_heads, triton.cdiv(kv_length, meta["BN"])

    args = (q, k, v, do, lse, delta)
    _launch(attention_bwd_kernel_dq, grid_dq, (*args, dq, scale, length, kv_length), tile, **meta)
    _launch(attention_bwd_kernel_dkv, grid_dkv, (*args, dk, dv, scale, length, kv_length), tile, **meta)
    return dq, dk, dv


class SlidingWindowAttentionFunction(torch.autograd.Function):
    @staticmethod
    @input_guard
    def forward(ctx, q, k, v, scale, window_size, tile, sinks):
        o, lse = attention_fwd(q, k, v, scale, window_size, tile, sinks)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.window_size, ctx.tile, ctx.sinks = scale, window_size, tile, sinks
        return o

    @staticmethod
    @input_guard
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(q, k, v, o, lse, do, ctx.scale, ctx.window_size, ctx.tile, ctx.sinks)
        return dq, dk, dv, None, None, None, None


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int | None = None,
    scale: float | None = None,
    tile: tuple[int, int] | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    r"""Causal softmax attention over the last `window_size` keys (Triton), differentiable in q, k, v.

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, D]`.
        k (torch.Tensor): keys of shape `[B, S, H_kv, D]`, `S >= T`; `H_kv` divides `H` (GQA).
        v (torch.Tensor): values of shape `[B, S, H_kv, D]`.
        window_size (int, optional): keys each query sees, itself included; None or 0 gives full causal attention.
        scale (float, optional): softmax scale, defaults to `D ** -0.5`.
        tile (tuple[int, int], optional): pin the `(BM, BN)` query x key tile; by default the kernels are autotuned
            over `GPU_TILES` on a GPU (one fixed tile in the interpreter).
        sinks (int): attention sinks: keys `j < sinks` stay visible (causally) to every query beside its window.

    Returns:
        `o` of shape `[B, T, H, D]`; query i attends keys `i + S - T - W < j <= i + S - T` (bottom-right aligned)
        and the sinks `j < min(sinks, i + S - T + 1)`.
    """
    dtype = q.dtype
    q, k, v = attention_inputs(q, k, v)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if sinks < 0:
        raise ValueError(f"`sinks` must be >= 0, got {sinks}")
    window = int(window_size or 0)
    return SlidingWindowAttentionFunction.apply(q, k, v, scale, window, tile, sinks if window else 0).to(dtype)
