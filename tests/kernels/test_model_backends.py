"""Whole models with `kernel_backend="triton"` (interpreted on CPU) vs `"torch"`.

Logits, loss and every parameter gradient agree (relative RMSE <= 0.005 in fp32), greedy decoding through the cache
gives the same tokens and logits, and the Triton kernels are really called (counted through `hf_yoco.kernels.ops`).
"""

from __future__ import annotations

import pytest
import torch
from _testing import DEVICE, assert_close, requires_triton

from hf_yoco.kernels import ops
from hf_yoco.models.configuration_block_transformer import BlockTransformerConfig
from hf_yoco.models.configuration_yoco import YocoConfig
from hf_yoco.models.modeling_block_transformer import BlockTransformerForCausalLM
from hf_yoco.models.modeling_yoco import YocoForCausalLM

requires_triton()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of `ops.gated_retention` / `ops.attention` that ran a Triton kernel."""
    calls = {"gated_retention": 0, "attention": 0}
    for name in calls:
        original = getattr(ops, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            result = _original(*args, **kwargs)
            calls[_name] += result is not None
            return result

        monkeypatch.setattr(ops, name, counted)
    return calls


def yoco_model(self_decoder_type: str, **overrides) -> YocoForCausalLM:
    config = YocoConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        self_decoder_type=self_decoder_type,
        sliding_window=5 if self_decoder_type == "sliding_window" else None,
        retention_chunk_size=4,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        **overrides,
    )
    torch.manual_seed(0)
    return YocoForCausalLM(config).to(DEVICE)


def forward_backward(model, input_ids, backend, **kwargs):
    model.config.kernel_backend = backend
    model.zero_grad()
    out = model(input_ids, labels=input_ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def compare_training_step(model, input_ids, **kwargs):
    model.train()
    ref = forward_backward(model, input_ids, "torch", **kwargs)
    tri = forward_backward(model, input_ids, "triton", **kwargs)
    assert_close("logits", ref[0], tri[0])
    assert_close("loss", ref[1], tri[1])
    assert ref[2].keys() == tri[2].keys()
    for name in ref[2]:
        assert_close(f"grad {name}", ref[2][name], tri[2][name])


def compare_generation(model, input_ids):
    model.eval()
    results = {}
    for backend in ("torch", "triton"):
        model.config.kernel_backend = backend
        results[backend] = model.generate(
            input_ids, max_new_tokens=4, do_sample=False, disable_compile=True, output_logits=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    assert torch.equal(results["torch"].sequences, results["triton"].sequences)
    for ref, tri in zip(results["torch"].logits, results["triton"].logits):
        assert_close("decode logits", ref, tri)


@pytest.mark.parametrize("self_decoder_type", ["gated_retention", "sliding_window"])
def test_yoco_triton_matches_torch(self_decoder_type, kernel_calls):
    model = yoco_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 19), device=DEVICE)
    compare_training_step(model, input_ids)
    compare_generation(model, input_ids[:, :7])
    if self_decoder_type == "gated_retention":
        assert kernel_calls["gated_retention"] > 0
    assert kernel_calls["attention"] > 0


def test_yoco_attention_sinks_triton_matches_torch(kernel_calls):
    """Sinks in the kernel: first in the sequence while training / prefilling, put before the cached window while
    decoding past it."""
    model = yoco_model("sliding_window", attention_sink_tokens=2)
    input_ids = torch.randint(1, 64, (2, 19), device=DEVICE)
    compare_training_step(model, input_ids)
    calls = kernel_calls["attention"]
    assert calls > 0
    compare_generation(model, input_ids[:, :7])
    assert kernel_calls["attention"] > 2 * calls  # the decode steps past the window ran the kernel too


def test_yoco_checks_the_mask_once_per_forward(monkeypatch):
    """The sliding-window layers of one forward share one mask: its band check runs once, not once per layer; the
    next forward's new mask is checked again."""
    monkeypatch.setattr(ops, "_plain_mask_cache", None)
    masks, checks = [], []
    attention, band_matches = ops.attention, ops._band_matches

    def counted_attention(module, query, key, value, attention_mask, *args):
        masks.append(attention_mask)
        return attention(module, query, key, value, attention_mask, *args)

    monkeypatch.setattr(ops, "attention", counted_attention)
    monkeypatch.setattr(ops, "_band_matches", lambda *args: checks.append(args[1:]) or band_matches(*args))
    model = yoco_model("sliding_window").eval()
    model.config.kernel_backend = "triton"
    input_ids = torch.randint(1, 64, (2, 19), device=DEVICE)
    for forward in (1, 2):
        masks.clear()
        with torch.no_grad():
            model(input_ids)
        with_mask = [mask for mask in masks if mask is not None]
        assert len(with_mask) > 1 and all(mask is with_mask[0] for mask in with_mask)
        assert len(checks) == forward


def test_yoco_chunk_kernel_in_model(monkeypatch, kernel_calls):
    """Force the chunkwise gRet kernel (not the fused recurrent one) for every multi-token call."""
    monkeypatch.setattr(ops, "FUSED_RECURRENT_MAX_LEN", 1)
    model = yoco_model("gated_retention")
    input_ids = torch.randint(1, 64, (1, 70), device=DEVICE)
    compare_training_step(model, input_ids)
    assert kernel_calls["gated_retention"] > 0


def test_yoco_padded_batch_falls_back_and_agrees():
    """Left padding: attention masks are not the plain causal band, so attention stays on PyTorch; gRet still
    runs in Triton (padding is zeroed into k, v and g)."""
    model = yoco_model("gated_retention").eval()
    input_ids = torch.randint(1, 64, (2, 9), device=DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    logits = {}
    for backend in ("torch", "triton"):
        model.config.kernel_backend = backend
        with torch.no_grad():
            logits[backend] = model(input_ids, attention_mask=attention_mask).logits
    assert_close("logits", logits["torch"][attention_mask.bool()], logits["triton"][attention_mask.bool()])


def test_yoco_packed_sequences_use_the_varlen_kernel(kernel_calls):
    """Packed sequences (position_ids restarting inside the row): gRet runs the kernel with `cu_seqlens`; logits, loss
    and gradients agree with the PyTorch varlen path."""
    model = yoco_model("gated_retention")
    lengths = (6, 1, 9, 4)
    input_ids = torch.randint(1, 64, (1, sum(lengths)), device=DEVICE)
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lengths])[None]
    compare_training_step(model, input_ids, position_ids=position_ids)
    assert kernel_calls["gated_retention"] > 0


def test_block_transformer_triton_matches_torch(kernel_calls):
    config = BlockTransformerConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        block_length=4,
        num_prefix_tokens=2,
        num_block_decoder_layers=2,
        num_token_decoder_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = BlockTransformerForCausalLM(config).to(DEVICE)
    input_ids = torch.randint(1, 64, (2, 16), device=DEVICE)
    compare_training_step(model, input_ids)
    assert kernel_calls["attention"] > 0
    compare_generation(model, input_ids[:, :8])


def test_kernel_backend_validation(monkeypatch):
    with pytest.raises(ValueError, match="kernel_backend"):
        YocoConfig(kernel_backend="cuda")
    with pytest.raises(ValueError, match="kernel_backend"):
        BlockTransformerConfig(kernel_backend="fast")
    assert not ops.use_triton("auto", torch.zeros(1))  # CPU tensors: PyTorch under "auto"
    assert not ops.use_triton("torch", torch.zeros(1))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.use_triton("triton", torch.zeros(1))
