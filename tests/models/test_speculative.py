"""Speculative decoding for every model: caches roll back exactly (`crop`), so assisted and prompt-lookup decoding
give exactly the greedy tokens.

Tolerance: after `crop`, continuing gives the logits of a fresh prefill of the kept tokens within atol = rtol = 1e-4
(fp32, logits of order 1; observed 1e-7 for YOCO, up to 1.5e-5 for the Block Transformer, whose rebuilt block runs
one block-decoder query over cached keys where the prefill ran all blocks at once).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_yoco
from hf_yoco import BlockTransformerCache, YocoCache
from hf_yoco.models.modeling_yoco import YocoRetentionLayer

pytestmark = pytest.mark.transformers_compat

VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0, bos_token_id=None, eos_token_id=None)  # fmt: skip
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=True)


def build(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**{**SIZES, "num_hidden_layers": 2, **overrides})).eval()
    if name == "block":
        config = hf_yoco.BlockTransformerConfig(**{**SIZES, "block_length": 4, "initializer_range": 0.2, **overrides})
        return hf_yoco.BlockTransformerForCausalLM(config).eval()
    decoder = {"gret": "gated_retention", "swa": "sliding_window"}[name]
    kwargs = {**SIZES, "num_hidden_layers": 4, "self_decoder_type": decoder, "retention_chunk_size": 4,
              "initializer_range": 0.2, **overrides}  # fmt: skip
    if decoder == "sliding_window":
        kwargs.setdefault("sliding_window", 5)
    return hf_yoco.YocoForCausalLM(hf_yoco.YocoConfig(**kwargs)).eval()


def new_cache(model):
    return BlockTransformerCache(model.config) if isinstance(model, hf_yoco.BlockTransformerForCausalLM) else (
        YocoCache(model.config)
    )  # fmt: skip


MODELS = ["gret", "swa", "block"]
# (prefill, then fed at once, then removed): inside the last forward, all of it, across retention chunks (4) and
# Block Transformer blocks (4), back into the prompt's blocks.
CROPS = [(9, 1, 1), (9, 6, 3), (9, 6, 6), (3, 20, 7), (10, 3, 3), (4, 12, 13), (7, 9, 16)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(("prefill", "fed", "removed"), CROPS)
def test_crop_then_continue_equals_a_fresh_prefill(name, prefill, fed, removed):
    model = build(name)
    input_ids = torch.randint(1, VOCAB, (1, prefill + fed + 3))
    kept = prefill + fed - removed
    with torch.no_grad():
        cache = new_cache(model)
        cache.activate_past_recording()
        model(input_ids[:, :prefill], cache=cache)
        model(input_ids[:, prefill : prefill + fed], cache=cache)
        cache.crop(-removed)
        assert cache.get_seq_length() == kept
        continued = model(input_ids[:, kept : kept + 3], cache=cache).logits
        fresh = model(input_ids[:, : kept + 3]).logits[:, kept:]
    torch.testing.assert_close(continued, fresh, atol=1e-4, rtol=1e-4)


def test_crop_without_recording_is_refused_with_a_clear_error():
    retention, block = build("gret"), build("block")
    with torch.no_grad():
        cache = new_cache(retention)
        retention(torch.randint(1, VOCAB, (1, 6)), cache=cache)
        with pytest.raises(ValueError, match="activate_past_recording"):
            cache.crop(-2)
        cache = new_cache(block)
        block(torch.randint(1, VOCAB, (1, 9)), cache=cache)  # 2 blocks + 1 pending token
        cache.crop(-1)  # inside the current block: fine without recording
        with pytest.raises(ValueError, match="activate_past_recording"):
            cache.crop(-2)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("draft", ["itself", "smaller", "llama", "other-architecture"])
def test_assisted_decoding_gives_the_greedy_tokens(name, draft):
    model = build(name)
    assistant = {
        "itself": model,
        "smaller": build(name, seed=1, hidden_size=16, intermediate_size=32, num_attention_heads=2),
        "llama": build("llama", seed=2),
        "other-architecture": build("block" if name != "block" else "gret", seed=3),
    }[draft]
    prompt = torch.randint(1, VOCAB, (1, 11))
    greedy = model.generate(prompt, max_new_tokens=16, **GREEDY)
    assisted = model.generate(prompt, max_new_tokens=16, assistant_model=assistant, **GREEDY)
    assert torch.equal(assisted, greedy)


@pytest.mark.parametrize("name", MODELS)
def test_prompt_lookup_decoding_gives_the_greedy_tokens(name):
    model = build(name)
    passage = torch.randint(1, VOCAB, (1, 12))
    prompt = torch.cat([passage, passage, passage[:, :4]], dim=1)  # the text repeats: lookups find candidates
    greedy = model.generate(prompt, max_new_tokens=20, **GREEDY)
    for lookup in (2, 5):
        assert torch.equal(
            model.generate(prompt, max_new_tokens=20, prompt_lookup_num_tokens=lookup, **GREEDY), greedy
        )


@pytest.mark.parametrize("name", MODELS)
def test_transformers_limits_stay_as_for_llama(name):
    """transformers' own limits of assisted decoding apply unchanged: batches are refused with its message, and with
    beam search it warns and runs plain beam search (as for a Llama)."""
    model = build(name)
    prompt = torch.randint(1, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="only supported for batch_size = 1"):
        model.generate(prompt, max_new_tokens=3, prompt_lookup_num_tokens=2, **GREEDY)
    beam = dict(max_new_tokens=4, num_beams=2, **GREEDY)
    assert torch.equal(model.generate(prompt[:1], assistant_model=model, **beam), model.generate(prompt[:1], **beam))


def test_rollback_memory_is_bounded_and_freed():
    """gRet keeps one state plus the inputs of at most `rollback_tokens` tokens per layer, however long the run;
    a crop shrinks it. The Block Transformer keeps 8 bytes of history per token."""
    model = build("gret")
    cache = new_cache(model)
    cache.activate_past_recording()
    layers = [layer for layer in cache.layers if isinstance(layer, YocoRetentionLayer)]
    capacity = 12
    for layer in layers:
        layer.rollback_tokens = capacity
    with torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 30)), cache=cache)
        for _ in range(10):
            model(torch.randint(1, VOCAB, (1, 1)), cache=cache)
    per_token = 4 * (
        2 * model.config.retention_head_dim * model.config.num_attention_heads + model.config.num_attention_heads
    )
    state = 4 * model.config.num_attention_heads * model.config.retention_head_dim**2
    for layer in layers:
        assert layer.rollback[1].shape[1] == capacity
        assert layer.rollback_bytes() == state + capacity * per_token
    cache.crop(-5)
    assert all(layer.rollback[1].shape[1] == capacity - 5 for layer in layers)
    assert cache.memory_bytes()["rollback"] == sum(layer.rollback_bytes() for layer in layers)

    block = build("block")
    cache = new_cache(block)
    cache.activate_past_recording()
    with torch.no_grad():
        block(torch.randint(1, VOCAB, (1, 10)), cache=cache)
    assert cache.history.shape[1] <= 10 + 256 and cache.history.dtype == torch.long
