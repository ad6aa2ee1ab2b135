"""Property-based parity of the Triton kernels (interpreted on CPU) with their PyTorch references: generated batch,
lengths (around the 64-token chunk and the attention tiles), heads, GQA ratio, head dims, window, initial state and
packed sequences. Relative RMSE <= 0.005 for outputs, final states and every gradient. See tests/test_properties.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _testing import DEVICE, assert_close, requires_triton
from conftest import examples
from hypothesis import given
from hypothesis import strategies as st

requires_triton()

LENGTHS = st.one_of(st.sampled_from([1, 2, 15, 16, 17, 63, 64, 65]), st.integers(1, 80))


@examples(100)
@given(data=st.data())
def test_gated_retention(data):
    from hf_yoco.kernels.gated_retention import naive_recurrent_gated_retention
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention
    from hf_yoco.kernels.gated_retention.fused_recurrent import fused_recurrent_gated_retention

    draw = data.draw
    fn = draw(st.sampled_from([chunk_gated_retention, fused_recurrent_gated_retention]))
    packed = draw(st.booleans())
    lengths = draw(st.lists(LENGTHS, min_size=1, max_size=3)) if packed else [draw(LENGTHS)]
    batch = 1 if packed else draw(st.integers(1, 2))
    heads, key_dim, value_dim = (
        draw(st.integers(1, 3)),
        draw(st.sampled_from([8, 16, 24, 32])),
        draw(st.sampled_from([8, 16, 40])),
    )
    total = sum(lengths)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    q, k = (torch.randn(batch, total, heads, key_dim, device=DEVICE) for _ in range(2))
    v = torch.randn(batch, total, heads, value_dim, device=DEVICE)
    g = F.logsigmoid(torch.randn(batch, total, heads, device=DEVICE)) / 4
    num_seqs = len(lengths) if packed else batch
    h0 = torch.randn(num_seqs, heads, key_dim, value_dim, device=DEVICE) if draw(st.booleans()) else None
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE) if packed else None
    do, dht = torch.randn_like(v), torch.randn(num_seqs, heads, key_dim, value_dim, device=DEVICE)
    results = []
    for impl in (naive_recurrent_gated_retention, fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
        state = None if h0 is None else h0.clone().requires_grad_()
        o, ht = impl(*leaves, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens)
        ((o * do).sum() + (ht * dht).sum()).backward()
        results.append([o, ht, *(x.grad for x in leaves), *([] if state is None else [state.grad])])
    for name, ref, tri in zip(("o", "ht", "dq", "dk", "dv", "dg", "dh0"), *results):
        if ref.abs().max() < 1e-6:  # e.g. dg of a first token from a zero state: exactly 0 (no relative error)
            assert tri.abs().max() < 1e-4, f"{name}: {tri.abs().max():.3e} where the reference is 0"
        else:
            assert_close(name, ref, tri)


@examples(80)
@given(data=st.data())
def test_sliding_window_attention(data):
    from hf_yoco.kernels.sliding_window_attention import naive_sliding_window_attention
    from hf_yoco.kernels.sliding_window_attention.chunk import sliding_window_attention

    draw = data.draw
    length = draw(LENGTHS)
    kv_length = length + draw(st.sampled_from([0, 0, 1, 7, 40]))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16, 24, 32]))
    window = draw(st.one_of(st.just(0), st.integers(1, 70)))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(draw(st.integers(1, 2)), length, heads, head_dim, device=DEVICE)
    k, v = (torch.randn(q.shape[0], kv_length, kv_heads, head_dim, device=DEVICE) for _ in range(2))
    do = torch.randn_like(q)
    results = []
    for impl in (naive_sliding_window_attention, sliding_window_attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = impl(*leaves, window_size=window)
        (o * do).sum().backward()
        results.append([o, *(x.grad for x in leaves)])
    for name, ref, tri in zip(("o", "dq", "dk", "dv"), *results):
        if ref.abs().max() > 0:  # a window of keys all in the future: every output row is 0 in both
            assert_close(name, ref, tri)


@examples(50)
@given(data=st.data())
def test_shared_kv_decode(data):
    from hf_yoco.kernels.shared_kv_attention import naive_shared_kv_attention
    from hf_yoco.kernels.shared_kv_attention.decode import shared_kv_attention

    draw = data.draw
    length = draw(st.integers(1, 4))
    kv_length = length + draw(st.integers(0, 200))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4, 8]))
    head_dim = draw(st.sampled_from([8, 16, 32]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    q = torch.randn(draw(st.integers(1, 3)), length, heads, head_dim, device=DEVICE)
    k, v = (torch.randn(q.shape[0], kv_length, kv_heads, head_dim, device=DEVICE) for _ in range(2))
    splits = draw(st.one_of(st.none(), st.integers(1, 5)))
    assert_close("o", naive_shared_kv_attention(q, k, v), shared_kv_attention(q, k, v, num_splits=splits))
