"""Liger-Kernel integration (`hf_yoco.integrations`): fused RMSNorm / SwiGLU / RoPE / (fused linear) cross-entropy.

On CPU the Liger kernels run in the Triton interpreter (`TRITON_INTERPRET=1`, set in `conftest.py`). Every test checks
both that Liger's kernels really ran (spies on `liger_kernel.transformers.functional`) and that the patched model
matches the unpatched one: loss and logits to 1e-5, every parameter gradient to relative RMSE 1e-4 (fp32; measured
about 1e-7 to 1e-6). PEFT's default-target registration is tested in `test_peft.py`.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_yoco
from hf_yoco import integrations
from hf_yoco.integrations import LIGER_MODEL_TYPES, apply_liger_kernel_to_hf_yoco
from hf_yoco.kernels.utils import patch_triton_interpreter_for_liger
from hf_yoco.models import modeling_block_transformer, modeling_common, modeling_yoco

liger_functional = pytest.importorskip("liger_kernel.transformers.functional")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Liger's kernels need CUDA or the Triton interpreter", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LIGER_OPS = ("liger_rms_norm", "liger_swiglu", "liger_rope", "liger_cross_entropy", "liger_fused_linear_cross_entropy")


@pytest.fixture(autouse=True)
def interpreter_like_compiled_triton():
    """Make triton 3.9's interpreter run Liger's RMSNorm / SwiGLU as compiled Triton does (CPU only; undone after).

    See `hf_yoco.kernels.utils.patch_triton_interpreter_for_liger` (shared with `benchmarks/kernel_speed.py --smoke`).
    """
    undo = patch_triton_interpreter_for_liger()
    yield
    undo()


@pytest.fixture(autouse=True)
def restore_hf_yoco():
    """Undo the process-wide patches (module-global RoPE, class-level forwards and loss hooks) after each test."""
    modules = (modeling_yoco, modeling_block_transformer)
    rotary = {module: module.apply_rotary_pos_emb for module in modules}
    forwards = {cls: cls.forward for cls in (modeling_common.RMSNorm, modeling_common.GatedMLP)}
    heads = (modeling_yoco.YocoForCausalLM, modeling_block_transformer.BlockTransformerForCausalLM)
    yield
    for module, function in rotary.items():
        module.apply_rotary_pos_emb = function
    for cls, forward in forwards.items():
        cls.forward = forward
        cls.__dict__.get("_hf_yoco_torch_forward") and delattr(cls, "_hf_yoco_torch_forward")
    for cls in heads:
        for name in ("_fused_linear_cross_entropy", "_loss_function"):
            if name in cls.__dict__:
                delattr(cls, name)


@pytest.fixture
def liger_calls(monkeypatch):
    """Counts the calls into Liger's functional API (what the patched hf_yoco layers call)."""
    calls = dict.fromkeys(LIGER_OPS, 0)
    for name in LIGER_OPS:
        original = getattr(liger_functional, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(liger_functional, name, counted)
    return calls


def build_model(variant: str) -> torch.nn.Module:
    common = dict(vocab_size=97, num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=None)
    if variant.startswith("yoco"):
        self_decoder_type = "sliding_window" if variant == "yoco_swa" else "gated_retention"
        config = hf_yoco.YocoConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            self_decoder_type=self_decoder_type,
            sliding_window=5 if self_decoder_type == "sliding_window" else None,
            retention_chunk_size=4,
            eos_token_id=None,
            **common,
        )
    else:
        config = hf_yoco.BlockTransformerConfig(
            block_length=4,
            hidden_size=32,
            intermediate_size=64,
            num_block_decoder_layers=2,
            num_token_decoder_layers=2,
            eos_token_id=None,
            **common,
            **(dict(layer_style="gpt_neox", hidden_act="gelu") if variant == "block_gpt_neox" else {}),
        )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(DEVICE)


def rel_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def assert_same_training_step(reference, patched, input_ids, **kwargs) -> None:
    """Loss, and every parameter gradient, of one training forward/backward agree."""
    reference.train()
    patched.train()
    expected = reference(input_ids, labels=input_ids, **kwargs)
    actual = patched(input_ids, labels=input_ids, **kwargs)
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)
    expected.loss.backward()
    actual.loss.backward()
    for (name, ref_param), param in zip(reference.named_parameters(), patched.parameters(), strict=True):
        if ref_param.grad is None:
            assert param.grad is None, name
            continue
        assert rel_rmse(ref_param.grad, param.grad) <= 1e-4, name


def test_model_types_are_registered_with_liger():
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    for model_type in LIGER_MODEL_TYPES:
        assert MODEL_TYPE_TO_APPLY_LIGER_FN[model_type] is apply_liger_kernel_to_hf_yoco


REGISTRATION_SCRIPT = """
import sys
if LIGER_FIRST:
    import liger_kernel.transformers.monkey_patch
import hf_yoco
assert ("liger_kernel" in sys.modules) == LIGER_FIRST, "import hf_yoco must not import liger-kernel"
from liger_kernel.transformers import AutoLigerKernelForCausalLM, _apply_liger_kernel_to_instance
from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
for model_type in hf_yoco.integrations.LIGER_MODEL_TYPES:
    assert MODEL_TYPE_TO_APPLY_LIGER_FN[model_type] is hf_yoco.integrations.apply_liger_kernel_to_hf_yoco
assert not any(type(finder).__name__ == "_RegisterWhenLigerImports" for finder in sys.meta_path)
"""


@pytest.mark.parametrize("liger_first", [False, True], ids=["hf_yoco_first", "liger_first"])
def test_registration_without_importing_liger(liger_first):
    """`import hf_yoco` does not import liger-kernel (about 0.5 s), yet both model types are in Liger's registry
    once Liger's lookups (Trainer, `AutoLigerKernelForCausalLM`) are importable, whichever package comes first."""
    script = f"LIGER_FIRST = {liger_first}\n{REGISTRATION_SCRIPT}"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("variant", ["yoco_retention", "yoco_swa", "block"])
def test_instance_patch_matches_pytorch(variant, liger_calls):
    """The Trainer path (`_apply_liger_kernel_to_instance`): every fused op runs, results unchanged."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    reference = build_model(variant)
    patched = copy.deepcopy(reference)
    _apply_liger_kernel_to_instance(model=patched)
    input_ids = torch.randint(1, 97, (2, 11), device=DEVICE)

    assert_same_training_step(reference, patched, input_ids)
    patched.train()
    assert patched(input_ids, labels=input_ids).logits is None  # fused linear cross-entropy: logits never built
    for op in ("liger_rms_norm", "liger_swiglu", "liger_rope", "liger_fused_linear_cross_entropy"):
        assert liger_calls[op] > 0, op
    norms = [m for m in patched.modules() if isinstance(m, modeling_common.RMSNorm)]
    assert norms and all(m.forward.__func__ is integrations._liger_rms_norm_forward for m in norms)

    reference.eval()
    patched.eval()
    with torch.no_grad():  # eval/generation keep their logits, through the fused norm/MLP/RoPE
        torch.testing.assert_close(patched(input_ids).logits, reference(input_ids).logits, rtol=1e-5, atol=1e-5)
        expected = reference.generate(input_ids[:1, :6], max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(patched.generate(input_ids[:1, :6], max_new_tokens=5, do_sample=False), expected)


def test_fused_loss_honours_num_items_in_batch_and_ignore_index(liger_calls):
    """Gradient-accumulation normalisation (Trainer's `num_items_in_batch`) and -100 labels, as `ForCausalLMLoss`."""
    reference = build_model("yoco_retention")
    patched = copy.deepcopy(reference)
    apply_liger_kernel_to_hf_yoco(model=patched)
    input_ids = torch.randint(1, 97, (2, 9), device=DEVICE)
    labels = input_ids.clone()
    labels[0, :4] = -100
    for model in (reference, patched):
        model.train()
    kwargs = dict(labels=labels, num_items_in_batch=torch.tensor(23))
    torch.testing.assert_close(patched(input_ids, **kwargs).loss, reference(input_ids, **kwargs).loss)
    assert liger_calls["liger_fused_linear_cross_entropy"] == 1


def test_cross_entropy_option_keeps_logits(liger_calls):
    reference = build_model("block")
    patched = copy.deepcopy(reference)
    apply_liger_kernel_to_hf_yoco(model=patched, cross_entropy=True, fused_linear_cross_entropy=False)
    input_ids = torch.randint(1, 97, (2, 12), device=DEVICE)
    assert_same_training_step(reference, patched, input_ids)
    assert patched(input_ids, labels=input_ids).logits is not None
    assert liger_calls["liger_cross_entropy"] > 0 and liger_calls["liger_fused_linear_cross_entropy"] == 0


def test_gpt_neox_style_block_transformer_partial_rotary(liger_calls):
    """LayerNorm + GELU MLP (nothing for Liger's RMSNorm/SwiGLU) but partial rotary RoPE and the fused loss."""
    reference = build_model("block_gpt_neox")
    patched = copy.deepcopy(reference)
    apply_liger_kernel_to_hf_yoco(model=patched)
    assert_same_training_step(reference, patched, torch.randint(1, 97, (2, 10), device=DEVICE))
    assert liger_calls["liger_rope"] > 0 and liger_calls["liger_fused_linear_cross_entropy"] > 0
    assert liger_calls["liger_rms_norm"] == liger_calls["liger_swiglu"] == 0


def test_class_patch_before_building(liger_calls):
    """Liger's `AutoLigerKernelForCausalLM` patches the classes first, then builds the model."""
    from liger_kernel.transformers import AutoLigerKernelForCausalLM

    reference = build_model("yoco_swa")
    torch.manual_seed(0)
    patched = AutoLigerKernelForCausalLM.from_config(reference.config).to(DEVICE)
    patched.load_state_dict(reference.state_dict())
    assert_same_training_step(reference, patched, torch.randint(1, 97, (2, 11), device=DEVICE))
    assert liger_calls["liger_rms_norm"] > 0 and liger_calls["liger_fused_linear_cross_entropy"] > 0


def test_skip_logits_without_liger():
    """Trainer sends `skip_logits=True` for loss-only evaluation with `use_liger_kernel`; it also works unpatched."""
    model = build_model("yoco_swa").eval()
    input_ids = torch.randint(1, 97, (1, 8), device=DEVICE)
    with torch.no_grad():
        full = model(input_ids, labels=input_ids)
        skipped = model(input_ids, labels=input_ids, skip_logits=True)
    assert skipped.logits is None
    torch.testing.assert_close(skipped.loss, full.loss)
    with pytest.raises(ValueError, match="skip_logits=True.*labels"):
        model(input_ids, skip_logits=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="cross_entropy.*fused_linear_cross_entropy"):
        apply_liger_kernel_to_hf_yoco(cross_entropy=True, fused_linear_cross_entropy=True)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="model_type in"):
        apply_liger_kernel_to_hf_yoco(model=llama)


def test_trainer_use_liger_kernel(tmp_path, liger_calls):
    """`hf-yoco train --liger-kernel` (TrainingArguments.use_liger_kernel): same run as without, through Liger."""
    from training_utils import tiny_args

    from hf_yoco.training import train

    flags = ("--max-steps", "3", "--learning-rate", "3e-3")
    plain = train(tiny_args(tmp_path / "torch", "yoco_swa", *flags))
    assert liger_calls["liger_fused_linear_cross_entropy"] == 0
    fused = train(tiny_args(tmp_path / "liger", "yoco_swa", *flags, "--liger-kernel"))
    # 3 training steps + 2 evaluation batches (loss-only evaluation: Trainer sends `skip_logits=True`)
    assert liger_calls["liger_fused_linear_cross_entropy"] == 5 and liger_calls["liger_rms_norm"] > 0
    assert fused["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-5)
    assert fused["eval_loss_after"] == pytest.approx(plain["eval_loss_after"], rel=1e-5)
    assert fused["param_checksum"] == pytest.approx(plain["param_checksum"], rel=1e-6)
