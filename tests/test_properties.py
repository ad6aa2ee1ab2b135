"""Property-based parity (hypothesis): generated configs and inputs, every property an equality of two computations.

Strategies cover layers, heads, kv heads, head dims, window, block length, retention chunk, self-decoder chunk, RoPE
types, `official_numerics`, layer style and partial rotary, and draw lengths around every boundary (window, chunk,
block) plus left padding per row and batch sizes. Properties (fp32; logits within atol = rtol = 1e-4, kernels within
relative RMSE 0.005):

- cached decode (prefill + one token at a time) == full forward, both models;
- chunked prefill == one-shot prefill (YOCO), and the caches they leave continue alike;
- a left-padded batch == each row alone, both models;
- Triton (interpreter) == PyTorch for the three kernels;
- save / load and Hub remote-code load give the same logits;
- beam search with the cache == without, both models.

The default profile ("ci") is derandomized, so CI is reproducible, and runs about 860 cases in about a minute; set
`HYPOTHESIS_PROFILE=long` for ten times as many cases with fresh randomness. Failures found so far have named
regression tests below the properties.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import examples
from hypothesis import assume, given
from hypothesis import strategies as st

import hf_yoco
from hf_yoco import output_cache

VOCAB = 48
ATOL = RTOL = 1e-4
SIZES_FOR_ROPE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2
)


# ---------------------------------------------------------------------------------------------- strategies


@st.composite
def yoco_configs(draw, self_decoder_type: str | None = None) -> hf_yoco.YocoConfig:
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    self_decoder_type = self_decoder_type or draw(st.sampled_from(["gated_retention", "sliding_window"]))
    official = draw(st.booleans())
    rope = draw(st.sampled_from(["default", "linear", "yarn"])) if not official else "default"
    rope_parameters = {"rope_type": rope, "rope_theta": draw(st.sampled_from([100.0, 10000.0]))}
    if rope != "default":
        rope_parameters["factor"] = 2.0
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=draw(st.sampled_from([8, 16])),
        num_hidden_layers=draw(st.sampled_from([2, 4])), self_decoder_type=self_decoder_type,
        official_numerics=official, rope_parameters=rope_parameters, pad_token_id=0, bos_token_id=None,
        eos_token_id=None, self_decoder_chunk_size=None,
    )  # fmt: skip
    if self_decoder_type == "sliding_window":
        kwargs["sliding_window"] = draw(st.integers(2, 12))
    else:
        kwargs["retention_chunk_size"] = draw(st.integers(1, 8))
        kwargs["num_retention_heads"] = draw(st.sampled_from([1, 2, 4]))
    return hf_yoco.YocoConfig(**kwargs)


@st.composite
def block_configs(draw) -> hf_yoco.BlockTransformerConfig:
    heads = draw(st.sampled_from([1, 2, 4]))
    gpt_neox = draw(st.booleans())
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=24 * draw(st.sampled_from([1, 2])), intermediate_size=48,
        num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),
        block_length=draw(st.integers(1, 5)), num_prefix_tokens=draw(st.integers(1, 3)),
        num_block_decoder_layers=draw(st.integers(1, 2)), num_token_decoder_layers=draw(st.integers(1, 2)),
        initializer_range=0.2, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    assume(kwargs["hidden_size"] % heads == 0 and (kwargs["hidden_size"] // heads) % 2 == 0)
    assume(kwargs["hidden_size"] % kwargs["block_length"] == 0)
    if gpt_neox:
        partial = draw(st.sampled_from([0.25, 0.5, 1.0]))
        assume(int(kwargs["hidden_size"] // heads * partial) % 2 == 0)
        kwargs.update(layer_style="gpt_neox", use_parallel_residual=draw(st.booleans()), hidden_act="gelu",
                      partial_rotary_factor=partial, attention_bias=True, mlp_bias=True)  # fmt: skip
    return hf_yoco.BlockTransformerConfig(**kwargs)


def boundaries(config) -> list[int]:
    """Sequence lengths next to the config's window / chunk / block boundaries."""
    edges = [getattr(config, name, None) for name in ("sliding_window", "retention_chunk_size", "block_length")]
    return sorted({max(1, e + d) for e in edges if e for d in (-1, 0, 1)} | {1, 2})


def lengths(data, config, low: int = 1, high: int = 24) -> int:
    near = [n for n in boundaries(config) if low <= n <= high] or [low]
    return data.draw(st.one_of(st.sampled_from(near), st.integers(low, high)), label="length")


def build(config):
    torch.manual_seed(0)
    model_class = hf_yoco.BlockTransformerForCausalLM if config.model_type.endswith("block_transformer") else (
        hf_yoco.YocoForCausalLM
    )  # fmt: skip
    return model_class(config).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def incremental_logits(model, input_ids: torch.Tensor, prefill: int) -> torch.Tensor:
    out = model(input_ids[:, :prefill], use_cache=True)
    cache, steps = output_cache(out), [out.logits]
    for t in range(prefill, input_ids.shape[1]):
        steps.append(model(input_ids[:, t : t + 1], cache=cache).logits)
    return torch.cat(steps, dim=1)


# ---------------------------------------------------------------------------------------------- properties


@examples(200)
@given(config=st.one_of(yoco_configs(), block_configs()), data=st.data())
def test_cached_decode_equals_full_forward(config, data):
    model = build(config)
    total = lengths(data, config, 2, 20)
    prefill = data.draw(st.integers(1, total - 1), label="prefill")
    input_ids = torch.randint(1, VOCAB, (data.draw(st.integers(1, 2), label="batch"), total))
    with torch.no_grad():
        assert_close(incremental_logits(model, input_ids, prefill), model(input_ids).logits)


@examples(120)
@given(config=yoco_configs(), data=st.data())
def test_chunked_prefill_equals_one_shot(config, data):
    model = build(config)
    length = lengths(data, config, 1, 24)
    chunk = data.draw(st.integers(1, 10), label="self_decoder_chunk_size")
    input_ids = torch.randint(1, VOCAB, (2, length))
    next_ids = torch.randint(1, VOCAB, (2, 1))
    with torch.no_grad():
        one_shot = model(input_ids, use_cache=True)
        model.config.self_decoder_chunk_size = chunk
        in_chunks = model(input_ids, use_cache=True)
        assert_close(in_chunks.logits, one_shot.logits)
        model.config.self_decoder_chunk_size = None
        assert_close(
            model(next_ids, cache=output_cache(in_chunks)).logits, model(next_ids, cache=output_cache(one_shot)).logits
        )


@examples(150)
@given(config=st.one_of(yoco_configs(), block_configs()), data=st.data())
def test_left_padded_batch_equals_rows_alone(config, data):
    model = build(config)
    rows = [torch.randint(1, VOCAB, (lengths(data, config, 1, 14),)) for _ in range(data.draw(st.integers(2, 3)))]
    longest = max(len(row) for row in rows)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, longest - len(row) :], mask[i, longest - len(row) :] = row, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
        for i, row in enumerate(rows):
            assert_close(batch[i, longest - len(row) :], model(row[None]).logits[0])


@examples(40)
@given(config=st.one_of(yoco_configs(), block_configs()), data=st.data())
def test_save_load_and_remote_code_give_identical_logits(config, data, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    model = build(config)
    folder = tmp_path_factory.mktemp("saved")
    model.save_pretrained(folder)
    input_ids = torch.randint(1, VOCAB, (1, lengths(data, config, 1, 12)))
    module = (
        "modeling_block_transformer" if isinstance(model, hf_yoco.BlockTransformerForCausalLM) else "modeling_yoco"
    )
    remote_class = get_class_from_dynamic_module(f"{module}.{type(model).__name__}", str(folder))
    assert remote_class.__module__.startswith("transformers_modules.")
    with torch.no_grad():  # identical weights; CPU kernels may sum in another order for other memory addresses
        expected = model(input_ids).logits
        assert_close(AutoModelForCausalLM.from_pretrained(folder).eval()(input_ids).logits, expected)
        assert_close(remote_class.from_pretrained(folder).eval()(input_ids).logits, expected)


@examples(80)
@given(config=st.one_of(yoco_configs(), block_configs()), data=st.data())
def test_beam_search_with_cache_equals_without(config, data):
    model = build(config)
    input_ids = torch.randint(1, VOCAB, (1, lengths(data, config, 1, 10)))
    beam = dict(num_beams=data.draw(st.integers(2, 3)), max_new_tokens=4, do_sample=False, pad_token_id=0,
                eos_token_id=None, disable_compile=True)  # fmt: skip
    assert torch.equal(model.generate(input_ids, **beam), model.generate(input_ids, use_cache=False, **beam))


def test_ci_runs_at_least_500_generated_cases():
    """The property tests (these and tests/kernels/test_kernel_properties.py) run >= 500 generated cases per CI run."""
    path = Path(__file__).parent / "kernels" / "test_kernel_properties.py"
    spec = importlib.util.spec_from_file_location("kernel_properties", path)
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    tests = [value for module in (globals(), vars(kernels)) for value in dict(module).values()]
    counts = [t.hypothesis.inner_test and t._hypothesis_internal_use_settings.max_examples for t in tests
              if hasattr(t, "_hypothesis_internal_use_settings")]  # fmt: skip
    assert len(counts) >= 8 and sum(counts) >= 500, counts  # 860 now


# ---------------------------------------------------------------------------------------------- regressions


def test_regression_window_of_one_is_refused():
    """Found by `test_cached_decode_equals_full_forward`: with `sliding_window=1`, transformers' sliding-window cache
    keeps the whole past (`keys[..., -0:, :]`), so cached decoding attended to earlier tokens. A window must be >= 2."""
    with pytest.raises(ValueError, match=r"`sliding_window` must be an int >= 2"):
        hf_yoco.YocoConfig(self_decoder_type="sliding_window", sliding_window=1)


def test_regression_scaled_rope_with_retention_heads_of_another_width():
    """Found by `test_chunked_prefill_equals_one_shot`: a scaled RoPE type (linear) sized its frequencies by
    `head_dim` (16) while the retention heads are hidden_size / num_retention_heads = 8 wide: a shape error."""
    config = hf_yoco.YocoConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=1, head_dim=16,
        num_hidden_layers=2, num_retention_heads=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
        "rope_theta": 10000.0},
    )  # fmt: skip
    model = build(config)
    input_ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        assert_close(incremental_logits(model, input_ids, 2), model(input_ids).logits)
    assert model.model.retention_rotary_emb.inv_freq.shape == (4,)  # 8 channels / 2, divided by the factor


def test_regression_runtime_rope_types_are_refused():
    """`dynamic` / `longrope` rescale the frequencies with the length during the forward, which hf_yoco never did:
    beyond max_position_embeddings they silently behaved as `default`. Refused with the supported types."""
    config = hf_yoco.YocoConfig(**{**SIZES_FOR_ROPE, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"rope_type.*'dynamic' rescales.*linear"):
        build(config)
