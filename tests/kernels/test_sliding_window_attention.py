"""Sliding-window / causal attention kernel vs the dense PyTorch reference (`naive_sliding_window_attention`).

Metric: relative RMSE `||tri - ref|| / ||ref||` <= 0.005 in fp32 for the output and dq, dk, dv.
"""

from __future__ import annotations

import pytest
import torch
from _testing import DEVICE, assert_close, requires_triton

from hf_yoco.kernels.sliding_window_attention import naive_sliding_window_attention

requires_triton()


@pytest.mark.parametrize(
    ("batch", "length", "kv_length", "heads", "kv_heads", "head_dim", "window", "sinks"),
    [
        pytest.param(2, 100, 100, 4, 2, 32, 17, 0, id="B2-T100-H4-Hkv2-D32-W17"),
        pytest.param(1, 37, 130, 2, 1, 16, 0, 0, id="B1-T37-S130-H2-Hkv1-D16-causal"),
        pytest.param(1, 70, 70, 2, 2, 24, 64, 0, id="B1-T70-H2-D24-W64"),
        pytest.param(1, 5, 90, 4, 2, 32, 20, 0, id="B1-T5-S90-GQA-W20"),
        pytest.param(2, 100, 100, 4, 2, 32, 17, 4, id="B2-T100-W17-sinks4"),
        pytest.param(1, 150, 150, 2, 1, 16, 17, 70, id="B1-T150-W17-sinks70-past-a-block"),
        pytest.param(1, 5, 90, 4, 2, 32, 20, 3, id="B1-T5-S90-W20-sinks3"),
    ],
)
def test_sliding_window_attention(batch, length, kv_length, heads, kv_heads, head_dim, window, sinks, tile=None):
    from hf_yoco.kernels.sliding_window_attention.chunk import sliding_window_attention

    torch.manual_seed(42)
    q = torch.randn(batch, length, heads, head_dim, device=DEVICE)
    k = torch.randn(batch, kv_length, kv_heads, head_dim, device=DEVICE)
    v = torch.randn(batch, kv_length, kv_heads, head_dim, device=DEVICE)
    do = torch.randn_like(q)
    results = []
    for fn in (naive_sliding_window_attention, sliding_window_attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*leaves, window_size=window, sinks=sinks, **({"tile": tile} if fn is sliding_window_attention else {}))
        (o * do).sum().backward()
        results.append((o, *(x.grad for x in leaves)))
    for name, ref, tri in zip(("o", "dq", "dk", "dv"), *results):
        assert_close(name, ref, tri)


def _gpu_tiles():
    from hf_yoco.kernels.sliding_window_attention.chunk import GPU_TILES, SMALL_TILE

    return (*GPU_TILES, SMALL_TILE)


@pytest.mark.parametrize("tile", _gpu_tiles(), ids=lambda tile: f"BM{tile[0]}-BN{tile[1]}")
def test_every_autotune_tile_is_correct(tile):
    """Each (BM, BN) tile the GPU autotuner may pick, pinned and run here (in the interpreter on CPU)."""
    test_sliding_window_attention(1, 75, 90, 4, 2, 32, 33, 0, tile=tile)


def test_rejects_fewer_keys_than_queries():
    from hf_yoco.kernels.sliding_window_attention.chunk import sliding_window_attention

    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="S >= T"):
        sliding_window_attention(q, q[:, :4], q[:, :4])


@pytest.mark.slow
def test_sliding_window_attention_long():
    test_sliding_window_attention(1, 600, 600, 4, 2, 64, 128, 4)
