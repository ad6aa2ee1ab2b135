"""BlockTransformerConfig: defaults, derived fields, serialization, Auto registration and validation errors."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

import hf_yoco  # noqa: F401  (registers the Auto classes)
from hf_yoco.models.configuration_block_transformer import BlockTransformerConfig

pytestmark = pytest.mark.transformers_compat

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4)


def test_defaults_and_derived_fields():
    config = BlockTransformerConfig()
    assert config.model_type == "hf_yoco_block_transformer"
    assert (config.block_length, config.num_prefix_tokens) == (4, 2)
    assert config.layer_style == "llama" and not config.use_parallel_residual and not config.tie_word_embeddings
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.embedder_hidden_size == config.hidden_size // 4
    assert config.num_hidden_layers == config.num_block_decoder_layers + config.num_token_decoder_layers
    assert config.token_decoder_length == 2 + 4 - 1
    assert config.rope_parameters["rope_type"] == "default"


def test_gpt_neox_style_and_rope_theta():
    config = BlockTransformerConfig(
        **TINY,
        layer_style="gpt_neox",
        use_parallel_residual=True,
        partial_rotary_factor=0.25,
        attention_bias=True,
        mlp_bias=True,
        hidden_act="gelu",
        rope_theta=500.0,
    )
    assert config.rotary_dim == 2  # int(8 * 0.25)
    assert config.rope_parameters["rope_theta"] == 500.0


def test_save_load_and_auto_config(tmp_path):
    config = BlockTransformerConfig(**TINY, block_length=8, num_prefix_tokens=3, num_key_value_heads=2)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, BlockTransformerConfig)
    drop = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
        k: v for k, v in config.to_dict().items() if k not in drop
    }
    assert AutoConfig.for_model("hf_yoco_block_transformer").__class__ is BlockTransformerConfig


INVALID = [
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=-32), "hidden_size"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(block_length=0), "block_length"),
    (dict(block_length=3), "divisible by `block_length`"),
    (dict(num_prefix_tokens=0), "num_prefix_tokens"),
    (dict(num_block_decoder_layers=0), "num_block_decoder_layers"),
    (dict(num_token_decoder_layers=0), "num_token_decoder_layers"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(num_attention_heads=5), "must divide `hidden_size`"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=0), "head_dim"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(layer_style="mamba"), "layer_style"),
    (dict(hidden_act="not_an_activation"), "hidden_act"),
    (dict(partial_rotary_factor=0.0), "partial_rotary_factor"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(partial_rotary_factor=0.1), "rotary channels"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(initializer_range=-1.0), "initializer_range"),
    (dict(attention_dropout=1.0), "attention_dropout"),
]


@pytest.mark.parametrize("overrides,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_fields_raise_clear_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("`", ".").replace("(", ".").replace(")", ".")):
        BlockTransformerConfig(**{**TINY, **overrides})
