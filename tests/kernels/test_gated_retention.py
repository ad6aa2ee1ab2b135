"""Gated retention kernels vs the PyTorch recurrence (`naive_recurrent_gated_retention`).

Metric: relative RMSE `||tri - ref|| / ||ref||` <= 0.005 in fp32 for the output, the final state and the gradients
dq, dk, dv, dg and d initial_state. On CPU the kernels run in the Triton interpreter (`conftest.py`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _testing import DEVICE, assert_close, requires_triton

from hf_yoco.kernels.gated_retention import naive_recurrent_gated_retention

requires_triton()


def make_inputs(batch, length, heads, key_dim, value_dim, with_state, seed=42):
    torch.manual_seed(seed)
    q = torch.randn(batch, length, heads, key_dim, device=DEVICE)
    k = torch.randn(batch, length, heads, key_dim, device=DEVICE)
    v = torch.randn(batch, length, heads, value_dim, device=DEVICE)
    g = F.logsigmoid(torch.randn(batch, length, heads, device=DEVICE)) / 4  # log decay in (-inf, 0)
    h0 = torch.randn(batch, heads, key_dim, value_dim, device=DEVICE) if with_state else None
    return q, k, v, g, h0


def run(fn, q, k, v, g, h0, do, dht, **kwargs):
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    h0 = None if h0 is None else h0.clone().requires_grad_()
    o, ht = fn(*leaves, initial_state=h0, output_final_state=True, **kwargs)
    ((o * do).sum() + (ht * dht).sum()).backward()
    grads = [x.grad for x in leaves] + ([h0.grad] if h0 is not None else [])
    return o, ht, grads


def assert_all_close(ref, tri):
    """Two `run` results agree: output, final state and every gradient (dq, dk, dv, dg and dh0 when given)."""
    assert_close("o", ref[0], tri[0])
    assert_close("ht", ref[1], tri[1])
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), ref[2], tri[2]):
        assert_close(name, a, b)


def check(fn, batch, length, heads, key_dim, value_dim, with_state, **kwargs):
    q, k, v, g, h0 = make_inputs(batch, length, heads, key_dim, value_dim, with_state)
    do = torch.randn_like(v)
    dht = torch.randn(batch, heads, key_dim, value_dim, device=DEVICE)
    ref = run(naive_recurrent_gated_retention, q, k, v, g, h0, do, dht)
    tri = run(fn, q, k, v, g, h0, do, dht, **kwargs)
    assert_all_close(ref, tri)


@pytest.mark.parametrize(
    ("batch", "length", "heads", "key_dim", "value_dim", "with_state"),
    [
        pytest.param(2, 63, 2, 32, 32, True, id="B2-T63-H2-K32-V32-h0"),
        pytest.param(1, 130, 1, 16, 96, False, id="B1-T130-H1-K16-V96-two-value-blocks"),
        pytest.param(1, 7, 2, 8, 24, True, id="B1-T7-H2-K8-V24-h0"),
    ],
)
def test_chunk(batch, length, heads, key_dim, value_dim, with_state):
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention

    check(chunk_gated_retention, batch, length, heads, key_dim, value_dim, with_state)


def test_chunk_split_value_blocks():
    """Forward with V split into three program blocks of 16 (the last one partial). The backward's partial dq / dk,
    summed on the host, are covered by test_chunk's V=96 case (two blocks of 64)."""
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention_fwd

    q, k, v, g, h0 = make_inputs(1, 40, 1, 16, 40, True)
    with torch.no_grad():
        ref_o, ref_ht = naive_recurrent_gated_retention(q, k, v, g, 0.25, h0, True)
        o, ht = chunk_gated_retention_fwd(q, k, v, g.float(), 0.25, h0, True, None, block_v=16)
    assert_close("o", ref_o, o)
    assert_close("ht", ref_ht, ht)


@pytest.mark.parametrize(
    ("batch", "length", "heads", "key_dim", "value_dim", "with_state"),
    [
        pytest.param(2, 9, 2, 32, 16, True, id="B2-T9-H2-K32-V16-h0"),
        pytest.param(1, 1, 3, 8, 8, True, id="B1-T1-H3-K8-V8-h0"),
        pytest.param(1, 5, 1, 16, 16, False, id="B1-T5-H1-K16-V16"),
    ],
)
def test_fused_recurrent(batch, length, heads, key_dim, value_dim, with_state):
    from hf_yoco.kernels.gated_retention.fused_recurrent import fused_recurrent_gated_retention

    check(fused_recurrent_gated_retention, batch, length, heads, key_dim, value_dim, with_state)


@pytest.mark.parametrize("entry", ["chunk", "fused_recurrent"])
def test_varlen_matches_per_sequence(entry):
    """Packed sequences with `cu_seqlens` == each sequence alone (outputs, states, all gradients)."""
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention
    from hf_yoco.kernels.gated_retention.fused_recurrent import fused_recurrent_gated_retention

    fn = chunk_gated_retention if entry == "chunk" else fused_recurrent_gated_retention
    lengths = [5, 70, 1, 20] if entry == "chunk" else [3, 1, 6]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    total, heads, key_dim, value_dim = sum(lengths), 2, 16, 16
    q, k, v, g, _ = make_inputs(1, total, heads, key_dim, value_dim, False)
    h0 = torch.randn(len(lengths), heads, key_dim, value_dim, device=DEVICE)
    do = torch.randn_like(v)
    dht = torch.randn_like(h0)
    ref = run(naive_recurrent_gated_retention, q, k, v, g, h0, do, dht, cu_seqlens=cu_seqlens)
    tri = run(fn, q, k, v, g, h0, do, dht, cu_seqlens=cu_seqlens)
    assert_all_close(ref, tri)
    # The reference itself: packed == one call per sequence.
    bos = cu_seqlens[1].item()
    o1, _ = naive_recurrent_gated_retention(q[:, bos:], k[:, bos:], v[:, bos:], g[:, bos:], None, h0[1:2], True)
    assert_close("o[seq 1]", o1[:, : lengths[1]], tri[0][:, bos : bos + lengths[1]].detach())


def test_reference_matches_the_model_torch_forms():
    """The kernels' reference is the model's PyTorch path: its parallel and chunkwise forms (keys and initial state
    pre-scaled, as YOCO calls them) give the same outputs and states."""
    from hf_yoco.models.modeling_yoco import chunk_gated_retention, parallel_gated_retention

    q, k, v, g, h0 = make_inputs(2, 17, 2, 8, 8, True)
    scale = q.shape[-1] ** -0.5
    ref_o, ref_ht = naive_recurrent_gated_retention(q, k, v, g, None, h0, True)
    for form in (parallel_gated_retention, lambda *a: chunk_gated_retention(*a[:4], 4, *a[4:])):
        o, ht = form(q, k * scale, v, g, h0 * scale, True)
        assert_close("o", ref_o, o, 1e-5)
        assert_close("ht", ref_ht * scale, ht, 1e-5)


def test_rejects_bad_shapes():
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention

    q, k, v, g, _ = make_inputs(2, 4, 1, 8, 8, False)
    with pytest.raises(ValueError, match="g"):
        chunk_gated_retention(q, k, v, g[..., None])
    with pytest.raises(ValueError, match="batch size must be 1"):
        chunk_gated_retention(q, k, v, g, cu_seqlens=torch.tensor([0, 2, 4]))


@pytest.mark.slow
def test_chunk_long():
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention

    check(chunk_gated_retention, 2, 500, 2, 64, 64, True)
