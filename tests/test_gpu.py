"""CUDA checks of the three models with `kernel_backend="auto"` (the Triton kernels): forward, generate, a Trainer
step, and bf16 numerics against an fp32 reference. Marked `gpu`; skipped without a CUDA device (CI has none).

Run on a GPU machine with `python -m pytest -q -m gpu tests/test_gpu.py` (or `bash benchmarks/gpu_check.sh`).

Tolerances: fp32 comparisons use relative RMSE <= 0.005 (the kernels multiply fp32 operands in TF32, enabled here
with `torch.set_float32_matmul_precision("high")`, as `auto` requires for fp32); bf16 paths are judged against an
fp32 reference on the same weights: the Triton path's error must stay within 1.5x the PyTorch path's, plus 0.005.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from training_utils import VARIANTS, tiny_args

import hf_yoco
from hf_yoco.kernels import ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEVICE = "cuda"
SIZES = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = {
    "yoco-gret": lambda: hf_yoco.YocoConfig(**SIZES, num_hidden_layers=6, self_decoder_type="gated_retention"),
    "yoco-swa": lambda: hf_yoco.YocoConfig(
        **SIZES, num_hidden_layers=6, self_decoder_type="sliding_window", sliding_window=128
    ),
    "block-transformer": lambda: hf_yoco.BlockTransformerConfig(
        **SIZES, block_length=4, num_block_decoder_layers=3, num_token_decoder_layers=3
    ),
}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    return ((value - reference).norm() / reference.norm()).item()


@pytest.fixture(autouse=True)
def tf32_matmuls():
    """`auto` runs the kernels on fp32 tensors only when torch may use TF32 too."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the model calls that ran a Triton kernel (`ops.dispatch` returned an op that did not decline)."""
    calls = []
    dispatch = ops.dispatch

    def counted(backend, name, tensor):
        op = dispatch(backend, name, tensor)
        if op is None:
            return None

        def run(*args, **kwargs):
            result = op(*args, **kwargs)
            calls.append(name) if result is not None else None
            return result

        return run

    monkeypatch.setattr(ops, "dispatch", counted)
    return calls


def build(name: str, dtype: torch.dtype = torch.float32):
    """The model `name` on the GPU in `dtype`, eval mode, `kernel_backend="auto"`."""
    torch.manual_seed(0)
    model_class = hf_yoco.BlockTransformerForCausalLM if name == "block-transformer" else hf_yoco.YocoForCausalLM
    return model_class(CONFIGS[name]()).to(DEVICE, dtype).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_backward_match_the_pytorch_path(name, kernel_calls):
    model = build(name).train()
    input_ids = torch.randint(1, 512, (2, 300), device=DEVICE)
    results = {}
    for backend in ("torch", "auto"):
        model.config.kernel_backend = backend
        model.zero_grad()
        out = model(input_ids, labels=input_ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out.logits.detach(), grads)
    assert kernel_calls, "no Triton kernel ran"
    assert relative_error(results["auto"][0], results["torch"][0]) <= 0.005
    for parameter, grad in results["torch"][1].items():
        assert relative_error(results["auto"][1][parameter], grad) <= 0.005, parameter


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_with_the_cache_matches_the_pytorch_path(name, kernel_calls):
    model = build(name)
    prompt = torch.randint(1, 512, (2, 200), device=DEVICE)
    generated = {}
    for backend in ("torch", "auto"):
        model.config.kernel_backend = backend
        generated[backend] = model.generate(
            prompt, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=True,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    assert kernel_calls, "no Triton kernel ran"
    for step, (ref, tri) in enumerate(zip(generated["torch"].logits, generated["auto"].logits)):
        assert relative_error(tri, ref) <= 0.005, step
    # Tokens: identical unless two logits are closer than the kernels' rounding (then the first differing step shows).
    assert torch.equal(generated["torch"].sequences, generated["auto"].sequences)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_triton_path_is_as_accurate_as_the_pytorch_path(name, tmp_path):
    """Same (bf16-rounded) weights: bf16 logits of the Triton path and of the PyTorch path against fp32 logits."""
    bf16 = build(name, dtype=torch.bfloat16)
    reference = copy.deepcopy(bf16).float()
    reference.config.kernel_backend = "torch"  # the exact fp32 reference (deepcopy gave it its own config)
    torch.set_float32_matmul_precision("highest")
    input_ids = torch.randint(1, 512, (1, 2048), device=DEVICE)
    errors = {}
    with torch.no_grad():
        exact = reference(input_ids).logits[:, -64:]
        for backend in ("torch", "auto"):
            bf16.config.kernel_backend = backend
            logits = bf16(input_ids).logits[:, -64:]
            errors[backend] = relative_error(logits, exact)
            errors[f"{backend}_argmax_agreement"] = (logits.argmax(-1) == exact.argmax(-1)).float().mean().item()
    print(f"{name} bf16 vs fp32 logits: {errors}")
    if report := os.environ.get("HF_YOCO_GPU_REPORT"):
        with open(report, "a") as f:
            f.write(json.dumps({"model": name, "device": torch.cuda.get_device_name(), **errors}) + "\n")
    assert errors["auto"] <= 1.5 * errors["torch"] + 0.005, errors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_trainer_step_in_bf16(tmp_path, variant):
    from hf_yoco.training import train

    args = tiny_args(tmp_path, variant, "--bf16", "--max-steps", "2")
    args.cpu = False
    summary = train(args)
    assert summary["global_step"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))
