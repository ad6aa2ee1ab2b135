"""Checkpoint converters (safetensors in, `save_pretrained` folders out).

- `convert_official_yoco`: the official microsoft/unilm YOCO state dict (flat fairseq-style keys, `params.json`)
  -> `YocoForCausalLM` with `official_numerics=True` (embeddings x sqrt(d), interleaved RoPE with the YOCO
  frequencies), so no weight permutation is needed.
- `yocofy_llama`: a pretrained Llama-architecture model -> a YOCO initialisation: embeddings and the first half of
  the layers become the self-decoder, the middle layer's input norm and k/v projections become the global K/V
  builder, the upper layers' q/o projections, norms and MLPs become the cross-decoder.

CLI: `hf-yoco convert {yoco-official, llama-to-yoco} INPUT OUTPUT [...]`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from .models.configuration_yoco import YocoConfig
from .models.modeling_yoco import YocoForCausalLM

# Official YOCO key -> hf_yoco key. `{i}`: self-decoder layer, `{j}`: cross-decoder layer (placed at L/2 + j).
OFFICIAL_YOCO_TOP_KEYS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "output_projection.weight": "lm_head.weight",
    "layer_norm.weight": "model.norm.weight",
    "cross_decoder.kv_layer_norm.weight": "model.global_kv.norm.weight",
    "cross_decoder.k_proj.weight": "model.global_kv.k_proj.weight",
    "cross_decoder.v_proj.weight": "model.global_kv.v_proj.weight",
}
OFFICIAL_YOCO_BLOCK_KEYS = {
    "mixer_layer_norm.weight": "input_layernorm.weight",
    "final_layer_norm.weight": "post_attention_layernorm.weight",
    "ffn.fc1.weight": "mlp.gate_proj.weight",  # fc1 is the SiLU branch
    "ffn.gate.weight": "mlp.up_proj.weight",  # `gate` is the linear branch
    "ffn.fc2.weight": "mlp.down_proj.weight",
}
OFFICIAL_YOCO_SELF_MIXER_KEYS = {
    "mixer.q_proj.weight": "self_attn.q_proj.weight",
    "mixer.k_proj.weight": "self_attn.k_proj.weight",
    "mixer.v_proj.weight": "self_attn.v_proj.weight",
    "mixer.out_proj.weight": "self_attn.o_proj.weight",
}
OFFICIAL_YOCO_RETENTION_KEYS = {
    "mixer.g_proj.weight": "self_attn.g_proj.weight",
    "mixer.gt_proj.weight": "self_attn.gt_proj.weight",
}
OFFICIAL_YOCO_CROSS_MIXER_KEYS = {
    "mixer.q_proj.weight": "cross_attn.q_proj.weight",
    "mixer.out_proj.weight": "cross_attn.o_proj.weight",
}


def official_yoco_key_map(config: YocoConfig) -> dict[str, str]:
    """Every official key expected for `config`, mapped to its hf_yoco name."""
    half = config.num_hidden_layers // 2
    self_keys = {**OFFICIAL_YOCO_BLOCK_KEYS, **OFFICIAL_YOCO_SELF_MIXER_KEYS}
    if config.self_decoder_type == "gated_retention":
        self_keys.update(OFFICIAL_YOCO_RETENTION_KEYS)
    cross_keys = {**OFFICIAL_YOCO_BLOCK_KEYS, **OFFICIAL_YOCO_CROSS_MIXER_KEYS}
    key_map = dict(OFFICIAL_YOCO_TOP_KEYS)
    for i in range(half):
        key_map.update({f"self_decoder.layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in self_keys.items()})
    for j in range(config.num_hidden_layers - half):
        key_map.update(
            {f"cross_decoder.layers.{j}.{k}": f"model.layers.{half + j}.{v}" for k, v in cross_keys.items()}
        )
    return key_map


def official_yoco_config(params: dict, **overrides) -> YocoConfig:
    """`YocoConfig` for an official `params.json` (`YOCOArgs` fields), with the official numerics switched on."""
    required = ("dim", "n_layers", "hidden_dim", "n_self_heads", "n_attn_heads", "n_attn_kv_heads", "vocab_size")
    missing = [name for name in required if name not in params]
    if missing:
        raise ValueError(f"params.json is missing the YOCOArgs fields {missing} (required: {list(required)}).")
    dim = params["dim"]
    sliding_window = params.get("sliding_window") or None
    kwargs = dict(
        vocab_size=params["vocab_size"],
        hidden_size=dim,
        intermediate_size=params["hidden_dim"],
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_attn_heads"],
        num_key_value_heads=params["n_attn_kv_heads"],
        head_dim=dim // params["n_attn_heads"],
        rms_norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        max_position_embeddings=params.get("max_seq_len", 4096),
        official_numerics=True,
        tie_word_embeddings=False,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    if sliding_window:
        # The official SWA self-decoder is multi-head attention with n_self_heads heads of size dim / n_self_heads;
        # hf_yoco's SWA layers share the cross-decoder's head layout.
        if not params["n_self_heads"] == params["n_attn_heads"] == params["n_attn_kv_heads"]:
            raise ValueError(
                "Official YOCO-SWA checkpoints convert only when n_self_heads == n_attn_heads == n_attn_kv_heads "
                f"(got {params['n_self_heads']}, {params['n_attn_heads']}, {params['n_attn_kv_heads']}): hf_yoco's "
                "sliding-window layers use the cross-decoder's (GQA) head layout."
            )
        kwargs.update(self_decoder_type="sliding_window", sliding_window=int(sliding_window))
    else:
        kwargs.update(self_decoder_type="gated_retention", num_retention_heads=params["n_self_heads"])
    kwargs.update(overrides)
    return YocoConfig(**kwargs)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"No *.safetensors file in {path}. Only safetensors checkpoints are read.")
        state_dict = {}
        for file in files:
            state_dict.update(load_file(file))
        return state_dict
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path} is not a .safetensors file. Only safetensors checkpoints are read (pickled .pth/.bin files can "
            "run arbitrary code): convert it first, e.g. `safetensors.torch.save_file(torch.load(p, "
            "weights_only=True), 'model.safetensors')`."
        )
    return load_file(path)


def _rename_checked(
    state_dict: dict[str, torch.Tensor], key_map: dict[str, str], model: PreTrainedModel, ignore: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Rename `state_dict` through `key_map`, failing with every missing / unexpected key and shape mismatch."""
    missing = sorted(k for k in key_map if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in key_map and not k.startswith(ignore))
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint keys do not match the expected layout.\n  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {unexpected}"
        )
    target_shapes = {k: v.shape for k, v in model.state_dict().items()}
    renamed, wrong_shapes = {}, []
    for source, target in key_map.items():
        tensor = state_dict[source]
        if tuple(tensor.shape) != tuple(target_shapes[target]):
            wrong_shapes.append(f"{source}: {tuple(tensor.shape)}, expected {tuple(target_shapes[target])}")
        renamed[target] = tensor
    if wrong_shapes:
        raise ValueError("Checkpoint tensors have the wrong shapes:\n  " + "\n  ".join(wrong_shapes))
    return renamed


def convert_official_yoco(
    checkpoint: str | Path, params: dict | str | Path | None = None, dtype: torch.dtype = torch.float32
) -> YocoForCausalLM:
    """Load an official YOCO checkpoint (safetensors) into `YocoForCausalLM`.

    Args:
        checkpoint: a `.safetensors` file, or a folder holding `*.safetensors` and `params.json`.
        params: the `YOCOArgs` dict or a path to `params.json` (default: `params.json` beside the checkpoint).
        dtype: dtype of the returned model.
    """
    checkpoint = Path(checkpoint)
    if params is None:
        params = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "params.json"
    if not isinstance(params, dict):
        params = json.loads(Path(params).read_text())
    config = official_yoco_config(params)
    with torch.device("meta"):  # shapes only
        reference = YocoForCausalLM(config)
    state_dict = _rename_checked(_load_safetensors(checkpoint), official_yoco_key_map(config), reference)
    model = YocoForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
    return model.eval()


def yocofy_llama(
    llama: PreTrainedModel,
    self_decoder_type: str = "sliding_window",
    sliding_window: int | None = 1024,
    **config_overrides,
) -> YocoForCausalLM:
    """Initialise a YOCO model from a Llama-architecture causal LM (YOCO-fication).

    Layers `0 .. L/2-1` keep their weights as self-decoder layers (sliding-window attention, or gated retention with
    fresh `g_proj`/`gt_proj` and GQA keys/values repeated per head); layer `L/2`'s input norm and k/v projections
    build the global K/V; layers `L/2 ..` keep q/o projections, norms and MLPs as cross-decoder layers. Embeddings,
    final norm and LM head are copied. Fine-tune afterwards: cross layers above `L/2` now read layer `L/2`'s K/V.
    """
    source = llama.config
    if source.num_hidden_layers % 2:
        raise ValueError(f"`num_hidden_layers` must be even to YOCO-fy, got {source.num_hidden_layers}.")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(source, flag, False):
            raise ValueError(f"Llama checkpoints with `{flag}=True` are not supported (YOCO layers have no biases).")
    kwargs = dict(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act,
        max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps,
        rope_parameters=dict(source.rope_parameters),
        tie_word_embeddings=source.tie_word_embeddings,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
        self_decoder_type=self_decoder_type,
        sliding_window=sliding_window if self_decoder_type == "sliding_window" else None,
    )
    kwargs.update(config_overrides)
    config = YocoConfig(**kwargs)
    if self_decoder_type == "gated_retention" and config.retention_head_dim != config.head_dim:
        raise ValueError(
            f"Gated retention needs `hidden_size / num_retention_heads` ({config.retention_head_dim}) == the Llama "
            f"head size ({config.head_dim}) to reuse its q/k/v projections."
        )
    model = YocoForCausalLM(config)
    weights = llama.state_dict()
    half = config.num_hidden_layers // 2
    groups = config.num_attention_heads // config.num_key_value_heads
    new = {
        "model.embed_tokens.weight": weights["model.embed_tokens.weight"],
        "model.norm.weight": weights["model.norm.weight"],
        "model.global_kv.norm.weight": weights[f"model.layers.{half}.input_layernorm.weight"],
        "model.global_kv.k_proj.weight": weights[f"model.layers.{half}.self_attn.k_proj.weight"],
        "model.global_kv.v_proj.weight": weights[f"model.layers.{half}.self_attn.v_proj.weight"],
    }
    if not config.tie_word_embeddings:
        new["lm_head.weight"] = weights["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            new[f"{prefix}{name}.weight"] = weights[f"{prefix}{name}.weight"]
        mixer = "cross_attn" if i >= half else "self_attn"
        projections = ("q_proj", "o_proj") if i >= half else ("q_proj", "k_proj", "v_proj", "o_proj")
        for name in projections:
            weight = weights[f"{prefix}self_attn.{name}.weight"]
            if mixer == "self_attn" and self_decoder_type == "gated_retention" and name in ("k_proj", "v_proj"):
                # GQA -> one key/value head per retention head: [H_kv * D, d] -> [H * D, d]
                weight = weight.view(config.num_key_value_heads, config.head_dim, -1).repeat_interleave(groups, 0)
                weight = weight.reshape(-1, weight.shape[-1])
            new[f"{prefix}{mixer}.{name}.weight"] = weight
    missing, unexpected = model.load_state_dict(new, strict=False)
    expected_fresh = {n for n in missing if n.endswith(("g_proj.weight", "gt_proj.weight")) or n == "lm_head.weight"}
    if set(missing) - expected_fresh or unexpected:
        raise ValueError(
            f"YOCO-fication left weights unset: missing {sorted(set(missing) - expected_fresh)}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(llama.dtype).eval()


# ------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["yoco-official", "llama-to-yoco"], help="what to convert")
    parser.add_argument("input", help="official: .safetensors file or folder (+ params.json); llama: a model folder")
    parser.add_argument("output", help="folder for save_pretrained")
    parser.add_argument("--params", help="official YOCO params.json (default: beside the checkpoint)")
    parser.add_argument("--self-decoder", choices=["sliding_window", "gated_retention"], default="sliding_window")
    parser.add_argument("--sliding-window", type=int, default=1024)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    if args.kind == "yoco-official":
        model = convert_official_yoco(args.input, args.params, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        llama = AutoModelForCausalLM.from_pretrained(args.input, dtype=dtype, use_safetensors=True)
        model = yocofy_llama(llama, args.self_decoder, args.sliding_window)
        try:
            AutoTokenizer.from_pretrained(args.input).save_pretrained(args.output)
        except (OSError, ValueError):
            print(f"no tokenizer found in {args.input}; saving the model only")
    model.save_pretrained(args.output)
    print(f"saved {type(model).__name__} ({model.num_parameters():,} parameters) to {args.output}")
    return 0
