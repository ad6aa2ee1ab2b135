"""Chunkwise gated retention in Triton (forward + backward, initial/final state, varlen via `cu_seqlens`).

One program owns one (sequence, head, value block) and walks the chunks of `BT` tokens in order, keeping the state
`[BK, BV]` in registers (fla's "fused chunk" schedule). Inside a chunk, with `b_g` the within-chunk cumsum of `g`:
    o   = scale * ((q k^T) * exp(b_g_i - b_g_j)[j <= i]) v + scale * (q * exp(b_g)) S
    S  <- exp(b_g_last) S + (k * exp(b_g_last - b_g))^T v
Backward: `dq` walks forward recomputing S; `dk`, `dv` and `dS_0` walk backward carrying dS; `dg` follows from
    dG_t = q_t . dq_t - k_t . dk_t (+ <S_T, dS_T> at a sequence's last token),  dg_t = sum_{s >= t} dG_s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from ..utils import MAX_HEAD_DIM, autotune_configs, input_guard, next_power_of_2


@triton.autotune(configs=autotune_configs(), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def chunk_gated_retention_fwd_kernel(
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
    BT: tl.constexpr,
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
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_A = o_t[:, None] >= o_t[None, :]
    m_h = m_k[:, None] & m_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0).to(
            tl.float32
        )
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        o_i = bos + i_t * BT + o_t
        m_t = o_i < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_k = tl.load(k + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_v = tl.load(v + (o_i[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)  # [BT, BV]
        b_gr = tl.load(g + o_i * H + i_h, mask=m_t, other=0).to(tl.float32)  # [BT]
        b_g = tl.cumsum(b_gr, axis=0)
        b_g_last = tl.sum(b_gr, axis=0)
        b_D = tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf")))  # [BT, BT]
        b_s = tl.dot(b_q, tl.trans(b_k)) * b_D
        b_o = tl.dot(b_s, b_v) + tl.dot(b_q * tl.exp(b_g)[:, None], b_h)  # [BT, BV]
        tl.store(o + (o_i[:, None] * H + i_h) * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty), mask=m_tv)
        b_h = b_h * tl.exp(b_g_last) + tl.dot(tl.trans(b_k * tl.exp(b_g_last - b_g)[:, None]), b_v)
    if STORE_FINAL_STATE:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], b_h, mask=m_h)


@triton.autotune(configs=autotune_configs(), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def chunk_gated_retention_bwd_kernel_dq(
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, H, V]
    g,  # [TT, H] fp32
    do,  # [TT, H, V]
    dq,  # [NV, TT, H, K] fp32
    h0,  # [N, H, K, V] fp32
    cu_seqlens,  # [N + 1]
    scale,
    T,
    TT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
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
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_A = o_t[:, None] >= o_t[None, :]
    m_h = m_k[:, None] & m_v[None, :]
    dq += i_v.to(tl.int64) * TT * H * K

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0).to(
            tl.float32
        )
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        o_i = bos + i_t * BT + o_t
        m_t = o_i < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_k = tl.load(k + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_v = tl.load(v + (o_i[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)  # [BT, BV]
        b_do = tl.load(do + (o_i[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)
        b_gr = tl.load(g + o_i * H + i_h, mask=m_t, other=0).to(tl.float32)  # [BT]
        b_g = tl.cumsum(b_gr, axis=0)
        b_g_last = tl.sum(b_gr, axis=0)
        b_D = tl.exp(tl.where(m_A, b_g[:, None] - b_g[None, :], float("-inf")))  # [BT, BT]
        b_ds = tl.dot(b_do, tl.trans(b_v)) * b_D  # [BT, BT]
        b_dq = tl.dot(b_ds, b_k) + tl.dot(b_do, tl.trans(b_h)) * tl.exp(b_g)[:, None]  # [BT, BK]
        tl.store(dq + (o_i[:, None] * H + i_h) * K + o_k[None, :], b_dq * scale, mask=m_tk)
        b_h = b_h * tl.exp(b_g_last) + tl.dot(tl.trans(b_k * tl.exp(b_g_last - b_g)[:, None]), b_v)


@triton.autotune(configs=autotune_configs(), key=["H", "K", "V", "BT", "BK", "BV"])
@triton.jit
def chunk_gated_retention_bwd_kernel_dkv(
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, H, V]
    g,  # [TT, H] fp32
    do,  # [TT, H, V]
    dk,  # [NV, TT, H, K] fp32
    dv,  # [TT, H, V]
    dht,  # [N, H, K, V] fp32
    dh0,  # [N, H, K, V] fp32
    cu_seqlens,  # [N + 1]
    scale,
    T,
    TT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
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
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_A = o_t[:, None] <= o_t[None, :]  # [j, i]: key j reaches query i
    m_h = m_k[:, None] & m_v[None, :]
    dk += i_v.to(tl.int64) * TT * H * K

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_h, other=0).to(
            tl.float32
        )
    for i_t in range(tl.cdiv(eos - bos, BT) - 1, -1, -1):
        o_i = bos + i_t * BT + o_t
        # Walking backwards, rows below `bos` are the ones outside the sequence: bound both sides, so that a chunk a
        # pipelined loop prefetches past the end (i_t < 0) reads nothing.
        m_t = (o_i >= bos) & (o_i < eos)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        b_q = tl.load(q + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_k = tl.load(k + (o_i[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
        b_v = tl.load(v + (o_i[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)  # [BT, BV]
        b_do = tl.load(do + (o_i[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)
        b_gr = tl.load(g + o_i * H + i_h, mask=m_t, other=0).to(tl.float32)  # [BT]
        b_g = tl.cumsum(b_gr, axis=0)
        b_g_last = tl.sum(b_gr, axis=0)
        b_DT = tl.exp(tl.where(m_A, b_g[None, :] - b_g[:, None], float("-inf"))) * scale  # [BT(j), BT(i)]
        b_kd = tl.exp(b_g_last - b_g)  # [BT]
        b_sT = tl.dot(b_k, tl.trans(b_q)) * b_DT  # [BT(j), BT(i)]
        b_dv = tl.dot(b_sT, b_do) + tl.dot(b_k, b_dh) * b_kd[:, None]  # [BT, BV]
        b_dsT = tl.dot(b_v, tl.trans(b_do)) * b_DT  # [BT(j), BT(i)]
        b_dk = tl.dot(b_dsT, b_q) + tl.dot(b_v, tl.trans(b_dh)) * b_kd[:, None]  # [BT, BK]
        tl.store(dk + (o_i[:, None] * H + i_h) * K + o_k[None, :], b_dk, mask=m_tk)
        tl.store(dv + (o_i[:, None] * H + i_h) * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)
        b_dh = b_dh * tl.exp(b_g_last) + tl.dot(tl.trans(b_q * (tl.exp(b_g) * scale)[:, None]), b_do)
    if USE_INITIAL_STATE:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :], b_dh, mask=m_h)


def _prepare(
    q: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.LongTensor | None, block_v: int | None
) -> tuple[int, int, int, int, int, int, int]:
    """Sizes and launch configuration: (N, T, TT, BT, BK, BV, NV)."""
    batch, length, _, key_dim = q.shape
    value_dim = v.shape[-1]
    num_seqs = batch if cu_seqlens is None else len(cu_seqlens) - 1
    block_k = next_power_of_2(key_dim)
    if block_v is None:
        block_v = min(next_power_of_2(value_dim), 64)
    return num_seqs, length, batch * length, 64, block_k, block_v, triton.cdiv(value_dim, block_v)


def chunk_gated_retention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.LongTensor | None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel: returns `o` `[B, T, H, V]` and the final state `[N, H, K, V]` (fp32) or None."""
    num_seqs, length, total, bt, bk, bv, nv = _prepare(q, v, cu_seqlens, block_v)
    heads, key_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    o = torch.empty_like(v)
    ht = q.new_empty(num_seqs, heads, key_dim, value_dim, dtype=torch.float32) if output_final_state else None
    chunk_gated_retention_fwd_kernel[(num_seqs * heads, nv)](
        q, k, v, g, o, initial_state, ht, cu_seqlens, scale, length,
        H=heads, K=key_dim, V=value_dim, BT=bt, BK=bk, BV=bv,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        IS_VARLEN=cu_seqlens is not None,
    )  # fmt: skip
    return o, ht


def _reverse_cumsum(x: torch.Tensor, cu_seqlens: torch.LongTensor | None) -> torch.Tensor:
    """`sum_{s >= t}` along T of `x` `[B, T, H]`, restarted per packed sequence when `cu_seqlens` is given.

    Packed: `C[last token of t's sequence] - C[t] + x[t]` with one running sum `C` (fp64, so long packs lose no
    precision): no host sync and no loop over sequences.
    """
    if cu_seqlens is None:
        return x.flip(1).cumsum(1).flip(1)
    running = x.double().cumsum(1)  # [1, T, H]
    tokens = torch.arange(x.shape[1], device=x.device)
    last = cu_seqlens[1:][torch.searchsorted(cu_seqlens[1:], tokens, right=True)] - 1  # [T]
    return (running[:, last] - running + x.double()).to(x.dtype)


def chunk_gated_retention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    final_state: torch.Tensor | None,
    cu_seqlens: torch.LongTensor | None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the backward kernels: returns dq, dk, dv, dg (fp32) and d initial_state (or None)."""
    num_seqs, length, total, bt, bk, bv, nv = _prepare(q, v, cu_seqlens, block_v)
    heads, key_dim, value_dim = q.shape[2], q.shape[3], v.shape[3]
    dq = q.new_empty(nv, *q.shape, dtype=torch.float32)
    dk = q.new_empty(nv, *k.shape, dtype=torch.float32)
    dv = torch.empty_like(v)
    dh0 = torch.empty_like(initial_state, dtype=torch.float32) if initial_state is not None else None
    grid = (num_seqs * heads, nv)  # the long axis first: CUDA caps axes 1 and 2 at 65535 programs
    common = dict(H=heads, K=key_dim, V=value_dim, BT=bt, BK=bk, BV=bv, IS_VARLEN=cu_seqlens is not None)
    chunk_gated_retention_bwd_kernel_dq[grid](
        q, k, v, g, do, dq, initial_state, cu_seqlens, scale, length, total,
        USE_INITIAL_STATE=initial_state is not None, **common,
    )  # fmt: skip
    chunk_gated_retention_bwd_kernel_dkv[grid](
        q, k, v, g, do, dk, dv, dht, dh0, cu_seqlens, scale, length, total,
        USE_FINAL_STATE_GRADIENT=dht is not None, USE_INITIAL_STATE=initial_state is not None, **common,
    )  # fmt: skip
    dq, dk = dq.sum(0), dk.sum(0)
    dG = (q.float() * dq).sum(-1) - (k.float() * dk).sum(-1)  # [B, T, H]
    if dht is not None and final_state is not None:
        last = (dht * final_state).sum((-2, -1))  # [N, H]
        if cu_seqlens is None:
            dG[:, -1] += last
        else:
            dG[0, cu_seqlens[1:] - 1] += last
    dg = _reverse_cumsum(dG, cu_seqlens)
    return dq, dk, dv, dg, dh0


class GatedRetentionFunction(torch.autograd.Function):
    """Autograd for both Triton forwards (`forward_fn`: chunkwise or fused recurrent); one chunkwise backward."""

    @staticmethod
    @input_guard
    def forward(ctx, forward_fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
        g = g.float()
        o, ht = forward_fn(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, g, initial_state, ht, cu_seqlens)
        ctx.scale = scale
        return o, ht

    @staticmethod
    @input_guard
    def backward(ctx, do, dht):
        q, k, v, g, initial_state, ht, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = chunk_gated_retention_bwd(q, k, v, g, do, dht, ctx.scale, initial_state, ht, cu_seqlens)
        return None, dq.to(q.dtype), dk.to(k.dtype), dv, dg, None, dh0, None, None


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.LongTensor | None,
) -> None:
    """Shape checks of the gated retention entry points."""
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3] or g.shape != q.shape[:3]:
        raise ValueError(
            f"expected q, k [B, T, H, K], v [B, T, H, V], g [B, T, H]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}, {tuple(g.shape)}"
        )
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims above {MAX_HEAD_DIM} are not supported, got K={q.shape[-1]}, V={v.shape[-1]}")
    num_seqs = q.shape[0]
    if cu_seqlens is not None:
        if q.shape[0] != 1:
            raise ValueError(f"with `cu_seqlens` the batch size must be 1 (packed sequences), got {q.shape[0]}")
        num_seqs = len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (num_seqs, q.shape[2], q.shape[3], v.shape[3]):
        raise ValueError(
            f"initial_state must be [N, H, K, V] = {(num_seqs, q.shape[2], q.shape[3], v.shape[3])}, "
            f"got {tuple(initial_state.shape)}"
        )


def apply_gated_retention(
    forward_fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.LongTensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Body of both Triton entry points (`forward_fn`: chunkwise or fused recurrent forward): checks the shapes,
    defaults `scale` to `K ** -0.5`, takes the initial state in fp32 and runs `GatedRetentionFunction`."""
    check_inputs(q, k, v, g, initial_state, cu_seqlens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if initial_state is not None:
        initial_state = initial_state.float()
    return GatedRetentionFunction.apply(forward_fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def chunk_gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Chunkwise gated retention (Triton), differentiable in q, k, v, g and initial_state.

    Args:
        q (torch.Tensor): queries of shape `[B, T, H, K]`.
        k (torch.Tensor): keys of shape `[B, T, H, K]`.
        v (torch.Tensor): values of shape `[B, T, H, V]`.
        g (torch.Tensor): log decays (<= 0) of shape `[B, T, H]`, computed in fp32.
        scale (float, optional): query scale, defaults to `K ** -0.5` (YOCO pre-scales k and passes 1.0).
        initial_state (torch.Tensor, optional): fp32 states `[N, H, K, V]`; N = B, or the number of sequences.
        output_final_state (bool): also return the final states `[N, H, K, V]` in fp32.
        cu_seqlens (torch.LongTensor, optional): `[N + 1]` cumulative lengths of sequences packed in `B = 1`.

    Returns:
        `o` `[B, T, H, V]` (dtype of v) and the final state (or None).

    Examples::
        >>> q, k = torch.randn(2, 100, 4, 64, device="cuda"), torch.randn(2, 100, 4, 64, device="cuda")
        >>> v, g = torch.randn(2, 100, 4, 64, device="cuda"), -torch.rand(2, 100, 4, device="cuda")
        >>> o, ht = chunk_gated_retention(q, k, v, g, output_final_state=True)
    """
    return apply_gated_retention(
        chunk_gated_retention_fwd, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens
    )
