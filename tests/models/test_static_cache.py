"""Static caches and `torch.compile` (transformers' fast decode path) for YOCO-SWA, YOCO-gRet and the Block Transformer.

`generate(..., cache_implementation="static")` builds `YocoStaticCache` / `BlockTransformerStaticCache`, whose decode
step has fixed shapes, tensor addresses and control flow. Checked here on CPU:
- static == dynamic generation (tokens equal; scores within 1e-4: the ring buffer orders keys differently and the
  static global K/V is attended over its whole capacity, masked), unpadded and left-padded, across window wraps,
  chunked prefills and block boundaries;
- a decode step compiled with `fullgraph=True` (no graph break possible) and `dynamic=False`, with inductor (the
  backend CUDA graphs run on): compiled == eager tokens, and a second generation of the same shape recompiles
  nothing.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, StaticCache

import hf_yoco
from hf_yoco import BlockTransformerStaticCache, YocoStaticCache, cache_kwarg
from hf_yoco.models.modeling_yoco import YocoRingWindowLayer

pytestmark = pytest.mark.transformers_compat

VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0, initializer_range=0.2)  # fmt: skip
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
MODELS = ["swa", "gret", "block"]


def build(name: str, **overrides):
    torch.manual_seed(0)
    if name == "block":
        config = hf_yoco.BlockTransformerConfig(**{**SIZES, "block_length": 4, "num_prefix_tokens": 2, **overrides})
        return hf_yoco.BlockTransformerForCausalLM(config).eval()
    decoder = {"self_decoder_type": "sliding_window", "sliding_window": 5} if name == "swa" else {
        "self_decoder_type": "gated_retention", "retention_chunk_size": 4}  # fmt: skip
    config = hf_yoco.YocoConfig(**{**SIZES, "num_hidden_layers": 4, **decoder, **overrides})
    return hf_yoco.YocoForCausalLM(config).eval()


def prompts(batch: int = 3, length: int = 9, padded: bool = False):
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :3] = 0
        mask[2, :1] = 0
    return ids, (mask if padded else None)


def assert_same_generation(reference, other, atol: float = 1e-4):
    assert torch.equal(reference.sequences, other.sequences)
    for step, (a, b) in enumerate(zip(reference.scores, other.scores)):
        torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", MODELS)
def test_static_generation_equals_dynamic(name, padded):
    model = build(name)
    ids, mask = prompts(padded=padded)
    kwargs = dict(attention_mask=mask, max_new_tokens=14, disable_compile=True, **GREEDY)  # > window, > 3 blocks
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert type(static.get(hf_yoco.CACHE_NAME)) is (
        BlockTransformerStaticCache if name == "block" else YocoStaticCache
    )
    assert_same_generation(dynamic, static)


@pytest.mark.parametrize("name", ["swa", "gret"])
def test_chunked_prefill_into_a_static_cache(name):
    """Prompts longer than the self-decoder chunk (SWA's floor is 512 tokens) fill the ring / state chunk by chunk."""
    model = build(name, self_decoder_chunk_size=8)
    ids, _ = prompts(batch=2, length=530 if name == "swa" else 21)
    kwargs = dict(max_new_tokens=6, disable_compile=True, **GREEDY)
    assert_same_generation(model.generate(ids, **kwargs), model.generate(ids, cache_implementation="static", **kwargs))


@pytest.mark.parametrize("name", ["swa", "gret"])
def test_transformers_static_cache_matches_the_uncached_forward(name):
    """transformers' own `StaticCache(config=...)`, fed without a mask (how generate calls it): the cross-decoder
    must not see the slot the global K/V update has just advanced to (it once read one zero key too many)."""
    model = build(name)
    ids, _ = prompts(batch=2, length=12)
    full = model(ids, use_cache=False).logits
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        steps = [model(ids[:, :4], **cache_kwarg(cache)).logits]
        steps += [model(ids[:, t : t + 1], **cache_kwarg(cache)).logits for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_ring_window_layout_and_memory():
    model = build("swa")
    ids, _ = prompts(batch=2, length=7)
    cache = YocoStaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(ids, **cache_kwarg(cache))
        for _ in range(4):
            model(ids[:, :1], **cache_kwarg(cache))
    ring = cache.layers[0]
    assert isinstance(ring, YocoRingWindowLayer) and ring.keys.shape[-2] == 5  # W slots, whatever the length
    assert sorted(ring.positions.tolist()) == [6, 7, 8, 9, 10]  # the last W positions, slot = position % W
    assert int(cache.get_seq_length()) == 11
    memory = cache.memory_bytes()
    row = 2 * 2 * model.config.head_dim * 4  # K and V, 2 kv heads, fp32
    assert memory["global_kv"] == 2 * 11 * row and memory["global_kv_reserved"] == 2 * 32 * row
    assert memory["self_decoder"] == 2 * 2 * 5 * row  # 2 layers x batch 2 x W
    assert memory["held"] >= memory["global_kv_reserved"] + memory["self_decoder"]
    with pytest.raises(ValueError, match="ring buffers"):
        cache.crop(-1)


def test_static_caches_refuse_rollback():
    with pytest.raises(ValueError, match="cannot be cropped"):
        BlockTransformerStaticCache(build("block").config, max_cache_len=8).crop(-1)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_decode_equals_eager_without_graph_breaks_or_recompiles(name):
    """transformers' fast path, forced on CPU: the decode step compiled with fullgraph=True (a graph break raises),
    dynamic=False and inductor. Two generations of one shape: the second must not recompile."""
    model = build(name)
    ids, mask = prompts(padded=True)
    kwargs = dict(attention_mask=mask, max_new_tokens=9, **GREEDY)
    eager = model.generate(ids, cache_implementation="static", disable_compile=True, **kwargs)
    config = CompileConfig(fullgraph=True, dynamic=False, backend="inductor", mode="default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    compiled = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
    assert hasattr(model, "_compiled_call"), "generate did not take the compiled path"
    assert_same_generation(eager, compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = model.generate(ids, cache_implementation="static", compile_config=config, **kwargs)
    assert torch.equal(again.sequences, compiled.sequences)
