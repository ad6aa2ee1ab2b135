import pytest
from transformers import AutoConfig, DynamicCache, StaticCache
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

import hf_yoco
from hf_yoco import YocoConfig

pytestmark = pytest.mark.transformers_compat

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4)


def test_model_type_is_distinct_and_registered():
    assert YocoConfig.model_type == "hf_yoco"  # not "yoco": flash-linear-attention owns that name
    assert isinstance(AutoConfig.for_model("hf_yoco", **TINY), YocoConfig)
    assert hf_yoco.__version__


def test_layer_layout_for_transformers_caches():
    swa = YocoConfig(**TINY, self_decoder_type="sliding_window", sliding_window=8)
    assert swa.layer_types == ["sliding_attention"] * 3 + ["full_attention"] * 3
    assert swa.kv_sharing_modes == [None, None, None, "store", "reuse", "reuse"]
    layers = DynamicCache(config=swa).layers
    assert [type(x) for x in layers] == [DynamicSlidingWindowLayer] * 3 + [DynamicLayer] + [DummyLayer] * 2
    layers = StaticCache(config=swa, max_cache_len=16).layers
    assert [type(x) for x in layers] == [StaticSlidingWindowLayer] * 3 + [StaticLayer] + [DummyLayer] * 2

    gret = YocoConfig(**TINY)  # gated retention is the default self-decoder (as in the paper)
    assert gret.self_decoder_type == "gated_retention" and gret.sliding_window is None
    assert gret.layer_types == ["linear_attention"] * 3 + ["full_attention"] * 3
    layers = DynamicCache(config=gret).layers
    assert [type(x) for x in layers] == [LinearAttentionLayer] * 3 + [DynamicLayer] + [DummyLayer] * 2


def test_self_decoder_split_sets_the_cache_layout():
    """`num_self_decoder_layers` moves the store layer; the default is half; any total works with an explicit split."""
    assert YocoConfig(**TINY).num_self_decoder_layers == 3
    config = YocoConfig(**{**TINY, "num_hidden_layers": 5}, num_self_decoder_layers=4)
    assert config.layer_types == ["linear_attention"] * 4 + ["full_attention"]
    assert config.kv_sharing_modes == [None] * 4 + ["store"]
    layers = DynamicCache(config=config).layers
    assert [type(x) for x in layers] == [LinearAttentionLayer] * 4 + [DynamicLayer]
    config = YocoConfig(**TINY, num_self_decoder_layers=1, self_decoder_type="sliding_window", sliding_window=8)
    assert config.kv_sharing_modes == [None, "store"] + ["reuse"] * 4


def test_defaults_and_standard_fields():
    config = YocoConfig(**TINY, rope_theta=500000.0, num_key_value_heads=2)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.head_dim == 8 and config.num_key_value_heads == 2
    assert config.gate_logit_normalizer == 16 and config.official_numerics is False
    assert config.retention_head_dim == 8
    assert YocoConfig(**TINY, num_retention_heads=2).retention_head_dim == 16


def test_round_trip(tmp_path):
    config = YocoConfig(**TINY, self_decoder_type="sliding_window", sliding_window=8, official_numerics=True)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, YocoConfig)
    drop = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
        k: v for k, v in config.to_dict().items() if k not in drop
    }


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_hidden_layers=5), "num_hidden_layers"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(num_self_decoder_layers=6), "num_self_decoder_layers.*1 to"),
        (dict(num_self_decoder_layers=0), "num_self_decoder_layers.*1 to"),
        (dict(num_self_decoder_layers="2"), "num_self_decoder_layers"),
        (dict(self_decoder_type="mamba"), "self_decoder_type"),
        (dict(self_decoder_type="sliding_window"), "sliding_window"),
        (dict(self_decoder_type="sliding_window", sliding_window=0), "sliding_window"),
        (dict(self_decoder_type="sliding_window", sliding_window=-4), "sliding_window"),
        (dict(sliding_window=8), "sliding_window"),  # only valid for the SWA self-decoder
        (dict(self_decoder_type="sliding_window", sliding_window=8, num_retention_heads=2), "num_retention_heads"),
        (dict(hidden_size=30), "hidden_size"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_retention_heads=3), "num_retention_heads"),
        (dict(head_dim=7), "head_dim"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(intermediate_size=-1), "intermediate_size"),
        (dict(gate_logit_normalizer=0.0), "gate_logit_normalizer"),
        (dict(retention_chunk_size=0), "retention_chunk_size"),
        (dict(self_decoder_chunk_size=0), "self_decoder_chunk_size"),
        (dict(self_decoder_chunk_size="big"), "self_decoder_chunk_size.*'auto'"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(layer_types=["full_attention"] * 6), "layer_types"),
        (dict(official_numerics=True, rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    ],
)
def test_invalid_config_raises_clear_error(overrides, field):
    with pytest.raises(ValueError, match=field):
        YocoConfig(**{**TINY, **overrides})
