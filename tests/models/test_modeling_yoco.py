"""YOCO model tests: parity (cached vs uncached, chunked vs one-shot, padded vs unpadded), generate() modes, save/load.

Tolerances: fp32 everywhere; logits compared with atol 1e-5 (observed differences are ~1e-7).
"""

import copy
import math

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM, TextStreamer
from transformers.cache_utils import LinearAttentionLayer

from hf_yoco import YocoCache, YocoConfig, YocoForCausalLM, YocoModel, cache_kwarg, output_cache
from hf_yoco.models.modeling_common import RotaryEmbedding, apply_rotary
from hf_yoco.models.modeling_yoco import (
    chunk_gated_retention,
    parallel_gated_retention,
    recurrent_gated_retention,
)

pytestmark = pytest.mark.transformers_compat

ATOL = 1e-5
SELF_DECODERS = ["gated_retention", "sliding_window"]
WINDOW = 5


def tiny_config(self_decoder_type: str, **overrides) -> YocoConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        self_decoder_type=self_decoder_type,
        retention_chunk_size=4,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    if self_decoder_type == "sliding_window":
        kwargs["sliding_window"] = WINDOW
    kwargs.update(overrides)
    return YocoConfig(**kwargs)


def tiny_model(self_decoder_type: str, **overrides) -> YocoForCausalLM:
    torch.manual_seed(0)
    return YocoForCausalLM(tiny_config(self_decoder_type, **overrides)).eval()


def greedy(model, input_ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    return model.generate(input_ids, do_sample=False, disable_compile=True, **kwargs)


@pytest.fixture(params=SELF_DECODERS)
def self_decoder_type(request):
    return request.param


# ---------------------------------------------------------------------------------------------- gated retention forms


def _retention_inputs(batch=2, length=11, heads=3, key_dim=4, value_dim=5):
    q = torch.randn(batch, length, heads, key_dim)
    k = torch.randn(batch, length, heads, key_dim) * key_dim**-0.5
    v = torch.randn(batch, length, heads, value_dim)
    g = torch.nn.functional.logsigmoid(torch.randn(batch, length, heads)) / 4
    state = torch.randn(batch, heads, key_dim, value_dim)
    return q, k, v, g, state


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11, 16])
def test_gated_retention_forms_agree(chunk_size):
    q, k, v, g, state = _retention_inputs()
    for initial_state in (None, state):
        ref, ref_state = recurrent_gated_retention(q, k, v, g, initial_state, output_final_state=True)
        par, par_state = parallel_gated_retention(q, k, v, g, initial_state, output_final_state=True)
        chk, chk_state = chunk_gated_retention(q, k, v, g, chunk_size, initial_state, output_final_state=True)
        torch.testing.assert_close(par, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chk, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(par_state, ref_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chk_state, ref_state, atol=1e-5, rtol=1e-5)


def test_gated_retention_matches_explicit_formula():
    """o_t = sum_{s<=t} prod_{i=s+1..t} gamma_i (q_t . k_s) v_s (paper Eq. 5; the key's own decay is not applied)."""
    q, k, v, g, _ = _retention_inputs(batch=1, length=6, heads=1)
    out, _ = chunk_gated_retention(q, k, v, g, chunk_size=4)
    gamma = g[0, :, 0].exp()
    for t in range(6):
        expected = sum(
            math.prod(gamma[s + 1 : t + 1].tolist()) * (q[0, t, 0] @ k[0, s, 0]) * v[0, s, 0] for s in range(t + 1)
        )
        torch.testing.assert_close(out[0, t, 0], expected, atol=1e-5, rtol=1e-5)


def test_gated_retention_chunked_state_carry():
    q, k, v, g, _ = _retention_inputs(length=13)
    full, full_state = chunk_gated_retention(q, k, v, g, 4, output_final_state=True)
    first, state = chunk_gated_retention(q[:, :6], k[:, :6], v[:, :6], g[:, :6], 4, output_final_state=True)
    second, state = chunk_gated_retention(q[:, 6:], k[:, 6:], v[:, 6:], g[:, 6:], 4, state, output_final_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, full_state, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- forward parity


def _incremental_logits(model, input_ids, prefill: int, cache=None):
    out = model(input_ids[:, :prefill], cache=cache, use_cache=True)
    cache, logits = output_cache(out), [out.logits]
    for t in range(prefill, input_ids.shape[1]):
        out = model(input_ids[:, t : t + 1], cache=cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def test_full_forward_equals_prefill_plus_decode(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 17))  # longer than the window (5) and several retention chunks (4)
    full = model(input_ids, use_cache=False).logits
    for prefill in (1, 3, 9):
        incremental, cache = _incremental_logits(model, input_ids, prefill)
        assert isinstance(cache, YocoCache)
        torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layers, split", [(5, 3), (4, 1), (4, 3)])
def test_uneven_split_cached_chunked_padded_and_static_equal_the_full_forward(self_decoder_type, layers, split):
    """Any `num_self_decoder_layers`: incremental decoding, chunked prefill, a left-padded batch and the static cache
    all give the logits / tokens of the plain forward."""
    model = tiny_model(self_decoder_type, num_hidden_layers=layers, num_self_decoder_layers=split)
    assert sum(layer.is_cross_layer for layer in model.model.layers) == layers - split
    input_ids = torch.randint(1, 64, (2, 13))
    full = model(input_ids, use_cache=False).logits
    incremental, cache = _incremental_logits(model, input_ids, 4)
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)
    assert cache.global_kv_layer_idx == split and cache.global_key_values[0].shape[2] == 13
    assert cache.get_seq_length() == 13
    model.config.self_decoder_chunk_size = 3
    torch.testing.assert_close(model(input_ids, use_cache=True).logits, full, atol=ATOL, rtol=0)
    rows = [input_ids[0, :9], input_ids[1]]
    padded, mask = _left_pad(rows)
    batch = greedy(model, padded, attention_mask=mask)
    for row, out in zip(rows, batch):
        alone = greedy(model, row[None])[0]
        assert torch.equal(out[-alone.shape[0] :], alone)
    assert torch.equal(greedy(model, input_ids, cache_implementation="static"), greedy(model, input_ids))


def test_plain_dynamic_and_static_caches_work(self_decoder_type):
    """`DynamicCache(config=...)` built by transformers from layer_types/kv_sharing_modes drives the model too."""
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 12))
    full = model(input_ids, use_cache=False).logits
    incremental, cache = _incremental_logits(model, input_ids, 4, cache=DynamicCache(config=model.config))
    torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)
    assert int(cache.get_seq_length()) == 12  # transformers >= 5.25 counts a linear first layer by its own counter
    reference = greedy(model, input_ids)
    assert torch.equal(greedy(model, input_ids, cache_implementation="static"), reference)


def test_auto_prefill_chunk_follows_the_device(monkeypatch):
    """ "auto": 2048 tokens on CPU; on a GPU the biggest multiple of 2048 whose MLP activations fit a quarter of the
    free memory (simulated: an 80 GiB device, batch 2, intermediate 64, fp32)."""
    model = tiny_model("gated_retention").model
    assert model.config.self_decoder_chunk_size == "auto"
    assert model._prefill_chunk_size(torch.zeros(2, 10_000), 10_000) == 2048

    class CudaTensor:  # what `_prefill_chunk_size` reads of a CUDA tensor
        is_cuda, shape, device = True, (2, 10_000_000), "cuda:0"

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 2**30, 80 * 2**30))
    per_token = 2 * model.config.intermediate_size * 4 * 4
    expected = 80 * 2**30 // 4 // per_token // 2048 * 2048
    assert model._prefill_chunk_size(CudaTensor(), 10_000_000) == expected > 2048
    swa = tiny_model("sliding_window").model  # the PyTorch window path caps it: about one window per chunk
    assert swa._prefill_chunk_size(torch.zeros(2, 10_000), 10_000) == 512


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_prefill_equals_one_shot(self_decoder_type, chunk):
    model = tiny_model(self_decoder_type)
    chunked = tiny_model(self_decoder_type, self_decoder_chunk_size=chunk)
    input_ids = torch.randint(1, 64, (2, 19))
    mask = torch.ones_like(input_ids)
    mask[0, :5] = 0  # left padding goes through the chunks too
    for kwargs in (dict(use_cache=False), dict(use_cache=True), dict(attention_mask=mask, use_cache=True)):
        one_shot = model(input_ids, **kwargs)
        in_chunks = chunked(input_ids, **kwargs)
        torch.testing.assert_close(in_chunks.logits, one_shot.logits, atol=ATOL, rtol=0)
    # The cache left behind continues identically.
    cache_a, cache_b = output_cache(one_shot), output_cache(in_chunks)
    next_ids = torch.randint(1, 64, (2, 1))
    mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    a = model(next_ids, attention_mask=mask, cache=cache_a).logits
    b = chunked(next_ids, attention_mask=mask, cache=cache_b).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_logits_to_keep_runs_cross_decoder_on_kept_positions(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 10))
    full = model(input_ids).logits
    seen = []
    hook = model.model.layers[-1].register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    try:
        for keep in (1, 3):
            logits = model(input_ids, logits_to_keep=keep).logits
            torch.testing.assert_close(logits, full[:, -keep:], atol=ATOL, rtol=0)
        model(input_ids, logits_to_keep=0)
        model(input_ids, labels=input_ids)  # labels need every position
        model(input_ids, logits_to_keep=1, output_hidden_states=True)
    finally:
        hook.remove()
    assert seen == [1, 3, 10, 10, 10]
    index_logits = model(input_ids, logits_to_keep=torch.tensor([2, 5])).logits
    torch.testing.assert_close(index_logits, full[:, [2, 5]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_cross_decoder_forward_from_self_decoder_states_equals_the_full_forward(self_decoder_type, implementation):
    """The cross-decoder alone, on the self-decoder's output captured once, gives the full forward's logits at any
    chosen positions (in any order, repeated), and its gradients reach the global K/V and the cross layers only."""
    sinks = {"attention_sink_tokens": 2} if self_decoder_type == "sliding_window" else {}
    model = tiny_model(self_decoder_type, num_hidden_layers=5, num_self_decoder_layers=3, **sinks)
    model.config._attn_implementation = implementation
    input_ids = torch.randint(1, 64, (2, 19))
    full = model(input_ids).logits
    states = []
    hook = model.model.global_kv.register_forward_pre_hook(lambda module, args: states.append(args[0]))
    try:
        model(input_ids)
    finally:
        hook.remove()
    positions = torch.tensor([[0, 7, 18, 7], [18, 3, 11, 12]])
    logits = model.lm_head(model.model.cross_decoder_forward(states[0].detach(), positions))
    torch.testing.assert_close(logits, full.gather(1, positions[..., None].expand(-1, -1, 64)), atol=ATOL, rtol=0)

    logits.sum().backward()
    reached = {name.split(".")[1] + ("" if "layers" not in name else f".{name.split('.')[2]}")
               for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}  # fmt: skip
    assert "global_kv" in reached and {"layers.3", "layers.4"} <= reached
    assert not reached & {"layers.0", "layers.1", "layers.2"}
    with pytest.raises(ValueError, match=r"query_indices must lie in \[0, 19\)"):
        model.model.cross_decoder_forward(states[0], torch.tensor([[19], [0]]))
    with pytest.raises(ValueError, match=r"query_indices must be \[batch=2, Q\]"):
        model.model.cross_decoder_forward(states[0], torch.tensor([3]))
    # a subset of the positions: the cross-decoder sees only those keys, at their own positions (RoPE included)
    keep = torch.cat([torch.arange(13), torch.tensor([15, 18])]).expand(2, -1)  # [2, 15]: 13, 14, 16, 17 left out
    subset = states[0].detach()[:, keep[0]]
    got = model.lm_head(model.model.cross_decoder_forward(subset, torch.tensor([[12, 14]] * 2), positions=keep))
    torch.testing.assert_close(got[:, 0], full[:, 12], atol=ATOL, rtol=0)  # every key up to 12 is there
    assert not torch.allclose(got[:, 1], full[:, 18], atol=1e-3)  # position 18 misses four keys
    with pytest.raises(ValueError, match=r"positions must be \[batch=2, T=15\]"):
        model.model.cross_decoder_forward(subset, torch.tensor([[0], [0]]), positions=keep[:, :3])
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation 'eager' or 'sdpa'"):
        model.model.cross_decoder_forward(states[0], positions)


def _left_pad(rows, pad_id=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def test_left_padded_batch_equals_rows_alone(self_decoder_type):
    model = tiny_model(self_decoder_type)
    rows = [torch.randint(1, 64, (n,)) for n in (4, 13, 9)]
    ids, mask = _left_pad(rows)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batch_logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(batch_logits[i, -len(row) :], alone, atol=ATOL, rtol=0)
    batch_generated = greedy(model, ids, attention_mask=mask)[:, ids.shape[1] :]
    for i, row in enumerate(rows):
        assert torch.equal(batch_generated[i], greedy(model, row[None])[0, len(row) :])


def test_left_padding_never_reaches_the_retention_state():
    model = tiny_model("gated_retention")
    row = torch.randint(1, 64, (6,))
    ids, mask = _left_pad([row, torch.randint(1, 64, (10,))])
    ids[0, :4] = torch.randint(1, 64, (4,))  # junk under the padding mask
    cache = output_cache(model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)))
    alone = output_cache(model(row[None]))
    for layer_idx in range(2):
        torch.testing.assert_close(
            cache.layers[layer_idx].recurrent_states[0][0],
            alone.layers[layer_idx].recurrent_states[0][0],
            atol=ATOL,
            rtol=0,
        )


def _packed(lengths, batch=1, vocab=64):
    """`batch` rows, each packing sequences of `lengths`: (ids [B, N], position_ids [B, N], the sequences per row)."""
    rows = [[torch.randint(1, vocab, (1, n)) for n in lengths] for _ in range(batch)]
    ids = torch.cat([torch.cat(row, 1) for row in rows])
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].expand(batch, -1)
    return ids, position_ids, rows


@pytest.mark.parametrize("chunk", [None, 4])
def test_packed_sequences_equal_each_sequence_alone(self_decoder_type, chunk):
    """Padding-free batches: position_ids restarting inside a row isolate the sequences (window, retention state,
    global K/V), in training and in eval (which then skips chunked prefill); gradients match too."""
    model = tiny_model(self_decoder_type, self_decoder_chunk_size=chunk)
    ids, position_ids, rows = _packed([5, 9, 1, 7], batch=2)  # 9 > retention chunk 4, > window 5
    for training in (False, True):
        model.train(training)
        model.zero_grad()
        packed = model(ids, position_ids=position_ids).logits
        assert model(ids, position_ids=position_ids[:1]).logits.allclose(packed, atol=ATOL)  # [1, N] broadcast
        weights = torch.randn_like(packed)
        (packed * weights).sum().backward()
        packed_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        alone = torch.cat([torch.cat([model(seq).logits for seq in row], 1) for row in rows])
        torch.testing.assert_close(packed, alone, atol=ATOL, rtol=0)
        (alone * weights).sum().backward()
        for packed_grad, param in zip(packed_grads, model.parameters(), strict=True):
            torch.testing.assert_close(packed_grad, param.grad, atol=ATOL, rtol=1e-4)


def test_data_collator_with_flattening_loss(self_decoder_type):
    """transformers' `DataCollatorWithFlattening` (padding-free training): same loss as the sequences padded."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model(self_decoder_type).train()
    sequences = [torch.randint(1, 64, (n,)).tolist() for n in (6, 3, 8)]
    batch = DataCollatorWithFlattening()([{"input_ids": seq} for seq in sequences])
    packed_loss = model(**batch).loss
    total, count = 0.0, 0
    for seq in sequences:  # per-token cross-entropy of every sequence alone, averaged over all predicted tokens
        ids = torch.tensor([seq])
        logits = model(ids).logits[0, :-1]
        total = total + torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
        count += len(seq) - 1
    torch.testing.assert_close(packed_loss, total / count, atol=ATOL, rtol=1e-5)


def test_packed_sequences_refuse_a_cache_and_flash_attention():
    model = tiny_model("gated_retention")
    ids, position_ids, _ = _packed([3, 4])
    with pytest.raises(ValueError, match="Packed sequences.*cache"):
        model(ids, position_ids=position_ids, cache=YocoCache(config=model.config))
    assert output_cache(model(ids, position_ids=position_ids, use_cache=True)) is None
    model.config._attn_implementation = "flash_attention_2"  # no block-diagonal mask there: refused, not mixed
    with pytest.raises(ValueError, match="Packed sequences need `attn_implementation`"):
        model(ids, position_ids=position_ids)


# ---------------------------------------------------------------------------------------------- YOCO semantics


def test_sliding_window_semantics():
    """Each SWA layer sees W keys, the current one included: a token at distance >= W does not reach a layer's
    output, one at distance W-1 does; the self-decoder's receptive field is (W-1) * L/2 + 1 tokens."""
    model = tiny_model("sliding_window")
    input_ids = torch.randint(1, 64, (1, 16))
    last = input_ids.shape[1] - 1

    def hidden(ids, layer):  # output of self-decoder layer `layer` (hidden_states[0] are the embeddings)
        return model.model(ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1][0, last]

    def change(distance):
        ids = input_ids.clone()
        ids[0, last - distance] = ids[0, last - distance] % 63 + 1
        return ids

    torch.testing.assert_close(hidden(change(WINDOW), 0), hidden(input_ids, 0), atol=0, rtol=0)
    assert (hidden(change(WINDOW - 1), 0) - hidden(input_ids, 0)).abs().max() > 1e-4
    receptive_field = (WINDOW - 1) * 2 + 1
    torch.testing.assert_close(hidden(change(receptive_field), 1), hidden(input_ids, 1), atol=0, rtol=0)
    assert (hidden(change(receptive_field - 1), 1) - hidden(input_ids, 1)).abs().max() > 1e-4
    # ... while the global K/V carries any earlier token to the final logits.
    far = change(last)
    assert (model(far).logits[0, last] - model(input_ids).logits[0, last]).abs().max() > 1e-4


def test_token_before_the_window_changes_final_logits_through_the_global_kv(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (1, 16))
    changed = input_ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % 63 + 1
    # Break the self-decoder path entirely: only the global K/V can carry token 0 to the last position.
    if self_decoder_type == "gated_retention":
        for layer in model.model.layers[:2]:
            torch.nn.init.constant_(layer.self_attn.gt_proj.weight, 0.0)
            layer.self_attn.gate_logit_normalizer = 1e-3  # decay ~ 0: the state forgets everything at once
    logits, changed_logits = model(input_ids).logits[0, -1], model(changed).logits[0, -1]
    assert (logits - changed_logits).abs().max() > 1e-4


def test_cache_memory_global_kv_grows_self_decoder_state_constant(self_decoder_type):
    model = tiny_model(self_decoder_type)
    config = model.config
    cache = output_cache(model(torch.randint(1, 64, (2, 8))))
    sizes = [cache.memory_bytes()]
    for _ in range(6):
        cache = output_cache(model(torch.randint(1, 64, (2, 1)), cache=cache))
        sizes.append(cache.memory_bytes())
    row = 2 * 2 * config.num_key_value_heads * config.head_dim * 4  # K and V, batch 2, fp32
    assert [b["global_kv"] for b in sizes] == [(8 + i) * row for i in range(7)]
    assert len({b["self_decoder"] for b in sizes}) == 1  # constant-size windows / recurrent states
    if self_decoder_type == "sliding_window":
        assert sizes[0]["self_decoder"] == 2 * 2 * 2 * (WINDOW - 1) * config.num_key_value_heads * config.head_dim * 4
    else:
        heads, dim = config.num_attention_heads, config.retention_head_dim
        assert sizes[0]["self_decoder"] == 2 * 2 * heads * dim * dim * 4
    assert sizes[0]["total"] == sizes[0]["global_kv"] + sizes[0]["self_decoder"]


@torch.no_grad()
def test_memory_bytes_reports_what_the_cache_really_holds(self_decoder_type):
    """`held` equals the bytes of the distinct storages reachable from the cache (walked here independently), and a
    chunked prefill leaves no chunk-sized storage behind the sliding windows (compacted to W - 1 rows)."""
    model = tiny_model(self_decoder_type, self_decoder_chunk_size=7)
    cache = output_cache(model(torch.randint(1, 64, (2, 40))))
    check_held(cache, self_decoder_type)  # right after the chunked prefill
    for _ in range(3):
        cache = output_cache(model(torch.randint(1, 64, (2, 1)), cache=cache))
    check_held(cache, self_decoder_type)


def check_held(cache, self_decoder_type: str) -> None:
    storages = {}
    for layer in cache.layers:
        tensors = [getattr(layer, name, None) for name in ("keys", "values", "_key_buffer", "_value_buffer")]
        tensors += list(getattr(layer, "recurrent_states", {}).values()) + list(
            getattr(layer, "conv_states", {}).values()
        )
        tensors += [getattr(layer, "_sliding_window_tensor", None), getattr(layer, "cumulative_length_linear", None)]
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    report = cache.memory_bytes()
    assert report["held"] == sum(storages.values())
    window_storage = report["held"] - report["global_kv_reserved"]
    # at most one spare row per window (a decode step), plus the windows' length scalars
    one_row = 2 * cache.layers[0].keys[0, :, 0].numel() * 4 if self_decoder_type == "sliding_window" else 0
    assert report["self_decoder"] <= window_storage <= report["self_decoder"] + 2 * (one_row + 8) * 2


@torch.no_grad()
def test_cache_batch_methods(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 9))
    cache = output_cache(model(input_ids))
    repeated = copy.deepcopy(cache)
    repeated.batch_repeat_interleave(2)
    assert repeated.global_key_values[0].shape[0] == 4
    selected = copy.deepcopy(repeated)
    selected.batch_select_indices(torch.tensor([1, 2]))
    reordered = copy.deepcopy(cache)
    reordered.reorder_cache(torch.tensor([1, 0]))
    step = torch.randint(1, 64, (2, 1))
    base = model(step, cache=copy.deepcopy(cache)).logits
    torch.testing.assert_close(model(step.repeat_interleave(2, 0), cache=repeated).logits[::2], base)
    torch.testing.assert_close(model(step[[0, 1]], cache=selected).logits, base)  # rows 1,2 = seq 0,1
    torch.testing.assert_close(model(step.flip(0), cache=reordered).logits, base.flip(0))
    cache.reset()
    assert cache.get_seq_length() == 0


# ---------------------------------------------------------------------------------------------- generate()


def test_generate_cache_equals_no_cache(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 11))
    assert torch.equal(greedy(model, input_ids), greedy(model, input_ids, use_cache=False))
    beam = dict(num_beams=3, num_return_sequences=2, max_new_tokens=5)
    with_cache = greedy(model, input_ids, **beam)
    assert with_cache.shape == (4, 16)
    assert torch.equal(with_cache, greedy(model, input_ids, use_cache=False, **beam))


def test_generate_builds_yoco_cache_and_accepts_a_user_cache(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (1, 7))
    out = greedy(model, input_ids, return_dict_in_generate=True)
    assert isinstance(output_cache(out), YocoCache)
    user_cache = YocoCache(config=model.config)
    again = greedy(model, input_ids, **cache_kwarg(user_cache), return_dict_in_generate=True)
    assert output_cache(again) is user_cache and torch.equal(again.sequences, out.sequences)
    assert user_cache.get_seq_length() == 7 + 6 - 1


def test_generate_sampling_inputs_embeds_and_continuation(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 10))
    sampled = model.generate(
        input_ids, do_sample=True, temperature=0.8, top_k=10, top_p=0.9, max_new_tokens=4, num_return_sequences=3
    )
    assert sampled.shape == (6, 14)
    reference = greedy(model, input_ids, max_new_tokens=4)
    embeds = model.get_input_embeddings()(input_ids)
    assert torch.equal(greedy(model, None, inputs_embeds=embeds, max_new_tokens=4), reference[:, 10:])
    first = greedy(model, input_ids, max_new_tokens=3, return_dict_in_generate=True)
    continued = greedy(
        model,
        first.sequences,
        attention_mask=torch.ones_like(first.sequences),
        **cache_kwarg(output_cache(first)),
        max_new_tokens=1,
    )
    assert torch.equal(continued, reference)


def char_tokenizer():
    """A 64-token character tokenizer (offline): <pad> <s> </s> a-z A-Z 0-8."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits[:9]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_generate_stops_on_eos_and_stop_strings_and_streams(self_decoder_type, capsys):
    tokenizer = char_tokenizer()
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(4, 64, (1, 6))
    free = greedy(model, input_ids, max_new_tokens=8)[0, 6:].tolist()
    stop_token = free[2]
    expected = free[: free.index(stop_token) + 1]
    assert greedy(model, input_ids, max_new_tokens=8, eos_token_id=stop_token)[0, 6:].tolist() == expected
    stop_string = tokenizer.decode([stop_token])
    by_string = greedy(model, input_ids, max_new_tokens=8, stop_strings=[stop_string], tokenizer=tokenizer)
    assert by_string[0, 6:].tolist() == expected
    greedy(model, input_ids, max_new_tokens=3, streamer=TextStreamer(tokenizer))
    assert tokenizer.decode(free[:3]) in capsys.readouterr().out

    from transformers import pipeline

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("abcXyz", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("abcXyz") and len(text) == 10


# ---------------------------------------------------------------------------------------------- training contract


def test_loss_matches_manual_cross_entropy_and_num_items_in_batch(self_decoder_type):
    model = tiny_model(self_decoder_type)
    input_ids = torch.randint(1, 64, (2, 9))
    labels = input_ids.clone()
    labels[0, :3] = -100
    out = model(input_ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 64)
    targets = labels[:, 1:].reshape(-1)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100))
    summed = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model(input_ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss, summed / 40)


def test_gradient_checkpointing_same_loss_and_gradients(self_decoder_type):
    model = tiny_model(self_decoder_type).train()
    input_ids = torch.randint(1, 64, (2, 13))
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    loss_gc = model(input_ids, labels=input_ids).loss
    loss_gc.backward()
    torch.testing.assert_close(loss_gc, loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "embed" in n or "global_kv" in n)


def test_save_and_auto_reload_identical(tmp_path, self_decoder_type):
    model = tiny_model(self_decoder_type, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is YocoForCausalLM
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    input_ids = torch.randint(1, 64, (2, 11))
    torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
    assert type(AutoModel.from_pretrained(tmp_path)) is YocoModel


def test_class_from_pretrained_takes_loading_arguments(tmp_path, self_decoder_type):
    """`YocoForCausalLM.from_pretrained(path, dtype=...)` (what `transformers serve --dtype auto` calls): loading
    arguments are not config overrides."""
    tiny_model(self_decoder_type).save_pretrained(tmp_path)
    assert YocoForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.float32
    model = YocoForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"


def test_meta_device_init_equals_normal_init(self_decoder_type):
    config = tiny_config(self_decoder_type)
    model = YocoForCausalLM.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    assert not on_meta
    with torch.device("meta"):
        meta_model = YocoForCausalLM(copy.deepcopy(config))
    meta_model.to_empty(device="cpu")
    meta_model.init_weights()
    reference = YocoForCausalLM(copy.deepcopy(config))
    for (name, a), (_, b) in zip(sorted(reference.named_buffers()), sorted(meta_model.named_buffers())):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(sorted(reference.named_parameters()), sorted(meta_model.named_parameters())):
        assert a.shape == b.shape and torch.isfinite(b).all(), name
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            assert torch.equal(b, torch.ones_like(b)), name


def test_structure_names_and_single_global_kv():
    model = tiny_model("gated_retention")
    names = {n for n, _ in model.named_parameters()}
    assert "model.global_kv.k_proj.weight" in names and "model.global_kv.v_proj.weight" in names
    assert "model.layers.2.cross_attn.q_proj.weight" in names and "model.layers.2.cross_attn.o_proj.weight" in names
    assert not any(n.startswith("model.layers.2.cross_attn.k_proj") for n in names)  # no per-layer cross K/V
    assert {"gate_proj", "up_proj", "down_proj"} <= {n.split(".")[-2] for n in names}
    assert isinstance(YocoCache(config=model.config).layers[0], LinearAttentionLayer)


# ---------------------------------------------------------------------------------------------- bf16 numerics


def _relative_error(low: torch.Tensor, reference: torch.Tensor) -> float:
    return ((low.float() - reference.float()).norm() / reference.float().norm()).item()


def _bf16_error(config) -> float:
    """Relative error of bf16 logits against fp32 logits of the same (bf16-rounded) weights: the compute error."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)
    reference = copy.deepcopy(model).float()
    input_ids = torch.randint(1, config.vocab_size, (2, 256))
    with torch.no_grad():
        return _relative_error(model(input_ids).logits, reference(input_ids).logits)


def test_bf16_logits_stay_close_to_fp32_on_the_same_weights():
    """Measured (CPU, these sizes): Llama 0.0057, YOCO-SWA 0.006, YOCO-gRet 0.012. Gated retention is linear in
    q . k, with no softmax to damp a perturbation: at random init a 12-layer fp32 YOCO-gRet moves its logits 9x more
    than a Llama under the same 2**-9 input noise, so its bf16 error is larger by construction, not from a lost cast
    (computing the whole retention layer in fp32 inside a bf16 12-layer model only takes 0.055 to 0.039). Bounds:
    gRet <= 0.025 and <= 3x the Llama's; SWA <= 1.5x."""
    sizes = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip
    llama = _bf16_error(LlamaConfig(**sizes))
    retention = _bf16_error(YocoConfig(**sizes, self_decoder_type="gated_retention"))
    window = _bf16_error(YocoConfig(**sizes, self_decoder_type="sliding_window", sliding_window=64))
    assert retention <= 0.025 and retention <= 3 * llama, (retention, llama)
    assert window <= 1.5 * llama, (window, llama)


def test_bf16_decode_keeps_the_retention_state_in_fp32():
    config = tiny_config("gated_retention", hidden_size=64, vocab_size=128)
    torch.manual_seed(0)
    model = YocoForCausalLM(config).eval().to(torch.bfloat16)
    input_ids = torch.randint(1, 128, (2, 40))
    with torch.no_grad():
        full = model(input_ids).logits
        incremental, cache = _incremental_logits(model, input_ids, prefill=20)
    assert all(layer.recurrent_states[0].dtype == torch.float32 for layer in cache.layers[:2])
    assert _relative_error(incremental, full) < 0.01  # measured 0.0017


def test_rotary_frequencies_stay_fp32_when_the_model_is_cast():
    """`model.to(torch.bfloat16)` casts buffers; bf16 frequencies would turn position 10000 by a wrong angle."""
    config = tiny_config("gated_retention")
    model = YocoForCausalLM(config).to(torch.bfloat16)
    for name, buffer in model.named_buffers():
        assert buffer.dtype == torch.float32, name
    rotary = model.model.rotary_emb
    positions = torch.tensor([[10_000, 123_456]])
    cos, sin = rotary(torch.zeros(1, dtype=torch.bfloat16), positions)
    exact = positions[..., None].double() * rotary.reset_inv_freq().double()  # [1, 2, R/2]
    torch.testing.assert_close(cos[..., : exact.shape[-1]].double(), exact.cos(), atol=2**-8, rtol=0)
    torch.testing.assert_close(sin[..., : exact.shape[-1]].double(), exact.sin(), atol=2**-8, rtol=0)
    assert model.float().model.rotary_emb.inv_freq.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- official numerics


def test_official_numerics_switch():
    config = tiny_config("sliding_window", official_numerics=True, rope_theta=10000.0)
    torch.manual_seed(0)
    model = YocoForCausalLM(config).eval()
    ids = torch.randint(1, 64, (1, 5))
    plain = torch.nn.functional.embedding(ids, model.model.embed_tokens.weight)
    torch.testing.assert_close(model.model.embed_tokens(ids), plain * math.sqrt(32))
    # theta ** -linspace(0, 1, d/2): the last frequency is exactly 1/theta.
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.inv_freq, 1.0 / 10000.0 ** torch.linspace(0, 1, config.head_dim // 2))
    # Interleaved pairs: (x[2i], x[2i+1]) rotate together by position * inv_freq[i].
    x = torch.randn(1, 1, 3, config.head_dim)
    cos, sin = rotary(x, torch.arange(3)[None])
    rotated = apply_rotary(x, cos, sin, interleaved=True)
    angle = 2 * rotary.inv_freq[1]  # position 2, pair 1
    x0, x1 = x[0, 0, 2, 2], x[0, 0, 2, 3]
    torch.testing.assert_close(rotated[0, 0, 2, 2], x0 * angle.cos() - x1 * angle.sin())
    torch.testing.assert_close(rotated[0, 0, 2, 3], x1 * angle.cos() + x0 * angle.sin())
    default = RotaryEmbedding(tiny_config("sliding_window"), config.head_dim)
    torch.testing.assert_close(default.inv_freq, 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8))
    full = model(torch.randint(1, 64, (1, 12)), use_cache=False).logits
    assert torch.isfinite(full).all()


def test_cache_is_far_smaller_than_a_same_size_llama():
    model = tiny_model("sliding_window", num_hidden_layers=8)
    config = model.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    input_ids = torch.randint(1, 64, (1, 64))
    yoco_bytes = output_cache(model(input_ids)).memory_bytes()["total"]
    llama_cache = output_cache(llama(input_ids, use_cache=True))
    llama_bytes = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in llama_cache.layers)
    expected = 2 * 64 * config.num_key_value_heads * config.head_dim * 4 * (1 + 4 * (WINDOW - 1) / 64)
    assert yoco_bytes == expected
    assert llama_bytes / yoco_bytes > 4


def test_eager_equals_sdpa_and_attention_outputs(self_decoder_type):
    sdpa = tiny_model(self_decoder_type)
    eager = YocoForCausalLM.from_pretrained(
        None, config=sdpa.config, state_dict=sdpa.state_dict(), attn_implementation="eager"
    ).eval()
    ids = torch.randint(1, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    a, b = sdpa(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    torch.testing.assert_close(a[0, 3:], b[0, 3:], atol=ATOL, rtol=0)  # padded query rows are undefined
    torch.testing.assert_close(a[1], b[1], atol=ATOL, rtol=0)
    out = eager(ids, output_attentions=True, output_hidden_states=True)
    # One attention map per softmax-attention layer (retention has none), one hidden state per layer + embeddings.
    expected_maps = 4 if self_decoder_type == "sliding_window" else 2
    assert len(out.attentions) == expected_maps and all(w.shape == (2, 4, 12, 12) for w in out.attentions)
    assert len(out.hidden_states) == 5
    sdpa.set_attn_implementation("eager")  # switching after loading works too
    torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, atol=0, rtol=0)


def test_training_steps_reduce_loss(self_decoder_type):
    model = tiny_model(self_decoder_type).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(1, 64, (4, 24))
    losses = []
    for _ in range(8):
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@torch.no_grad()
def test_block_sparse_window_prefill_equals_dense():
    """With the default chunk size, a sliding-window prompt longer than 512 tokens is prefilled in window-sized
    chunks (each meets at most C + W - 1 keys); the logits equal a dense one-shot prefill."""
    dense = tiny_model("sliding_window", self_decoder_chunk_size=None)
    sparse = tiny_model("sliding_window")
    input_ids = torch.randint(1, 64, (1, 1100))
    seen = []
    hook = sparse.model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    try:
        logits = sparse(input_ids, logits_to_keep=0).logits
    finally:
        hook.remove()
    assert seen == [512, 512, 76]
    torch.testing.assert_close(logits, dense(input_ids).logits, atol=ATOL, rtol=0)


def test_backprop_through_chunked_prefill_and_cached_decoding(self_decoder_type):
    """Gradients flow through the cache: eval-mode chunked prefill and token-by-token decoding give the gradients of
    one full forward (the retention state is replaced, not copied in place, when it requires grad)."""
    model = tiny_model(self_decoder_type, self_decoder_chunk_size=4)
    input_ids = torch.randint(1, 64, (2, 13))
    weights = torch.randn(2, 13, 64)
    (model(input_ids, use_cache=False).logits * weights).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, _ = _incremental_logits(model, input_ids, 9)  # 9-token prefill in chunks of 4, then 4 decode steps
    (logits * weights).sum().backward()
    for grad, param in zip(expected, model.parameters(), strict=True):
        torch.testing.assert_close(param.grad, grad, atol=ATOL, rtol=1e-4)


def test_global_kv_appends_in_place_and_backprop_through_the_cache_works():
    model = tiny_model("sliding_window")
    input_ids = torch.randint(1, 64, (2, 12))
    with torch.no_grad():
        cache = output_cache(model(input_ids[:, :8]))
        layer = cache.layers[cache.global_kv_layer_idx]
        buffer = None
        for t in range(8, 12):
            cache = output_cache(model(input_ids[:, t : t + 1], cache=cache))
            buffer = buffer or layer._key_buffer.data_ptr()
            assert layer._key_buffer.data_ptr() == buffer  # appended in place after the first decode step
        assert cache.memory_bytes()["global_kv_reserved"] >= cache.memory_bytes()["global_kv"]
    # With gradients, decoding through the cache still backpropagates (no in-place writes then).
    out = model(input_ids[:, :8], use_cache=True)
    step = model(input_ids[:, 8:9], cache=output_cache(out))
    (out.logits.sum() + step.logits.sum()).backward()
    assert model.model.global_kv.k_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- attention sinks

SINKS = 2


def sink_model(**overrides) -> YocoForCausalLM:
    return tiny_model("sliding_window", attention_sink_tokens=SINKS, **overrides)


def test_attention_sink_semantics():
    """A self-decoder layer sees its window plus the first S tokens: a sink beyond the window reaches the last
    position's layer output, the first non-sink token beyond it does not; without sinks neither does."""
    input_ids = torch.randint(1, 64, (1, 16))
    last = input_ids.shape[1] - 1

    def layer0(model, ids):
        return model.model(ids, output_hidden_states=True, use_cache=False).hidden_states[1][0, last]

    def change(position):
        ids = input_ids.clone()
        ids[0, position] = ids[0, position] % 63 + 1
        return ids

    model, plain = sink_model(), tiny_model("sliding_window")
    assert (layer0(model, change(SINKS - 1)) - layer0(model, input_ids)).abs().max() > 1e-4
    torch.testing.assert_close(layer0(model, change(SINKS)), layer0(model, input_ids), atol=0, rtol=0)
    torch.testing.assert_close(layer0(plain, change(0)), layer0(plain, input_ids), atol=0, rtol=0)
    # Within the first window sinks change nothing: same weights, same logits.
    torch.testing.assert_close(model(input_ids[:, :WINDOW]).logits, plain(input_ids[:, :WINDOW]).logits)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_attention_sinks_cached_chunked_and_padded_equal_the_full_forward(implementation):
    """With sinks: incremental decoding (the cached sinks go before the window), chunked prefill with padding, a
    left-padded batch (each row's sinks are its own first tokens) all give the plain forward's logits / tokens."""
    model = sink_model()
    model.config._attn_implementation = implementation
    input_ids = torch.randint(1, 64, (2, 17))
    full = model(input_ids, use_cache=False).logits
    for prefill in (1, 3, 9):
        incremental, cache = _incremental_logits(model, input_ids, prefill)
        torch.testing.assert_close(incremental, full, atol=ATOL, rtol=0)
    assert cache.layers[0].sink_positions.tolist() == [[0, 1], [0, 1]]
    mask = torch.ones_like(input_ids)
    mask[0, :7] = 0  # more padding than the window: row 0's sinks are positions 7 and 8
    one_shot = model(input_ids, attention_mask=mask, use_cache=True)
    model.config.self_decoder_chunk_size = 3
    in_chunks = model(input_ids, attention_mask=mask, use_cache=True)
    real = mask.bool()  # padded queries see nothing; eager fills their rows arbitrarily
    torch.testing.assert_close(in_chunks.logits[real], one_shot.logits[real], atol=ATOL, rtol=0)
    assert output_cache(in_chunks).layers[1].sink_positions.tolist() == [[7, 8], [0, 1]]
    model.config.self_decoder_chunk_size = "auto"
    rows = [torch.randint(1, 64, (n,)) for n in (4, 13, 9)]
    ids, mask = _left_pad(rows)
    batch_logits = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    for i, row in enumerate(rows):
        torch.testing.assert_close(batch_logits[i, -len(row) :], model(row[None]).logits[0], atol=ATOL, rtol=0)
    generated = greedy(model, ids, attention_mask=mask, max_new_tokens=12)[:, ids.shape[1] :]
    for i, row in enumerate(rows):
        assert torch.equal(generated[i], greedy(model, row[None], max_new_tokens=12)[0, len(row) :])


def test_attention_sinks_generate_beams_lookup_and_packed_sequences():
    model = sink_model()
    prompt = torch.randint(1, 64, (2, 9))
    plain = greedy(model, prompt, max_new_tokens=10)
    assert torch.equal(greedy(model, prompt, max_new_tokens=10, use_cache=False), plain)
    repetitive = prompt[:1].repeat(1, 2)  # prompt lookup proposes (and crops) drafts
    assert torch.equal(
        greedy(model, repetitive, max_new_tokens=10, prompt_lookup_num_tokens=3),
        greedy(model, repetitive, max_new_tokens=10),
    )
    beams = greedy(model, prompt, max_new_tokens=8, num_beams=3)  # beam reorder moves the sinks too
    manual = [greedy(model, row[None], max_new_tokens=8, num_beams=3)[0] for row in prompt]
    assert torch.equal(beams, torch.stack(manual))
    ids, position_ids, rows = _packed([3, 9, 7])  # each packed sequence has its own sinks
    packed = model(ids, position_ids=position_ids).logits
    torch.testing.assert_close(packed, torch.cat([model(seq).logits for seq in rows[0]], 1), atol=ATOL, rtol=0)


def test_attention_sinks_memory_and_refusals():
    model = sink_model()
    cache = output_cache(model(torch.randint(1, 64, (2, 20)), use_cache=True))
    rows = (WINDOW - 1 + SINKS) * 2 * 2  # (W - 1 + S) keys and values in each of the 2 self-decoder layers
    head_bytes = model.config.num_key_value_heads * model.config.head_dim * 4  # fp32
    assert cache.memory_bytes()["self_decoder"] == 2 * rows * head_bytes  # batch of 2
    with pytest.raises(ValueError, match="`attention_sink_tokens` must be an int >= 0"):
        tiny_config("sliding_window", attention_sink_tokens=-1)
    with pytest.raises(ValueError, match="`attention_sink_tokens` is only used by"):
        tiny_config("gated_retention", attention_sink_tokens=4)
    with pytest.raises(ValueError, match="static YOCO cache does not keep attention sinks"):
        greedy(model, torch.randint(1, 64, (1, 4)), cache_implementation="static")
    with pytest.raises(ValueError, match="needs YocoCache"):
        model(torch.randint(1, 64, (1, 4)), cache=DynamicCache(config=model.config))
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="`attention_sink_tokens` needs attn_implementation"):
        model(torch.randint(1, 64, (1, 4)))
