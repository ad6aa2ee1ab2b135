"""Split-K shared-KV decode attention vs the dense PyTorch reference (`naive_shared_kv_attention`).

Metric: relative RMSE `||tri - ref|| / ||ref||` <= 0.005 in fp32 (forward only: decode is inference).
"""

from __future__ import annotations

import pytest
import torch
from _testing import DEVICE, assert_close, requires_triton

from hf_yoco.kernels.shared_kv_attention import naive_shared_kv_attention

requires_triton()


@pytest.mark.parametrize(
    ("batch", "length", "kv_length", "heads", "kv_heads", "head_dim", "num_splits"),
    [
        pytest.param(2, 1, 300, 4, 2, 32, 3, id="B2-T1-S300-GQA2-splits3"),
        pytest.param(1, 3, 77, 8, 2, 16, None, id="B1-T3-S77-GQA4-auto-splits"),
        pytest.param(2, 2, 200, 2, 2, 24, 4, id="B2-T2-S200-MHA-D24-splits4"),
        pytest.param(1, 1, 5, 2, 1, 16, 2, id="B1-T1-S5-more-splits-than-tiles"),
    ],
)
def test_shared_kv_attention(batch, length, kv_length, heads, kv_heads, head_dim, num_splits):
    from hf_yoco.kernels.shared_kv_attention.decode import shared_kv_attention

    torch.manual_seed(42)
    q = torch.randn(batch, length, heads, head_dim, device=DEVICE)
    k = torch.randn(batch, kv_length, kv_heads, head_dim, device=DEVICE)
    v = torch.randn(batch, kv_length, kv_heads, head_dim, device=DEVICE)
    assert_close("o", naive_shared_kv_attention(q, k, v), shared_kv_attention(q, k, v, num_splits=num_splits))


@pytest.mark.slow
def test_shared_kv_attention_long():
    test_shared_kv_attention(2, 1, 4000, 8, 2, 64, 8)


def test_rejects_bad_shapes():
    from hf_yoco.kernels.shared_kv_attention.decode import shared_kv_attention

    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="S >= T"):
        shared_kv_attention(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match="k/v"):
        shared_kv_attention(q, q[..., :8], q[..., :8])
