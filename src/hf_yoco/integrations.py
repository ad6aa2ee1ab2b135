"""Optional integrations with other libraries, activated by `import hf_yoco` when those libraries are installed.

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
