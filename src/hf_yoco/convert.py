"""Checkpoint converters (safetensors in, `save_pretrained` folders out).

- `convert_official_yoco`: the official microsoft/unilm YOCO state dict (flat fairseq-style keys, `params.json`)
  -> `YocoForCausalLM` with `official_numerics=True` (embeddings x sqrt(d), interleaved RoPE with the YOCO
  frequencies), so no weight permutation is needed.
- `convert_official_block_transformer`: the official Block Transformer (itsnamgyu/block-transformer)
  `model.safetensors` saved by its Trainer (GPT-NeoX/Pythia decoders) -> `BlockTransformerForCausalLM` with
  `layer_style="gpt_neox"`; fused `query_key_value` split per head, the Conv1d expansion squeezed to a Linear, the
  unused block-decoder `embed_in` dropped.
- `yocofy_llama`: a pretrained Llama-architecture model -> a YOCO initialisation: embeddings and the first half of
  the layers become the self-decoder, the middle layer's input norm and k/v projections become the global K/V
  builder, the upper layers' q/o projections, norms and MLPs become the cross-decoder.

CLI: `hf-yoco convert {yoco-official, block-transformer-official, llama-to-yoco} INPUT OUTPUT [...]`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from .checkpoints import TOKENIZER_FILES, atomic_directory, check_model_folder, safetensors_problem
from .cli import positive_int
from .models.configuration_block_transformer import BlockTransformerConfig
from .models.configuration_yoco import YocoConfig
from .models.modeling_block_transformer import BlockTransformerForCausalLM
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
    half = config.num_self_decoder_layers
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
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"No *.safetensors file in {path}. Only safetensors checkpoints are read.")
        state_dict = {}
        for file in files:
            state_dict.update(_load_checked(file))
        return state_dict
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{path} is not a .safetensors file. Only safetensors checkpoints are read (pickled .pth/.bin files can "
            "run arbitrary code): convert it first, e.g. `safetensors.torch.save_file(torch.load(p, "
            "weights_only=True), 'model.safetensors')`."
        )
    return _load_checked(path)


def _load_checked(file: Path) -> dict[str, torch.Tensor]:
    """`load_file`, with a truncated or corrupted file reported by name."""
    if problem := safetensors_problem(file):
        raise ValueError(problem)
    return load_file(file)


def _read_json_file(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error})") from None


def _check_key_names(state_dict: Mapping[str, torch.Tensor], expected: Mapping, ignore: tuple[str, ...] = ()) -> None:
    """Fail with every missing and unexpected key (keys starting with an `ignore` prefix are optional)."""
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected and not k.startswith(ignore))
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint keys do not match the expected layout.\n  missing ({len(missing)}): {missing}\n"
            f"  unexpected ({len(unexpected)}): {unexpected}"
        )


def _rename_checked(
    state_dict: dict[str, torch.Tensor], key_map: dict[str, str], model: PreTrainedModel, ignore: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Rename `state_dict` through `key_map`, failing with every missing / unexpected key and shape mismatch."""
    _check_key_names(state_dict, key_map, ignore)
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
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist: pass a .safetensors file or its folder")
    if params is None:
        params = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "params.json"
        if not params.is_file():
            raise FileNotFoundError(
                f"no params.json beside {checkpoint}: put the official YOCOArgs there or pass --params"
            )
    if not isinstance(params, dict):
        params = _read_json_file(Path(params), "params")
    config = official_yoco_config(params)
    with torch.device("meta"):  # shapes only
        reference = YocoForCausalLM(config)
    state_dict = _rename_checked(_load_safetensors(checkpoint), official_yoco_key_map(config), reference)
    model = YocoForCausalLM.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype)
    return model.eval()


# -------------------------------------------------------------------------------------- official Block Transformer

# Official Block Transformer key -> hf_yoco key (block_transformer.md §3.3). The official model is a plain nn.Module
# holding `embedder` (lookup table), `block_decoder` and `token_decoder` (GPT-NeoX / Pythia decoders).
OFFICIAL_BLOCK_TRANSFORMER_TOP_KEYS = {
    "embedder.embeddings.weight": "model.embedder.embed_tokens.weight",
    "block_decoder.gpt_neox.final_layer_norm.weight": "model.block_decoder.norm.weight",
    "block_decoder.gpt_neox.final_layer_norm.bias": "model.block_decoder.norm.bias",
    "token_decoder.gpt_neox.embed_in.weight": "model.token_decoder.embed_tokens.weight",
    "token_decoder.gpt_neox.final_layer_norm.weight": "model.token_decoder.norm.weight",
    "token_decoder.gpt_neox.final_layer_norm.bias": "model.token_decoder.norm.bias",
    "token_decoder.embed_out.weight": "lm_head.weight",
    "token_decoder.expansion_layer.weight": "model.token_decoder.context_to_prefix.weight",  # [kD, D, 1] -> [kD, D]
    "token_decoder.expansion_layer.bias": "model.token_decoder.context_to_prefix.bias",
}
# Per GPT-NeoX layer (under `{block,token}_decoder.gpt_neox.layers.{i}.` -> `model.{block,token}_decoder.layers.{i}.`).
OFFICIAL_BLOCK_TRANSFORMER_LAYER_KEYS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "post_attention_layernorm.bias": "post_attention_layernorm.bias",
    # fused [H * 3 * hd, ...]: per head h, rows [3h hd, 3h hd + hd) = q, the next hd = k, the next hd = v
    "attention.query_key_value.weight": (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
    ),
    "attention.query_key_value.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attention.dense.weight": "self_attn.o_proj.weight",
    "attention.dense.bias": "self_attn.o_proj.bias",
    "mlp.dense_h_to_4h.weight": "mlp.up_proj.weight",
    "mlp.dense_h_to_4h.bias": "mlp.up_proj.bias",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    "mlp.dense_4h_to_h.bias": "mlp.down_proj.bias",
}
# Kernel-1 Conv1d weights: the official tensor is the hf_yoco Linear weight with a trailing dimension of 1.
OFFICIAL_BLOCK_TRANSFORMER_CONV_KEYS = ("token_decoder.expansion_layer.weight",)
# In every official checkpoint but never used (the block decoder always gets `inputs_embeds`): dropped if present.
OFFICIAL_BLOCK_TRANSFORMER_UNUSED_KEYS = ("block_decoder.gpt_neox.embed_in.weight",)

# The official decoders are `EleutherAI/pythia-410m-deduped`'s GPTNeoXConfig with the yaml's `config:` overrides;
# these are the fields of that base config the conversion depends on (block_transformer.md §3.1).
PYTHIA_DECODER_DEFAULTS = {
    "vocab_size": 50304,
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "max_position_embeddings": 2048,
    "use_parallel_residual": True,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
    "attention_bias": True,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}
_PYTHIA_DECODER_KNOWN_FIELDS = {"num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"}
# Overrides that do not change inference or the weights' layout.
_PYTHIA_DECODER_IGNORED_FIELDS = {
    "attention_dropout",
    "hidden_dropout",
    "classifier_dropout",
    "use_cache",
    "torch_dtype",
}


def official_block_transformer_key_map(config: BlockTransformerConfig) -> dict[str, str | tuple[str, str, str]]:
    """Every official key expected for `config`, mapped to its hf_yoco name (a 3-tuple: fused q/k/v, split per head).

    The unused `block_decoder.gpt_neox.embed_in.weight` is not in the map (it is dropped); `model.start_context` is
    not a target (official checkpoints have none, see `convert_official_block_transformer`).
    """
    key_map: dict[str, str | tuple[str, str, str]] = dict(OFFICIAL_BLOCK_TRANSFORMER_TOP_KEYS)
    for decoder, num_layers in (
        ("block_decoder", config.num_block_decoder_layers),
        ("token_decoder", config.num_token_decoder_layers),
    ):
        for i in range(num_layers):
            source, target = f"{decoder}.gpt_neox.layers.{i}.", f"model.{decoder}.layers.{i}."
            for key, value in OFFICIAL_BLOCK_TRANSFORMER_LAYER_KEYS.items():
                mapped = tuple(target + v for v in value) if isinstance(value, tuple) else target + value
                key_map[source + key] = mapped
    return key_map


def _official_head_count(hidden_size: int) -> int:
    """The official `util/config.py` default: `hidden_size // head_dim`, head_dim 32 / 64 / 128 for D <= 256 / 1536 /
    larger."""
    head_dim = 32 if hidden_size <= 256 else 64 if hidden_size <= 1536 else 128
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by the official default head size {head_dim}.")
    return hidden_size // head_dim


def _read_trainer_config(trainer_config: Mapping | str | Path) -> dict:
    if isinstance(trainer_config, Mapping):
        return dict(trainer_config)
    path = Path(trainer_config)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist: pass the official conf/trainer/<name>.yaml")
    if path.suffix == ".json":
        return _read_json_file(path, "--config")
    import yaml  # a transformers dependency

    return yaml.safe_load(path.read_text())


def _official_decoder_config(cfg: dict, name: str) -> dict:
    """Effective GPTNeoXConfig fields of the `block_decoder` / `token_decoder` section of a trainer yaml."""
    section = cfg.get(name) or {}
    if section.get("cls") != "gpt-neo-x":
        raise ValueError(f"Only GPT-NeoX decoders convert: `{name}.cls` is {section.get('cls')!r}, not 'gpt-neo-x'.")
    base = section.get("model_name_or_path") or ""
    if not str(base).startswith("EleutherAI/pythia-"):
        raise ValueError(
            f"`{name}.model_name_or_path` is {base!r}: only Pythia base configs (EleutherAI/pythia-*) are known "
            "offline; pass a BlockTransformerConfig instead."
        )
    fields = {**PYTHIA_DECODER_DEFAULTS, **(section.get("config") or {})}
    for required in ("num_hidden_layers", "hidden_size"):
        if required not in fields:
            raise ValueError(f"`{name}.config.{required}` is missing from the trainer config.")
    if fields.get("num_attention_heads") is None:
        fields["num_attention_heads"] = _official_head_count(fields["hidden_size"])
    if fields.get("intermediate_size") is None:
        fields["intermediate_size"] = 4 * fields["hidden_size"]
    known = set(PYTHIA_DECODER_DEFAULTS) | _PYTHIA_DECODER_KNOWN_FIELDS | _PYTHIA_DECODER_IGNORED_FIELDS
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"`{name}.config` overrides fields this converter does not map: {unknown}.")
    return fields


def _pythia_layer_kwargs(fields: Mapping) -> dict:
    """`BlockTransformerConfig` kwargs of the GPT-NeoX layer fields (`PYTHIA_DECODER_DEFAULTS` names)."""
    return dict(
        hidden_act=fields["hidden_act"],
        use_parallel_residual=fields["use_parallel_residual"],
        partial_rotary_factor=float(fields["rotary_pct"]),
        attention_bias=fields["attention_bias"],
        norm_eps=float(fields["layer_norm_eps"]),
        rope_theta=float(fields["rotary_emb_base"]),
        initializer_range=float(fields["initializer_range"]),
    )


def _trainer_config_kwargs(cfg: dict) -> dict:
    """`BlockTransformerConfig` kwargs from an official trainer yaml (`conf/trainer/<name>.yaml`)."""
    split = cfg.get("block_split")
    if split is not None:
        if split.get("distribution") != "fixed":
            raise ValueError(f"Only fixed-length blocks convert, got `block_split: {split}`.")
        block_length = split["distribution_kwargs"]["length"]
    elif cfg.get("block_length") is not None:
        block_length = cfg["block_length"]
    else:
        raise ValueError("The trainer config has neither `block_split` nor `block_length`: not a Block Transformer.")
    embedder = cfg.get("embedder") or {}
    if embedder.get("cls") != "lookup" or embedder.get("projection_method", "concat") != "concat":
        raise ValueError(
            "Only the lookup + concat embedder converts (`embedder.cls: lookup`, `projection_method: concat`), got "
            f"cls={embedder.get('cls')!r}, projection_method={embedder.get('projection_method')!r}."
        )
    if embedder.get("n_embedding_tokens", 1) != 1:
        raise ValueError(f"Only `embedder.n_embedding_tokens: 1` converts, got {embedder['n_embedding_tokens']}.")
    token = cfg.get("token_decoder") or {}
    if token.get("decoding_strategy") != "prefix" or token.get("expansion_method") != "expansion_layer":
        raise ValueError(
            "Only the prefix token decoder converts (`decoding_strategy: prefix`, `expansion_method: "
            f"expansion_layer`), got {token.get('decoding_strategy')!r} / {token.get('expansion_method')!r}."
        )
    block_fields = _official_decoder_config(cfg, "block_decoder")
    token_fields = _official_decoder_config(cfg, "token_decoder")
    # The block decoder's vocab_size only sizes its unused embed_in; layer counts may differ.
    shared = sorted(set(block_fields) - {"num_hidden_layers", "vocab_size", "tie_word_embeddings"})
    different = [f for f in shared if block_fields[f] != token_fields[f]]
    if different:
        raise ValueError(
            f"hf_yoco's Block Transformer shares one width/backbone between its decoders; the official config "
            f"differs in {different}: " + ", ".join(f"{f}={block_fields[f]!r}/{token_fields[f]!r}" for f in different)
        )
    hidden = token_fields["hidden_size"]
    embedder_fields = embedder.get("config") or {}
    if embedder_fields.get("hidden_size", hidden // block_length) * block_length != hidden:
        raise ValueError(
            f"`embedder.config.hidden_size` ({embedder_fields['hidden_size']}) x block_length ({block_length}) must "
            f"equal the decoders' hidden_size ({hidden})."
        )
    vocab = token_fields["vocab_size"]
    if embedder_fields.get("vocab_size", vocab) != vocab:
        raise ValueError(f"Embedder vocab_size {embedder_fields['vocab_size']} != token decoder vocab_size {vocab}.")
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=token_fields["intermediate_size"],
        block_length=block_length,
        num_prefix_tokens=token.get("expansion_ratio", 1),
        num_block_decoder_layers=block_fields["num_hidden_layers"],
        num_token_decoder_layers=token_fields["num_hidden_layers"],
        num_attention_heads=token_fields["num_attention_heads"],
        **_pythia_layer_kwargs(token_fields),
        max_position_embeddings=int(cfg.get("max_length") or token_fields["max_position_embeddings"]),
    )


def _state_dict_config_kwargs(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """`BlockTransformerConfig` kwargs read off the tensor shapes, with Pythia defaults for what shapes cannot tell."""
    if "embedder.projection_layer.weight" in state_dict:
        raise ValueError(
            "This checkpoint has `embedder.projection_layer` (an uptrained model with a Conv1d projection embedder); "
            "only the lookup + concat embedder of the main models converts."
        )
    needed = (
        "embedder.embeddings.weight",
        "token_decoder.gpt_neox.embed_in.weight",
        "token_decoder.expansion_layer.weight",
        "token_decoder.gpt_neox.layers.0.mlp.dense_h_to_4h.weight",
    )
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(
            f"Cannot infer the architecture: missing {missing}. Is this an official Block Transformer "
            "`model.safetensors`? (Or pass the trainer yaml as `config`.)"
        )
    vocab, slice_width = state_dict["embedder.embeddings.weight"].shape
    token_vocab, hidden = state_dict["token_decoder.gpt_neox.embed_in.weight"].shape
    if vocab != token_vocab or hidden % slice_width:
        raise ValueError(
            f"Embedder table {tuple(state_dict['embedder.embeddings.weight'].shape)} does not fit the token "
            f"decoder's {(token_vocab, hidden)}: expected [V, D / block_length] with the same V."
        )

    def count_layers(decoder: str) -> int:
        pattern = re.compile(rf"{decoder}\.gpt_neox\.layers\.(\d+)\.")
        indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
        return max(indices) + 1 if indices else 0

    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=state_dict["token_decoder.gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].shape[0],
        block_length=hidden // slice_width,
        num_prefix_tokens=max(1, state_dict["token_decoder.expansion_layer.weight"].shape[0] // hidden),
        num_block_decoder_layers=max(1, count_layers("block_decoder")),
        num_token_decoder_layers=count_layers("token_decoder"),
        num_attention_heads=_official_head_count(hidden),
        **_pythia_layer_kwargs(PYTHIA_DECODER_DEFAULTS),
        max_position_embeddings=PYTHIA_DECODER_DEFAULTS["max_position_embeddings"],
    )


def official_block_transformer_config(
    trainer_config: Mapping | str | Path | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    **overrides,
) -> BlockTransformerConfig:
    """`BlockTransformerConfig` of an official Block Transformer checkpoint (`layer_style="gpt_neox"`).

    The official code has no config.json: the architecture is its Hydra trainer yaml `conf/trainer/<name>.yaml`
    (e.g. `block_main_b4_85.yaml`) on top of the `EleutherAI/pythia-410m-deduped` GPTNeoXConfig. From
    `trainer_config` (the yaml / json path or its parsed dict) this reads:

    - `block_split.distribution_kwargs.length` (fixed distribution) or `block_length` -> `block_length`;
    - `embedder.cls` (must be `lookup`), `embedder.projection_method` (`concat`), `embedder.n_embedding_tokens` (1),
      `embedder.config.{vocab_size, hidden_size}` (checked against the decoders: `hidden_size * block_length = D`);
    - `{block,token}_decoder.cls` (`gpt-neo-x`), `.model_name_or_path` (a Pythia config), `.config.{num_hidden_layers,
      hidden_size, num_attention_heads, intermediate_size}` plus any override of the Pythia fields in
      `PYTHIA_DECODER_DEFAULTS` (`rotary_pct`, `rotary_emb_base`, `layer_norm_eps`, ...). Missing heads / FFN width
      follow the official `util/config.py` autofill (head size 32 / 64 / 128 for D <= 256 / 1536 / larger; FFN 4D);
    - `token_decoder.{decoding_strategy (prefix), expansion_method (expansion_layer), expansion_ratio}` ->
      `num_prefix_tokens`; `max_length` -> `max_position_embeddings`.

    Without `trainer_config`, the architecture is read off `state_dict`'s shapes (vocabulary, width, block length
    = D / embedder width, prefix length, FFN width, layer counts) with the Pythia defaults and the official head
    autofill for the rest: right for every released `block_main_*` checkpoint.

    Special tokens are Pythia's: `<|endoftext|>` = 0 is BOS, EOS and (as in the official data pipeline) padding.
    `overrides` are passed to `BlockTransformerConfig` last.
    """
    if trainer_config is not None:
        kwargs = _trainer_config_kwargs(_read_trainer_config(trainer_config))
    elif state_dict is not None:
        kwargs = _state_dict_config_kwargs(state_dict)
    else:
        raise ValueError("Pass the official trainer config (yaml path or dict) or the checkpoint's state dict.")
    rope_theta = kwargs.pop("rope_theta")
    kwargs.update(
        layer_style="gpt_neox",
        mlp_bias=True,
        num_key_value_heads=kwargs["num_attention_heads"],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return BlockTransformerConfig(**kwargs)


def _official_block_transformer_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: BlockTransformerConfig, model: PreTrainedModel
) -> dict[str, torch.Tensor]:
    """Official tensors -> hf_yoco names and layouts, failing with every missing / unexpected key and wrong shape."""
    key_map = official_block_transformer_key_map(config)
    _check_key_names(state_dict, key_map, ignore=OFFICIAL_BLOCK_TRANSFORMER_UNUSED_KEYS)
    target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    heads, head_dim = config.num_attention_heads, config.head_dim
    renamed, wrong_shapes = {}, []
    for source, target in key_map.items():
        tensor = state_dict[source]
        if isinstance(target, tuple):  # fused q/k/v: [H * 3 * hd, ...]
            first = target_shapes[target[0]]
            expected = (3 * first[0], *first[1:])
        elif source in OFFICIAL_BLOCK_TRANSFORMER_CONV_KEYS:
            expected = (*target_shapes[target], 1)
        else:
            expected = target_shapes[target]
        if tuple(tensor.shape) != expected:
            wrong_shapes.append(f"{source}: {tuple(tensor.shape)}, expected {expected}")
            continue
        if isinstance(target, tuple):
            rest = tensor.shape[1:]
            per_head = tensor.view(heads, 3, head_dim, *rest)  # [H, q/k/v, hd, ...]
            for part, name in enumerate(target):
                renamed[name] = per_head[:, part].reshape(heads * head_dim, *rest)  # [H * hd, ...]
        elif source in OFFICIAL_BLOCK_TRANSFORMER_CONV_KEYS:
            renamed[target] = tensor.squeeze(-1)
        else:
            renamed[target] = tensor
    if wrong_shapes:
        raise ValueError("Checkpoint tensors have the wrong shapes:\n  " + "\n  ".join(wrong_shapes))
    return renamed


def convert_official_block_transformer(
    checkpoint: str | Path,
    config: BlockTransformerConfig | Mapping | str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> BlockTransformerForCausalLM:
    """Load an official Block Transformer checkpoint (the Trainer's `model.safetensors`) into
    `BlockTransformerForCausalLM`.

    Mapping (block_transformer.md §3.3; `official_block_transformer_key_map`): `embedder.embeddings` -> the lookup
    embedder; each GPT-NeoX decoder's layers, final LayerNorm and (token decoder) `embed_in` 1:1 onto the
    `layer_style="gpt_neox"` layers, with the per-head interleaved `attention.query_key_value` split into
    `q_proj`/`k_proj`/`v_proj`; `token_decoder.embed_out` -> `lm_head` (untied); the kernel-1 Conv1d
    `token_decoder.expansion_layer` [kD, D, 1] -> the Linear `context_to_prefix` [kD, D] (prefix j = output channels
    `[jD, (j+1)D)` in both). **`block_decoder.gpt_neox.embed_in.weight` is dropped**: the official block decoder
    keeps a [V, D] input embedding it never uses (it always receives the block vectors as `inputs_embeds`).
    Non-persistent buffers (rotary tables, causal masks) are not in the checkpoint and are rebuilt.

    The first block: the official model never predicts the tokens of block 0 (its first `block_length` tokens;
    block i is predicted from the block decoder's output for block i - 1). hf_yoco predicts every token by giving
    block 0 a learned start context `model.start_context`, which official checkpoints do not have: it keeps its
    initial value (random, like any newly initialised weight), so the logits at positions `0 .. block_length - 2`
    (predicting the rest of block 0) are **not** those of the official model, which makes no such predictions.
    From position `block_length - 1` on (blocks >= 1) the logits equal the official forward's. The logits at the
    last position of an input that ends on a block boundary (the first token of the next block) come from the last
    block's context, as in the official `generate` (which, unlike its forward, gives both prefix vectors rotary
    position 0, block_transformer.md §2.3; hf_yoco uses the training positions). To reproduce the official "pad"
    scoring of the <= 85M checkpoints, prepend `block_length - 1` tokens of id 0 as real tokens (attention mask 1).

    Args:
        checkpoint: the official `model.safetensors`, or a folder holding `*.safetensors` (safetensors only).
        config: a `BlockTransformerConfig`, the official trainer yaml / json (path or parsed dict) read by
            `official_block_transformer_config`, or `None` to infer the architecture from the tensor shapes.
        dtype: dtype of the returned model (released checkpoints are probably bf16).
    """
    if isinstance(config, (str, Path)):
        config = _read_trainer_config(config)  # a wrong path is reported before the checkpoint is read
    state_dict = _load_safetensors(Path(checkpoint))
    if not isinstance(config, BlockTransformerConfig):
        config = (
            official_block_transformer_config(state_dict=state_dict)
            if config is None
            else official_block_transformer_config(config)
        )
    if config.layer_style != "gpt_neox" or not (config.attention_bias and config.mlp_bias):
        raise ValueError(
            "Official Block Transformer checkpoints need `layer_style='gpt_neox'` with `attention_bias` and "
            "`mlp_bias` (use `official_block_transformer_config`)."
        )
    if config.num_key_value_heads != config.num_attention_heads or config.tie_word_embeddings:
        raise ValueError("Official Block Transformer checkpoints have no GQA and an untied LM head.")
    with torch.device("meta"):  # shapes only
        reference = BlockTransformerForCausalLM(config)
    renamed = _official_block_transformer_state_dict(state_dict, config, reference)
    # `model.start_context` is absent: from_pretrained initialises it (see the docstring).
    model = BlockTransformerForCausalLM.from_pretrained(None, config=config, state_dict=renamed, dtype=dtype)
    return model.eval()


def yocofy_llama(
    llama: PreTrainedModel,
    self_decoder_type: str = "sliding_window",
    sliding_window: int | None = 1024,
    num_self_decoder_layers: int | None = None,
    **config_overrides,
) -> YocoForCausalLM:
    """Initialise a YOCO model from a Llama-architecture causal LM (YOCO-fication).

    With S = `num_self_decoder_layers` (default: half of the layers, which must then be even), layers `0 .. S-1` keep
    their weights as self-decoder layers (sliding-window attention, or gated retention with fresh `g_proj`/`gt_proj`
    and GQA keys/values repeated per head); layer `S`'s input norm and k/v projections build the global K/V; layers
    `S ..` keep q/o projections, norms and MLPs as cross-decoder layers. Embeddings, final norm and LM head are
    copied. Then calibrate (`calibrate_shared_kv`) and fine-tune: cross layers above `S` now read layer `S`'s K/V.
    """
    source = llama.config
    if num_self_decoder_layers is None and source.num_hidden_layers % 2:
        raise ValueError(
            f"`num_hidden_layers` must be even to YOCO-fy with the default half/half split, got "
            f"{source.num_hidden_layers}; pass `num_self_decoder_layers`."
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(source, flag, False):
            raise ValueError(f"Llama checkpoints with `{flag}=True` are not supported (YOCO layers have no biases).")
    kwargs = dict(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=source.num_hidden_layers,
        num_self_decoder_layers=num_self_decoder_layers,
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
    half = config.num_self_decoder_layers  # S
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


@torch.no_grad()
def calibrate_shared_kv(llama: PreTrainedModel, yoco: YocoForCausalLM, input_ids: torch.Tensor) -> dict[int, dict]:
    """Fit the global K/V and the cross layers of a YOCO-fied model so that each cross layer reads the shared K/V as
    it read its own (in place; closed-form least squares on calibration text).

    On `input_ids` `[B, T]` (T at most the sliding window, so the self-decoder equals the original), with `x` the
    input of the global K/V (layer S's normed input) and `k_i`, `v_i` the original keys/values of cross layer `i`:
    - values, per K/V head: a shared value head `v = x P` and per-layer maps `v_i ~ v M_i` minimising the error *as
      the output projection sees it*, sum_i |(v_i - v M_i) O_i^T|^2 (a reduced-rank regression: the top principal
      subspace of the layers' least-squares predictions from `x`); `M_i` is folded into `o_proj` (attention is
      linear in the values);
    - keys, per K/V head and RoPE frequency pair (a complex number, as RoPE rotates pairs): a shared key `s = x p`
      and per-layer complex scales `k_i ~ c_i s` (the maps that commute with the rotation), weighted by each layer's
      query energy on that pair (what the logits see); `conj(c_i)` is folded into `q_proj`.
    The global K/V projections become `P` and `p`. Returns each cross layer's relative residual of keys and values.
    """
    config = yoco.config
    if config.self_decoder_type != "sliding_window":
        raise ValueError(
            "calibration needs a sliding-window self-decoder (gated retention changes the lower half too)"
        )
    if input_ids.shape[1] > config.sliding_window:
        raise ValueError(
            f"calibration sequences must fit the window ({config.sliding_window}), got {input_ids.shape[1]}"
        )
    if input_ids.numel() < 2 * config.hidden_size:
        raise ValueError(
            f"calibration needs at least 2 * hidden_size = {2 * config.hidden_size} tokens (a least-squares fit over "
            f"hidden_size inputs), got {input_ids.numel()}"
        )
    split, heads, kv_heads, dim = (config.num_self_decoder_layers, config.num_attention_heads,
                                   config.num_key_value_heads, config.head_dim)  # fmt: skip
    group, pairs, cross = heads // kv_heads, dim // 2, range(config.num_self_decoder_layers, config.num_hidden_layers)
    as_complex = lambda x: torch.complex(x[..., :pairs], x[..., pairs:])  # noqa: E731  RoPE pairs (j, j + D/2)
    keys, values, query_energy, captured = {}, {}, {}, {}

    def capture(module, args, out, layer, kind):
        if kind == "x":
            captured["x"] = args[0].reshape(-1, args[0].shape[-1]).double()  # [N, d]
        elif kind == "q":  # mean |q|^2 per K/V head and pair, over tokens and the heads of its group: [H_kv, D/2]
            q = out.reshape(-1, kv_heads, group, dim).double()
            query_energy[layer] = (q[..., :pairs] ** 2 + q[..., pairs:] ** 2).mean((0, 2))
        else:
            (keys if kind == "k" else values)[layer] = out.reshape(-1, kv_heads, dim).double()  # [N, H_kv, D]

    attentions = {i: llama.model.layers[i].self_attn for i in cross}
    hooks = [getattr(attentions[i], f"{kind}_proj").register_forward_hook(
        lambda m, a, o, i=i, kind=kind: capture(m, a, o, i, kind)) for i in cross for kind in "qkv"]  # fmt: skip
    hooks.append(attentions[split].k_proj.register_forward_hook(lambda m, a, o: capture(m, a, o, split, "x")))
    try:
        llama(input_ids.to(llama.device))
    finally:
        for hook in hooks:
            hook.remove()
    x = captured["x"]
    gram = x.T @ x  # [d, d]
    solve = lambda targets: torch.linalg.lstsq(x.to(targets.dtype), targets).solution  # noqa: E731  [d, *]
    n = len(cross)

    # Values: whiten each layer's targets by its output projection (sum over the group's query heads of O_h^T O_h).
    whiten = {}  # (layer, kv head) -> L with L L^T = metric
    for i in cross:
        o = yoco.model.layers[i].cross_attn.o_proj.weight.double().view(-1, kv_heads, group, dim)  # [d, H_kv, G, D]
        metric = torch.einsum("ahgi,ahgj->hij", o, o) + 1e-6 * torch.eye(dim, dtype=o.dtype)  # [H_kv, D, D]
        whiten[i] = torch.linalg.cholesky(metric)
    value_proj, value_maps = torch.empty(kv_heads, dim, x.shape[1], dtype=x.dtype), {}
    for h in range(kv_heads):
        targets = torch.cat([values[i][:, h] @ whiten[i][h] for i in cross], 1)  # [N, n * D]
        coef = solve(targets)  # [d, n * D]
        _, vectors = torch.linalg.eigh(coef.T @ gram @ coef)  # principal subspace of the fitted targets
        basis = vectors[:, -dim:]  # [n * D, D]
        value_proj[h] = (coef @ basis).T  # shared value head: v = x P, [D, d]
        for j, i in enumerate(cross):  # v_i ~ v @ basis_i^T @ L_i^-1
            block = basis[j * dim : (j + 1) * dim]  # [D, D]
            value_maps[i, h] = torch.linalg.solve_triangular(whiten[i][h].mT, block, upper=True).T

    # Keys: per (K/V head, pair) a rank-1 complex fit across layers, each weighted by its query energy.
    weights = torch.stack([query_energy[i].sqrt() for i in cross])  # [n, H_kv, D/2]
    targets = torch.stack([as_complex(keys[i]) for i in cross], -1) * weights.permute(1, 2, 0)  # [N, H_kv, D/2, n]
    coef = solve(targets.reshape(x.shape[0], -1)).reshape(-1, kv_heads, pairs, n)  # [d, H_kv, D/2, n]
    normal = torch.einsum("dhpi,de,ehpj->hpij", coef.conj(), gram.to(coef.dtype), coef)  # [H_kv, D/2, n, n]
    top = torch.linalg.eigh(normal)[1][..., -1]  # [H_kv, D/2, n], unit
    key_proj = torch.einsum("dhpi,hpi->hpd", coef, top)  # shared key s = x p, [H_kv, D/2, d] complex
    scales = top.conj() / weights.permute(1, 2, 0).clamp_min(1e-12)  # k_i ~ c_i s, [H_kv, D/2, n]

    global_kv = yoco.model.global_kv
    dtype = global_kv.k_proj.weight.dtype
    global_kv.k_proj.weight.copy_(torch.cat([key_proj.real, key_proj.imag], 1).reshape(-1, x.shape[1]).to(dtype))
    global_kv.v_proj.weight.copy_(value_proj.reshape(-1, x.shape[1]).to(dtype))
    shared_k = torch.einsum("nd,hpd->nhp", x.to(key_proj.dtype), key_proj)  # [N, H_kv, D/2] complex
    shared_v = torch.einsum("nd,hed->nhe", x, value_proj)  # [N, H_kv, D]
    residuals = {}
    for j, i in enumerate(cross):
        attention = yoco.model.layers[i].cross_attn
        q_weight = attention.q_proj.weight.double().view(heads, dim, -1)  # [H, D, d]
        o_weight = attention.o_proj.weight.double().view(-1, heads, dim)  # [d, H, D]
        for head in range(heads):
            h = head // group
            a, b = scales[h, :, j].real[:, None], scales[h, :, j].imag[:, None]  # q' = conj(c) q, per pair
            first, second = q_weight[head, :pairs].clone(), q_weight[head, pairs:].clone()
            q_weight[head, :pairs] = a * first + b * second
            q_weight[head, pairs:] = a * second - b * first
            o_weight[:, head] = o_weight[:, head] @ value_maps[i, h].T
        attention.q_proj.weight.copy_(q_weight.view_as(attention.q_proj.weight).to(dtype))
        attention.o_proj.weight.copy_(o_weight.view_as(attention.o_proj.weight).to(dtype))
        fitted_k = shared_k * scales[:, :, j]
        fitted_v = torch.stack([shared_v[:, h] @ value_maps[i, h] for h in range(kv_heads)], 1)
        target_k = as_complex(keys[i])
        residuals[i] = {
            "keys": float((fitted_k - target_k).abs().norm() / target_k.abs().norm()),
            "values": float((fitted_v - values[i]).norm() / values[i].norm()),
        }
    return residuals


# ------------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "kind", choices=["yoco-official", "block-transformer-official", "llama-to-yoco"], help="what to convert"
    )
    parser.add_argument("input", help="official: .safetensors file or folder (+ params.json); llama: a model folder")
    parser.add_argument("output", help="folder for save_pretrained")
    parser.add_argument("--params", help="official YOCO params.json (default: beside the checkpoint)")
    parser.add_argument(
        "--config",
        help="official Block Transformer trainer yaml (conf/trainer/<name>.yaml; default: inferred from the shapes)",
    )
    parser.add_argument("--self-decoder", choices=["sliding_window", "gated_retention"], default="sliding_window")
    parser.add_argument("--sliding-window", type=positive_int, default=1024)
    parser.add_argument(
        "--self-decoder-layers",
        type=positive_int,
        help="llama-to-yoco: layers kept as the self-decoder (default: half)",
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def run(args: argparse.Namespace) -> int:
    """Convert, then write the output folder atomically (model and tokenizer together, or nothing)."""
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f"output {args.output} is a file; choose a folder")
    dtype = getattr(torch, args.dtype)
    tokenizer = None
    if args.kind == "yoco-official":
        model = convert_official_yoco(args.input, args.params, dtype=dtype)
    elif args.kind == "block-transformer-official":
        model = convert_official_block_transformer(args.input, args.config, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_model_folder(args.input)
        llama = AutoModelForCausalLM.from_pretrained(args.input, dtype=dtype, use_safetensors=True)
        model = yocofy_llama(llama, args.self_decoder, args.sliding_window, args.self_decoder_layers)
        if any((Path(args.input) / name).exists() for name in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(args.input)
        else:
            print(f"no tokenizer in {args.input}; saving the model only")
    with atomic_directory(args.output) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
    print(f"saved {type(model).__name__} ({model.num_parameters():,} parameters) to {args.output}")
    return 0
