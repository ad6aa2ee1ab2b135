"""Optional integrations with other libraries, activated by `import hf_yoco` when those libraries are installed.

PEFT (default LoRA targets) and Liger-Kernel (fused RMSNorm / SwiGLU / RoPE / cross-entropy for training), below.

PEFT: default LoRA target modules per model type, so `get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))`
works without `target_modules`. The same names are used across layers, so one list covers each model:

- `hf_yoco`: `q_proj`, `k_proj`, `v_proj`, `o_proj`. In the self-decoder these are the sliding-window / gated
  retention projections of every layer (the retention gates `g_proj`/`gt_proj` stay frozen: they set the decay
  and output gating, which a low-rank update can destabilise; add them explicitly if wanted). The cross-decoder has
  **no per-layer k/v**: its layers only own `cross_attn.q_proj`/`o_proj`, and `k_proj`/`v_proj` match the one
  shared `model.global_kv.k_proj`/`v_proj`, so the adapter changes the single global K/V that all cross layers read.
- `hf_yoco_block_transformer`: `q_proj`, `k_proj`, `v_proj`, `o_proj` of every block-decoder and token-decoder
  layer (the block embedder and the `context_to_prefix` bridge stay frozen).

MLPs (`gate_proj`, `up_proj`, `down_proj`) are left out of the defaults, as for Llama in PEFT; use
`target_modules="all-linear"` for every linear layer except the LM head.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from torch import nn

from .kernels.utils import is_triton_usable

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES: dict[str, list[str]] = {
    "hf_yoco": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "hf_yoco_block_transformer": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def register_peft() -> bool:
    """Add hf_yoco's default LoRA targets to PEFT's mapping (user entries win). Returns False if peft is absent."""
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:  # peft stays optional
        return False
    for model_type, targets in LORA_TARGET_MODULES.items():
        mapping.setdefault(model_type, list(targets))
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Liger-Kernel
# ---------------------------------------------------------------------------------------------------------------------
# hf_yoco ships its own kernels only for what the papers add (gated retention, sliding-window and shared-KV
# attention). The generic hot spots of a Llama-style block are Liger-Kernel's: fused RMSNorm, SwiGLU, RoPE and
# (fused linear) cross-entropy, maintained with convergence tests and used by transformers' Trainer. hf_yoco
# registers its two model types with Liger, so the usual switches work unchanged:
#
#     TrainingArguments(..., use_liger_kernel=True)            # Trainer applies it to the model instance
#     AutoLigerKernelForCausalLM.from_pretrained(path)         # patches the classes, then loads
#     hf_yoco.integrations.apply_liger_kernel_to_hf_yoco(model=model)
#
# Liger's kernels run wherever Triton runs the tensors (CUDA; CPU only under TRITON_INTERPRET=1); elsewhere each
# patched piece falls back to hf_yoco's PyTorch code, so a patched model still runs (slowly) on CPU.

LIGER_MODEL_TYPES = ("hf_yoco", "hf_yoco_block_transformer")


def _is_silu(activation: nn.Module) -> bool:
    """True for the activations of `hidden_act` "silu" / "swish" (Liger's SwiGLU is SiLU-only)."""
    return type(activation).__name__ in ("SiLU", "SiLUActivation")


def _liger() -> Any:
    """Liger's functional API (`liger_kernel.transformers.functional`), with a clear error when it is missing."""
    try:
        from liger_kernel.transformers import functional
    except ImportError as error:
        raise ImportError(
            "Liger kernels need the `liger-kernel` package: pip install 'hf-yoco[liger]' (a CUDA GPU is needed to run "
            "them)."
        ) from error
    return functional


def _liger_rms_norm_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """hf_yoco `RMSNorm` (Llama casting: normalise in fp32, cast back, then scale) through Liger's kernel."""
    if not is_triton_usable(hidden_states.device):
        return self._hf_yoco_torch_forward(hidden_states)
    return _liger().liger_rms_norm(hidden_states, self.weight, self.variance_epsilon, casting_mode="llama")


def _liger_swiglu_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """hf_yoco `GatedMLP`: `down_proj(silu(gate_proj(x)) * up_proj(x))` with Liger's fused SiLU-and-multiply."""
    if not (_is_silu(self.act_fn) and is_triton_usable(hidden_states.device)):
        return self._hf_yoco_torch_forward(hidden_states)
    return self.down_proj(_liger().liger_swiglu(self.gate_proj(hidden_states), self.up_proj(hidden_states)))


def _make_liger_rotary_pos_emb(torch_rotary_pos_emb: Callable) -> Callable:
    """Liger's fused RoPE with the signature of the model files' `apply_rotary_pos_emb` (query and key together).

    Interleaved (GPT-J) pairs, used with `official_numerics=True`, are not in Liger's kernel and keep PyTorch.
    """

    def liger_rotary_pos_emb(
        query: torch.Tensor,
        key: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        interleaved: bool = False,
        unsqueeze_dim: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if interleaved or unsqueeze_dim not in (1, 2) or not is_triton_usable(query.device):
            return torch_rotary_pos_emb(query, key, cos, sin, interleaved, unsqueeze_dim)
        if unsqueeze_dim == 2:  # [B, T, H, D] -> Liger's [B, H, T, D] views and back
            query, key = _liger().liger_rope(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
            return query.transpose(1, 2), key.transpose(1, 2)
        return _liger().liger_rope(query, key, cos, sin)

    liger_rotary_pos_emb._hf_yoco_torch_version = torch_rotary_pos_emb
    return liger_rotary_pos_emb


def _liger_fused_linear_cross_entropy(
    model: nn.Module, hidden_states: torch.Tensor, labels: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Shifted causal-LM loss straight from the last hidden states (`[B, T, D]`): Liger's fused linear cross-entropy
    runs the LM head chunk by chunk, so the `[B, T, vocab]` logits are never materialised. Honours
    `num_items_in_batch`, `ignore_index` and `shift_labels` like transformers' `ForCausalLMLoss`."""
    lm_head = model.lm_head
    plain_head = type(lm_head) is nn.Linear and lm_head.bias is None  # a LoRA-wrapped head needs its own forward
    if not (plain_head and is_triton_usable(hidden_states.device)):
        logits = lm_head(hidden_states)
        return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **kwargs)
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

    return LigerForCausalLMLoss(
        hidden_states=hidden_states.contiguous(),
        lm_head_weight=lm_head.weight,
        labels=labels,
        hidden_size=hidden_states.shape[-1],
        **kwargs,
    )


def _liger_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` (shift, flatten, sum / `num_items_in_batch` or mean) with Liger's
    cross-entropy kernel in place of `torch.nn.functional.cross_entropy`."""
    if shift_labels is None:  # token t predicts label t + 1
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    logits = logits.float().reshape(-1, vocab_size)  # [B * T, V]
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    if is_triton_usable(logits.device):
        loss = _liger().liger_cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    else:
        loss = nn.functional.cross_entropy(logits, shift_labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _patch_forward(target: nn.Module | type, liger_forward: Callable) -> bool:
    """Route `target.forward` (a module instance, or a class) through `liger_forward`, keeping the PyTorch forward as
    `_hf_yoco_torch_forward` for the fallback. Idempotent; returns True when it patched."""
    if getattr(target, "_hf_yoco_torch_forward", None) is not None:
        return False
    target._hf_yoco_torch_forward = target.forward
    target.forward = liger_forward if isinstance(target, type) else MethodType(liger_forward, target)
    return True


def _patch_rotary(modeling_module: Any) -> None:
    """Swap the model file's module-global `apply_rotary_pos_emb` (as Liger does for transformers' models)."""
    current = modeling_module.apply_rotary_pos_emb
    if not hasattr(current, "_hf_yoco_torch_version"):
        modeling_module.apply_rotary_pos_emb = _make_liger_rotary_pos_emb(current)


def apply_liger_kernel_to_hf_yoco(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model: nn.Module | None = None,
) -> None:
    """Use Liger-Kernel's fused ops in hf_yoco models (YOCO and Block Transformer), Liger's `apply_liger_kernel_to_*`
    contract: with `model`, that loaded instance is patched; without, hf_yoco's model classes are, for models built
    afterwards.

    Args:
        rope: fused RoPE for the layers that rotate query and key together (self-decoder / Block Transformer
            attention; not `official_numerics`' interleaved pairs). Patches the model file's `apply_rotary_pos_emb`,
            so it holds for every model of that file in the process, as for transformers' models.
        cross_entropy: Liger's cross-entropy kernel for the loss (logits still materialised).
        fused_linear_cross_entropy: compute the training loss from the hidden states without materialising the
            logits; then `outputs.logits` is None when training with labels (pass `skip_logits=False` to get them).
        rms_norm: fused RMSNorm (every hf_yoco `RMSNorm`, incl. the weight-less per-head norm of gated retention).
        swiglu: fused SiLU-and-multiply in the `GatedMLP`s (needs `hidden_act` "silu"/"swish"; other activations
            keep PyTorch, with a warning).
        model: the model instance (`*ForCausalLM` or base model) to patch.

    Raises:
        ValueError: both `cross_entropy` and `fused_linear_cross_entropy`, or a model that is not an hf_yoco model.
        ImportError: `liger-kernel` is not installed.
    """
    if cross_entropy and fused_linear_cross_entropy:
        raise ValueError("`cross_entropy` and `fused_linear_cross_entropy` cannot both be True; pick one.")
    _liger()  # fail early with the install hint
    if model is None:
        from .models import modeling_block_transformer, modeling_common, modeling_yoco

        modeling_modules = [modeling_yoco, modeling_block_transformer]
        norms, mlps = [modeling_common.RMSNorm], [modeling_common.GatedMLP]
        heads = [modeling_yoco.YocoForCausalLM, modeling_block_transformer.BlockTransformerForCausalLM]
    else:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in LIGER_MODEL_TYPES:
            raise ValueError(
                f"`model` must be an hf_yoco model (model_type in {LIGER_MODEL_TYPES}), got "
                f"{getattr(config, 'model_type', type(model).__name__)!r}."
            )
        # By class name, so models loaded as Hub remote code (other module objects) are patched too.
        modeling_modules = [sys.modules[type(model).__module__]]
        norms = [m for m in model.modules() if type(m).__name__ == "RMSNorm"]
        mlps = [m for m in model.modules() if type(m).__name__ == "GatedMLP"]
        heads = [model] if hasattr(model, "lm_head") else []
        if not any(is_triton_usable(p.device) for p in model.parameters()):
            logger.warning(
                "Liger kernels run on CUDA tensors (CPU only under TRITON_INTERPRET=1); this model's parameters are "
                "on %s, where the patched layers keep hf_yoco's PyTorch code until the model is moved.",
                next(model.parameters()).device,
            )
        if swiglu and not all(_is_silu(mlp.act_fn) for mlp in mlps):
            logger.warning("Liger's SwiGLU needs hidden_act 'silu'/'swish': MLPs with other activations keep PyTorch.")
            mlps = [mlp for mlp in mlps if _is_silu(mlp.act_fn)]
    if rope:
        for modeling_module in modeling_modules:
            _patch_rotary(modeling_module)
    if rms_norm:
        for norm in norms:
            _patch_forward(norm, _liger_rms_norm_forward)
    if swiglu:
        for mlp in mlps:
            _patch_forward(mlp, _liger_swiglu_forward)
    for head in heads:  # read by `modeling_common.causal_lm_head_and_loss` / `PreTrainedModel.loss_function`
        as_attribute = staticmethod if isinstance(head, type) else (lambda fn: fn)
        if fused_linear_cross_entropy:
            head._fused_linear_cross_entropy = as_attribute(_liger_fused_linear_cross_entropy)
        if cross_entropy:
            head._loss_function = as_attribute(_liger_causal_lm_loss)


_LIGER_REGISTRY_MODULE = "liger_kernel.transformers.monkey_patch"  # defines MODEL_TYPE_TO_APPLY_LIGER_FN


def _add_to_liger_registry(registry: dict[str, Callable]) -> None:
    for model_type in LIGER_MODEL_TYPES:
        registry.setdefault(model_type, apply_liger_kernel_to_hf_yoco)


class _RegisterWhenLigerImports(importlib.abc.MetaPathFinder):
    """One-shot import hook: adds hf_yoco to Liger's `MODEL_TYPE_TO_APPLY_LIGER_FN` right after Liger's import of its
    registry module has run. Every reader of that dict (Trainer's `use_liger_kernel`, `AutoLigerKernelForCausalLM`,
    `_apply_liger_kernel_to_instance`) lives in, or imports from, that module, so it is always registered in time."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _LIGER_REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # the other finders locate the module itself
        spec = importlib.util.find_spec(fullname)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_module_and_register(module: Any) -> None:
                exec_module(module)
                _add_to_liger_registry(module.MODEL_TYPE_TO_APPLY_LIGER_FN)

            spec.loader.exec_module = exec_module_and_register
        return spec


def register_liger() -> bool:
    """Register hf_yoco's model types with Liger (`use_liger_kernel=True`, `AutoLigerKernelForCausalLM`).

    Liger is not imported for this (it takes about half a second and imports its Triton ops): when its registry
    module is already loaded the types are added now, otherwise an import hook adds them as soon as Liger loads it.
    Returns False when liger-kernel is not installed; hf_yoco itself never needs it.
    """
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    registry = getattr(sys.modules.get(_LIGER_REGISTRY_MODULE), "MODEL_TYPE_TO_APPLY_LIGER_FN", None)
    if registry is not None:
        _add_to_liger_registry(registry)
    elif not any(isinstance(finder, _RegisterWhenLigerImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenLigerImports())
    return True
