"""Out-of-bounds reads and writes of every Triton kernel, caught on CPU.

The Triton interpreter never faults on a bad pointer, so every input lives in a buffer whose margins hold NaN and
every buffer a launcher allocates is one too (`GuardMemory`): no margin may change, no NaN may leak into a result, and
every element of every output must be written. With `loop_overrun` each loop in the kernels also runs two iterations
past its end, as a pipelining compiler may prefetch them: those iterations must touch no memory and change nothing.
Results are compared with the PyTorch references (relative RMSE <= 0.005, fp32).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from _testing import DEVICE, GuardMemory, assert_close, loop_overrun, requires_triton

requires_triton()

if DEVICE != "cpu":
    pytest.skip("guard memory checks the Triton interpreter (CPU)", allow_module_level=True)


@pytest.fixture(params=["executed", "overrun"])
def overrun(request):
    """Whether the kernels' loops run past their ends (see `loop_overrun`)."""
    if request.param == "executed":
        return contextlib.nullcontext
    from hf_yoco.kernels.gated_retention import chunk, fused_recurrent
    from hf_yoco.kernels.shared_kv_attention import decode
    from hf_yoco.kernels.sliding_window_attention import chunk as window_chunk

    return lambda: loop_overrun(chunk, fused_recurrent, decode, window_chunk)


def run_guarded(fn, inputs: dict, grad_outputs, overrun) -> tuple[list, list]:
    """`fn(**inputs)` and its backward with guarded inputs and allocations; returns (outputs, input gradients)."""
    guard = GuardMemory()
    leaves = {name: guard.guard(x, name) for name, x in inputs.items()}
    with guard.allocations(), overrun():
        outputs = fn(**leaves)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = [x.grad for x in leaves.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    guard.check()
    return [o.detach() if o is not None else None for o in outputs], grads


def reference(fn, inputs: dict, grad_outputs) -> tuple[list, list]:
    leaves = {
        name: None if x is None else x.detach().clone().requires_grad_(x.requires_grad) for name, x in inputs.items()
    }
    outputs = fn(**leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    grads = [x.grad for x in leaves.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    return [o.detach() if o is not None else None for o in outputs], grads


def compare(ref, tri) -> None:
    for i, (a, b) in enumerate(zip(ref[0] + ref[1], tri[0] + tri[1])):
        if a is not None:
            assert_close(f"result {i}", a, b)


@pytest.mark.parametrize(
    ("entry", "batch", "length", "heads", "key_dim", "value_dim", "with_state", "lengths"),
    [
        pytest.param("fused_recurrent", 2, 9, 2, 32, 16, True, None, id="recurrent-B2-T9-H2-K32-V16-h0"),
        pytest.param("fused_recurrent", 1, 1, 3, 8, 8, True, None, id="recurrent-decode-T1"),
        pytest.param("chunk", 2, 9, 2, 32, 16, True, None, id="chunk-B2-T9-K32-V16-h0"),
        pytest.param("chunk", 2, 70, 1, 16, 96, False, None, id="chunk-T70-two-value-blocks"),
        pytest.param("chunk", 1, 81, 2, 24, 24, True, [5, 64, 12], id="chunk-varlen"),
        pytest.param("fused_recurrent", 1, 10, 2, 16, 16, True, [3, 1, 6], id="recurrent-varlen"),
    ],
)
def test_gated_retention(entry, batch, length, heads, key_dim, value_dim, with_state, lengths, overrun):
    from hf_yoco.kernels.gated_retention import naive_recurrent_gated_retention
    from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention
    from hf_yoco.kernels.gated_retention.fused_recurrent import fused_recurrent_gated_retention

    fn = chunk_gated_retention if entry == "chunk" else fused_recurrent_gated_retention
    num_seqs = batch if lengths is None else len(lengths)
    cu_seqlens = None if lengths is None else torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    inputs = dict(
        q=torch.randn(batch, length, heads, key_dim).requires_grad_(),
        k=torch.randn(batch, length, heads, key_dim).requires_grad_(),
        v=torch.randn(batch, length, heads, value_dim).requires_grad_(),
        g=(F.logsigmoid(torch.randn(batch, length, heads)) / 4).requires_grad_(),
        initial_state=torch.randn(num_seqs, heads, key_dim, value_dim).requires_grad_() if with_state else None,
        cu_seqlens=cu_seqlens,
    )
    grad_outputs = (torch.randn(batch, length, heads, value_dim), torch.randn(num_seqs, heads, key_dim, value_dim))

    def call(fn):
        return lambda **kw: fn(**kw, output_final_state=True)

    compare(
        reference(call(naive_recurrent_gated_retention), inputs, grad_outputs),
        run_guarded(call(fn), inputs, grad_outputs, overrun),
    )


@pytest.mark.parametrize(
    ("batch", "length", "kv_length", "heads", "kv_heads", "head_dim", "window"),
    [
        pytest.param(2, 9, 9, 4, 2, 32, 0, id="B2-T9-causal-GQA2"),
        pytest.param(1, 70, 100, 4, 1, 24, 17, id="T70-S100-W17-GQA4"),
        pytest.param(3, 5, 5, 2, 2, 16, 3, id="local-sequences-W3"),
    ],
)
def test_sliding_window_attention(batch, length, kv_length, heads, kv_heads, head_dim, window, overrun):
    from hf_yoco.kernels.sliding_window_attention import naive_sliding_window_attention
    from hf_yoco.kernels.sliding_window_attention.chunk import sliding_window_attention

    inputs = dict(
        q=torch.randn(batch, length, heads, head_dim).requires_grad_(),
        k=torch.randn(batch, kv_length, kv_heads, head_dim).requires_grad_(),
        v=torch.randn(batch, kv_length, kv_heads, head_dim).requires_grad_(),
    )
    grad_outputs = (torch.randn(batch, length, heads, head_dim),)
    compare(
        reference(lambda **kw: naive_sliding_window_attention(**kw, window_size=window), inputs, grad_outputs),
        run_guarded(lambda **kw: sliding_window_attention(**kw, window_size=window), inputs, grad_outputs, overrun),
    )


@pytest.mark.parametrize(
    ("batch", "length", "kv_length", "heads", "kv_heads", "head_dim", "num_splits"),
    [
        pytest.param(2, 1, 77, 4, 2, 32, 3, id="B2-T1-S77-splits3"),
        pytest.param(1, 3, 20, 8, 1, 16, None, id="T3-S20-GQA8"),
    ],
)
def test_shared_kv_attention(batch, length, kv_length, heads, kv_heads, head_dim, num_splits, overrun):
    from hf_yoco.kernels.shared_kv_attention import naive_shared_kv_attention
    from hf_yoco.kernels.shared_kv_attention.decode import shared_kv_attention

    inputs = dict(
        q=torch.randn(batch, length, heads, head_dim),
        k=torch.randn(batch, kv_length, kv_heads, head_dim),
        v=torch.randn(batch, kv_length, kv_heads, head_dim),
    )
    compare(
        reference(naive_shared_kv_attention, inputs, ()),
        run_guarded(lambda **kw: shared_kv_attention(**kw, num_splits=num_splits), inputs, (), overrun),
    )
