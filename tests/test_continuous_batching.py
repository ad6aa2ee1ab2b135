"""Continuous batching through transformers' own engine (`generate_batch`, `init_continuous_batching`) for YOCO-SWA,
YOCO-gRet and the Block Transformer (`hf_yoco.continuous_batching` registers the cache allocators they need).

Every request's tokens must equal a per-request greedy `generate()`: with requests of different lengths, arriving
while others decode and finishing at different times, chunked prompts (a small token budget), a cache so small
that requests are evicted and re-run, CPU offloading of the paged cache, `num_return_sequences` forks, and both
attention paths the engine runs on CPU (sdpa and paged eager). Sampling: the engine's log-probabilities of the
sampled tokens are the model's own (`generate`'s) distribution.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

import hf_yoco
from hf_yoco.continuous_batching import (
    BLOCK_KV,
    BLOCK_LOCAL_STATE,
    RETENTION_STATE,
    group_layers,
    num_blocks_within,
    paged_cache_bytes,
)

pytestmark = pytest.mark.transformers_compat

VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             initializer_range=0.2)  # fmt: skip
MODELS = ["swa", "gret", "block"]
LLAMA = LlamaConfig(**SIZES, num_hidden_layers=4)
GREEDY = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=8)


def build(name: str):
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LLAMA).eval()
    if name == "block":
        config = hf_yoco.BlockTransformerConfig(**SIZES, block_length=4, num_prefix_tokens=2)
        return hf_yoco.BlockTransformerForCausalLM(config).eval()
    decoder = {"self_decoder_type": "sliding_window", "sliding_window": 4} if name.startswith("swa") else {
        "self_decoder_type": "gated_retention", "retention_chunk_size": 4}  # fmt: skip
    if name.endswith("-split"):  # 3 self-decoder layers, 2 cross layers
        decoder |= {"num_hidden_layers": 5, "num_self_decoder_layers": 3}
    return hf_yoco.YocoForCausalLM(hf_yoco.YocoConfig(**{"num_hidden_layers": 4, **SIZES, **decoder})).eval()


def prompts(count: int = 7, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(count)]


def greedy(model, prompt: list[int], max_new_tokens: int = 8) -> list[int]:
    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=max_new_tokens)
    return model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()


def batch_tokens(model, inputs, config: ContinuousBatchingConfig, generation_config=GREEDY) -> list[list[int]]:
    results = model.generate_batch(inputs=inputs, generation_config=generation_config,
                                   continuous_batching_config=config, warmup=False)  # fmt: skip
    assert not [r.error for r in results.values() if r.error]
    return [r.generated_tokens for r in results.values()]


def test_layer_groups_give_each_cache_kind_its_allocator():
    assert group_layers(build("swa").config) == {"sliding_attention": [0, 1], "full_attention": [2]}  # no reuse layers
    assert group_layers(build("gret").config) == {RETENTION_STATE: [0, 1], "full_attention": [2]}
    block = build("block").config
    assert group_layers(block) == {BLOCK_KV: list(range(block.num_block_decoder_layers)),
                                   BLOCK_LOCAL_STATE: list(range(block.num_block_decoder_layers, 8))}  # fmt: skip


CONFIGS = {
    "one batch": dict(num_blocks=32, max_batch_tokens=64, page_size=16, max_requests_per_batch=8),
    "chunked prompts": dict(num_blocks=32, max_batch_tokens=7, page_size=4, max_requests_per_batch=2),
}
# A cache that holds the longest request but not all of them at once: (bytes, as the Llama's cache of that many
# blocks; new tokens). Llama needs 3x the memory YOCO does; the Block Transformer's per-request local state is large
# and its block K/V grows so slowly that it needs more memory and longer generations to run out. Sized in bytes:
# what one block costs differs between transformers releases (`num_blocks_within`).
SMALL_CACHE = {"llama": (12, 8), "swa": (4, 8), "gret": (4, 8), "block": (33, 40)}


@pytest.fixture
def evictions(monkeypatch) -> list[int]:
    """Counts the engine's evictions (re-queued or offloaded requests)."""
    from transformers.generation.continuous_batching.offloading_manager import OffloadingManager

    count = [0]
    engine_offload = OffloadingManager.offload_requests

    def offload_requests(self):
        offloaded = engine_offload(self)
        count[0] += int(offloaded)
        return offloaded

    monkeypatch.setattr(OffloadingManager, "offload_requests", offload_requests)
    return count


@pytest.mark.parametrize("setting", list(CONFIGS))
@pytest.mark.parametrize("name", ["llama", *MODELS, "swa-split", "gret-split"])
def test_generate_batch_equals_per_request_greedy(name, setting):
    model = build(name)
    inputs = prompts()
    expected = [greedy(model, p) for p in inputs]
    assert batch_tokens(model, inputs, ContinuousBatchingConfig(**CONFIGS[setting])) == expected


@pytest.mark.parametrize("offload_gib", [0.0, 0.01], ids=["re-run", "cpu-offload"])
@pytest.mark.parametrize("name", ["llama", *MODELS])
def test_evicted_requests_still_equal_greedy(name, offload_gib, evictions, monkeypatch):
    """A cache too small for every request at once: the engine evicts requests, re-running them from scratch
    (default) or moving their blocks, state slots included, to CPU memory and back (`cpu_offload_space`; the engine
    pins that memory, which needs CUDA: here it is ordinary memory, the copies are the same)."""
    if offload_gib and not torch.cuda.is_available():
        engine_empty = torch.empty
        monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: engine_empty(*a, **k))
    model = build(name)
    inputs = prompts()
    llama_blocks, new_tokens = SMALL_CACHE[name]
    expected = [greedy(model, p, new_tokens) for p in inputs]
    config = ContinuousBatchingConfig(num_blocks=llama_blocks, max_batch_tokens=16, page_size=4,
                                      max_requests_per_batch=4, cpu_offload_space=offload_gib)  # fmt: skip
    budget = paged_cache_bytes(LLAMA, config)
    config.num_blocks = num_blocks_within(model.config, budget, config)
    assert paged_cache_bytes(model.config, config) <= budget
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=new_tokens)
    assert batch_tokens(model, inputs, config, generation) == expected
    assert evictions[0] > 0


@pytest.mark.parametrize("name", MODELS)
def test_paged_eager_attention_equals_greedy(name):
    model = build(name)
    inputs = prompts(4, seed=1)
    expected = [greedy(model, p) for p in inputs]
    model.set_attn_implementation("eager")  # the engine runs it as "paged|eager"
    assert batch_tokens(model, inputs, ContinuousBatchingConfig(**CONFIGS["chunked prompts"])) == expected


@pytest.mark.parametrize("name", MODELS)
def test_staggered_requests(name):
    """Requests added while others are decoding, each with its own length: all equal their greedy generation."""
    model = build(name)
    inputs, lengths = prompts(6, seed=2), [3, 12, 5, 9, 1, 7]
    expected = [greedy(model, p, n) for p, n in zip(inputs, lengths)]
    config = ContinuousBatchingConfig(num_blocks=32, max_batch_tokens=8, page_size=4, max_requests_per_batch=3)
    manager = model.init_continuous_batching(generation_config=GREEDY, continuous_batching_config=config)
    manager.start()
    try:
        ids = []
        for prompt, new_tokens in zip(inputs, lengths):
            ids.append(manager.add_request(prompt, max_new_tokens=new_tokens))
            time.sleep(0.02)  # the next request arrives while the engine is busy with the previous ones
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=60)
            assert result is not None, "the engine stopped before every request finished"
            if result.is_finished():
                results[result.request_id] = result
    finally:
        manager.stop(block=True)
    assert [results[i].generated_tokens for i in ids] == expected
    assert not [r.error for r in results.values() if r.error]


@pytest.mark.parametrize("name", MODELS)
def test_forked_requests(name):
    """`num_return_sequences`: the engine forks a request after its prompt, copying its blocks (and state slots);
    sampling with top_k=1 (greedy, which transformers allows with several return sequences only when sampling)."""
    model = build(name)
    inputs = prompts(2, seed=4)
    config = GenerationConfig(do_sample=True, top_k=1, eos_token_id=-1, pad_token_id=0, max_new_tokens=6,
                              num_return_sequences=3)  # fmt: skip
    tokens = batch_tokens(model, inputs, ContinuousBatchingConfig(**CONFIGS["one batch"]), config)
    expected = [greedy(model, p, 6) for p in inputs for _ in range(3)]
    assert sorted(tokens) == sorted(expected)


@pytest.mark.parametrize("name", MODELS)
def test_sampling_follows_the_models_distribution(name):
    """Sampled tokens come with the engine's log-probabilities; each equals the model's own log-softmax at that
    position (recomputed without a cache), and a fixed engine seed reproduces the samples."""
    model = build(name)
    inputs = prompts(3, seed=5)
    sampling = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=-1, pad_token_id=0,
                                max_new_tokens=6)  # fmt: skip
    config = ContinuousBatchingConfig(**CONFIGS["one batch"], return_logprobs=True, seed=7)
    runs = [model.generate_batch(inputs=inputs, generation_config=sampling, continuous_batching_config=config,
                                 warmup=False) for _ in range(2)]  # fmt: skip
    first, second = ([r.generated_tokens for r in run.values()] for run in runs)
    assert first == second
    for prompt, result in zip(inputs, runs[0].values()):
        sequence = torch.tensor([prompt + result.generated_tokens])
        with torch.no_grad():
            logits = model(sequence, use_cache=False).logits[0, len(prompt) - 1 : -1].float()
        expected = logits.log_softmax(-1).gather(1, torch.tensor(result.generated_tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=0)


def test_attention_sinks_are_refused_not_ignored():
    config = hf_yoco.YocoConfig(**SIZES, num_hidden_layers=4, self_decoder_type="sliding_window", sliding_window=4,
                                attention_sink_tokens=2)  # fmt: skip
    model = hf_yoco.YocoForCausalLM(config).eval()
    results = model.generate_batch(inputs=prompts(2), generation_config=GREEDY, warmup=False,
                                   continuous_batching_config=ContinuousBatchingConfig(**CONFIGS[next(iter(CONFIGS))]))  # fmt: skip
    errors = [r.error for r in results.values()]
    assert len(errors) == 2 and all("continuous batching does not keep attention sinks" in str(e) for e in errors)
