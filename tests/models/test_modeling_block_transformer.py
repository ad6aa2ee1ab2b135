"""Block Transformer: semantics, cache, generate() and transformers-contract tests (CPU, fp32, tiny configs).

Tolerances: fp32 logits are compared with `atol=ATOL=1e-5` (observed differences are ~1e-7; they come from
different batch shapes / matmul orders, never from different math). Generated token ids are compared exactly.
"""

from __future__ import annotations

import ast
import copy
import io
import pathlib
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    TextStreamer,
    pipeline,
)

import hf_yoco
from hf_yoco import cache_kwarg, output_cache
from hf_yoco.models.configuration_block_transformer import BlockTransformerConfig
from hf_yoco.models.modeling_block_transformer import (
    BlockTransformerCache,
    BlockTransformerForCausalLM,
    BlockTransformerModel,
)

pytestmark = pytest.mark.transformers_compat

ATOL = 1e-5
VOCAB = 64
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=True)

VARIANTS = {
    "llama": {},
    "gpt_neox": dict(
        layer_style="gpt_neox",
        use_parallel_residual=True,
        partial_rotary_factor=0.25,
        attention_bias=True,
        mlp_bias=True,
        hidden_act="gelu",
    ),
    "L1_k1": dict(block_length=1, num_prefix_tokens=1),
    "L3_k3_gqa": dict(block_length=3, num_prefix_tokens=3, hidden_size=48, num_key_value_heads=1),
}


def tiny_config(**overrides) -> BlockTransformerConfig:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        block_length=4,
        num_prefix_tokens=2,
        num_block_decoder_layers=2,
        num_token_decoder_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # peaky distributions: greedy/beam comparisons are meaningful
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return BlockTransformerConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> BlockTransformerForCausalLM:
    torch.manual_seed(seed)
    model = BlockTransformerForCausalLM(tiny_config(**overrides)).eval()
    # Non-trivial biases / norm weights so that the GPT-NeoX variant exercises them.
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def model() -> BlockTransformerForCausalLM:
    return tiny_model()


def causal(n: int) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def reference_logits(model: BlockTransformerForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Straight from the definition, one position at a time: `[T]` ids -> `[T, V]` (position t predicts t + 1)."""
    cfg, inner = model.config, model.model
    L, k = cfg.block_length, cfg.num_prefix_tokens
    rows = []
    for t in range(len(ids)):
        block, offset = divmod(t + 1, L)  # the predicted token is token `offset` of block `block`
        if block == 0:
            context = inner.start_context
        else:
            # block vector = concatenation of the L token embeddings of width D / L
            embeds = torch.stack(
                [torch.cat([inner.embedder.embed_tokens(ids[b * L + i]) for i in range(L)]) for b in range(block)]
            )[None]
            states = inner.block_decoder(embeds, torch.arange(block)[None], causal(block))
            context = states[0, -1]
        prefix = inner.token_decoder.context_to_prefix.weight @ context + inner.token_decoder.context_to_prefix.bias
        prefix = prefix.view(k, -1)  # prefix j = channels [j*D, (j+1)*D)
        tokens = inner.token_decoder.embed_tokens(ids[block * L : block * L + offset])
        local = torch.cat([prefix, tokens])[None]  # [1, k + offset, D] at positions 0..k+offset-1
        states = inner.token_decoder(local, torch.arange(local.shape[1])[None], causal(local.shape[1]))
        rows.append(model.lm_head(states[0, -1]))
    return torch.stack(rows)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference_definition(variant):
    model = tiny_model(**VARIANTS[variant])
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    assert logits.shape == (2, 11, VOCAB)
    for row in range(2):
        torch.testing.assert_close(logits[row], reference_logits(model, ids[row]), atol=ATOL, rtol=0)


def test_forward_is_causal_and_every_position_is_predicted(model):
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (1, 13))
    with torch.no_grad():
        base = model(ids, use_cache=False).logits
        for s in range(1, 13):
            changed = ids.clone()
            changed[0, s] = 3 + (changed[0, s] - 2) % (VOCAB - 3)
            logits = model(changed, use_cache=False).logits
            torch.testing.assert_close(logits[:, :s], base[:, :s], atol=ATOL, rtol=0)
            assert (logits[:, s] - base[:, s]).abs().max() > 1e-3  # token s is seen by the prediction at s
        # the first block is predicted too: different first tokens give different first-block logits
        assert torch.isfinite(base).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decoding_matches_full_forward(variant):
    """Prompt lengths cover every residue mod block_length (and prompts shorter than one block)."""
    model = tiny_model(**VARIANTS[variant])
    L = model.config.block_length
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (2, 3 * L + 2))
    total = ids.shape[1]
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        for prompt_len in range(1, 2 * L + 2):
            out = model(ids[:, :prompt_len], use_cache=True)
            torch.testing.assert_close(out.logits, full[:, :prompt_len], atol=ATOL, rtol=0)
            cache = output_cache(out)
            assert isinstance(cache, BlockTransformerCache) and cache.get_seq_length() == prompt_len
            steps = [model(ids[:, t : t + 1], cache=cache).logits[:, 0] for t in range(prompt_len, total)]
            torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt_len:], atol=ATOL, rtol=0)
            assert cache.get_seq_length() == total


def test_multi_token_input_with_cache(model):
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (2, 14))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = output_cache(model(ids[:, :3]))
        chunk = model(ids[:, 3:9], cache=cache).logits
        last = model(ids[:, 9:], cache=cache, logits_to_keep=1).logits
    torch.testing.assert_close(chunk, full[:, 3:9], atol=ATOL, rtol=0)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)


def test_logits_to_keep(model):
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, logits_to_keep=0, use_cache=False).logits, full, atol=0, rtol=0)
        for keep in (1, 3):
            out = model(ids, logits_to_keep=keep, use_cache=False).logits
            torch.testing.assert_close(out, full[:, -keep:], atol=ATOL, rtol=0)
        picked = model(ids, logits_to_keep=torch.tensor([0, 4, 9]), use_cache=False).logits
        torch.testing.assert_close(picked, full[:, [0, 4, 9]], atol=ATOL, rtol=0)


def test_left_padded_forward_matches_rows_alone(model):
    torch.manual_seed(6)
    rows = [torch.randint(3, VOCAB, (n,)) for n in (13, 5, 1, 8, 10)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        last = model(ids, attention_mask=mask, logits_to_keep=1).logits
        for i, row in enumerate(rows):
            alone = model(row[None], use_cache=False).logits[0]
            torch.testing.assert_close(batched[i, ids.shape[1] - len(row) :], alone, atol=ATOL, rtol=0)
            torch.testing.assert_close(last[i, 0], alone[-1], atol=ATOL, rtol=0)


def test_right_padding_does_not_change_real_positions(model):
    torch.manual_seed(7)
    row = torch.randint(3, VOCAB, (6,))
    ids = torch.cat([row, torch.zeros(3, dtype=torch.long)])[None]
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(row[None], use_cache=False).logits
    torch.testing.assert_close(padded[:, :6], alone, atol=ATOL, rtol=0)


def test_eager_matches_sdpa_and_bf16_runs():
    model = tiny_model()
    assert model.config._attn_implementation == "sdpa"
    torch.manual_seed(18)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(ids).logits, sdpa, atol=ATOL, rtol=0)
    bf16 = model.to(torch.bfloat16)
    out = bf16.generate(ids, max_new_tokens=5, **GEN)
    assert out.shape == (2, 16) and bf16(ids).logits.dtype == torch.bfloat16


def test_invalid_inputs_raise(model):
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="left and right padding only"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1]]))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(1, 6, 32))
    with pytest.raises(ValueError, match="BlockTransformerCache"):
        model(ids, cache=DynamicCache())


def test_gpt_neox_style_block_decoder_matches_transformers_gpt_neox():
    """`layer_style="gpt_neox"` reproduces transformers' GPTNeoXModel (the official checkpoints' backbone) once the
    per-head interleaved `query_key_value` is split into q/k/v: the mapping a converter needs."""
    from transformers import GPTNeoXConfig, GPTNeoXModel

    model = tiny_model(**VARIANTS["gpt_neox"], num_key_value_heads=4)  # GPT-NeoX has no GQA
    cfg = model.config
    neox = GPTNeoXModel(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_block_decoder_layers,
            num_attention_heads=cfg.num_attention_heads,
            rotary_pct=cfg.partial_rotary_factor,
            use_parallel_residual=True,
            hidden_act="gelu",
            attention_bias=True,
            layer_norm_eps=cfg.norm_eps,
        )
    ).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for param in neox.parameters():
            param.add_(0.1 * torch.randn_like(param))
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    state = {}
    for name, value in neox.state_dict().items():
        if "query_key_value" in name:  # [H * 3 * hd, ...]: per head, q then k then v
            prefix, kind = name.split("attention.query_key_value.")
            parts = value.view(heads, 3, head_dim, *value.shape[1:])
            for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                state[f"{prefix}self_attn.{proj}.{kind}"] = parts[:, i].reshape(heads * head_dim, *value.shape[1:])
            continue
        name = name.replace("attention.dense", "self_attn.o_proj").replace("final_layer_norm", "norm")
        name = name.replace("mlp.dense_h_to_4h", "mlp.up_proj").replace("mlp.dense_4h_to_h", "mlp.down_proj")
        state[name] = value
    state.pop("embed_in.weight")
    block_decoder = model.model.block_decoder
    with torch.no_grad():
        for name, param in block_decoder.named_parameters():
            param.copy_(state.pop(name))
    assert not state
    torch.manual_seed(20)
    embeds = torch.randn(2, 7, cfg.hidden_size)
    with torch.no_grad():
        expected = neox(inputs_embeds=embeds).last_hidden_state
        ours = block_decoder(embeds, torch.arange(7)[None], causal(7))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------------------


def test_loss_covers_every_token_and_matches_manual_cross_entropy(model):
    torch.manual_seed(8)
    ids = torch.randint(3, VOCAB, (3, 10))
    labels = ids.clone()
    labels[0, :2] = -100
    out = model(ids, labels=labels)
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual, atol=1e-6, rtol=0)
    # every token but the very first has a finite prediction (the first block uses the start context)
    assert torch.isfinite(out.logits).all()
    # Trainer passes num_items_in_batch (summed over gradient-accumulation micro-batches): loss = sum / count
    count = int((labels[:, 1:] != -100).sum())
    summed = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    for items in (count, 2 * count):
        loss = model(ids, labels=labels, num_items_in_batch=torch.tensor(items)).loss
        torch.testing.assert_close(loss, summed / items, atol=1e-6, rtol=0)


def test_trainer_passes_num_items_in_batch(tmp_path):
    """Trainer (gradient accumulation 2, activation checkpointing) hands `num_items_in_batch` to forward."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = tiny_model().train()
    torch.manual_seed(19)
    data = []
    for _ in range(8):
        ids = torch.randint(3, VOCAB, (10,))
        labels = ids.clone()
        labels[: int(torch.randint(0, 5, ()))] = -100  # a different number of targets per example
        data.append({"input_ids": ids, "labels": labels})
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["labels"], kwargs.get("num_items_in_batch"))),
        with_kwargs=True,
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        use_cpu=True,
        activation_checkpointing=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
    assert trainer.model_accepts_loss_kwargs
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    # each optimizer step: both micro-batches get the number of shifted targets of the whole accumulated batch
    assert len(seen) == 4
    for step in (0, 2):
        expected = sum(int((labels[:, 1:] != -100).sum()) for labels, _ in seen[step : step + 2])
        assert [int(n) for _, n in seen[step : step + 2]] == [expected, expected]


def test_gradients_and_gradient_checkpointing():
    model = tiny_model().train()
    torch.manual_seed(9)
    ids = torch.randint(3, VOCAB, (2, 9))
    model(ids, labels=ids).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in reference.items()), "every parameter gets a gradient"
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.block_decoder.layers)
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------------------------


def test_generate_greedy_cache_equals_no_cache(model):
    torch.manual_seed(10)
    for length in (4, 7):
        ids = torch.randint(3, VOCAB, (2, length))
        with_cache = model.generate(ids, max_new_tokens=9, **GEN)
        without = model.generate(ids, max_new_tokens=9, use_cache=False, **GEN)
        assert with_cache.shape == (2, length + 9)
        assert torch.equal(with_cache, without)


def test_generate_left_padded_batch_matches_rows_alone(model):
    torch.manual_seed(11)
    rows = [torch.randint(3, VOCAB, (n,)) for n in (5, 12, 2, 7)]
    ids, mask = left_pad(rows)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=9, **GEN)
    assert torch.equal(batched, model.generate(ids, attention_mask=mask, max_new_tokens=9, use_cache=False, **GEN))
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=9, **GEN)
        assert torch.equal(batched[i, ids.shape[1] :], alone[0, len(row) :])


def test_beam_search_cache_equals_no_cache(model):
    torch.manual_seed(12)
    rows = [torch.randint(3, VOCAB, (n,)) for n in (6, 3)]
    ids, mask = left_pad(rows)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, **GEN)
    with_cache = model.generate(ids, attention_mask=mask, **kwargs)
    without = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert with_cache.shape == (4, 12)
    assert torch.equal(with_cache, without)


def test_sampling_with_num_return_sequences(model):
    torch.manual_seed(13)
    ids = torch.randint(3, VOCAB, (2, 5))
    out = model.generate(ids, do_sample=True, max_new_tokens=7, num_return_sequences=3, pad_token_id=0)
    assert out.shape == (6, 12)
    assert torch.equal(out[:, :5], ids.repeat_interleave(3, 0))


def test_continue_from_returned_cache(model):
    torch.manual_seed(14)
    rows = [torch.randint(3, VOCAB, (n,)) for n in (6, 3)]
    ids, mask = left_pad(rows)
    kwargs = dict(return_dict_in_generate=True, **GEN)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=7, **kwargs)
    first = model.generate(ids, attention_mask=mask, max_new_tokens=3, **kwargs)
    assert isinstance(output_cache(first), BlockTransformerCache)
    mask2 = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    second = model.generate(
        first.sequences, attention_mask=mask2, **cache_kwarg(output_cache(first)), max_new_tokens=4, **kwargs
    )
    assert torch.equal(second.sequences, reference.sequences)


def test_eos_stop_strings_and_streamer(model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # "abcdef" is in the vocabulary because StopStringCriteria probes the tokenizer with that prefix
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "abcdef": 3, **{f"w{i}": 4 + i for i in range(VOCAB - 4)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )
    prompt = "w1 w2 w3 w4 w5"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    free = model.generate(ids, max_new_tokens=8, **GEN)[0, 5:]
    # eos: stop right after the 3rd new token (first occurrence), the rest is padded
    eos = int(free[2])
    stop_at = int((free == eos).nonzero()[0])
    out = model.generate(ids, max_new_tokens=8, **{**GEN, "eos_token_id": eos})[0, 5:]
    assert torch.equal(out[: stop_at + 1], free[: stop_at + 1]) and len(out) == stop_at + 1
    # stop strings
    stop_word = tokenizer.decode([eos])
    out = model.generate(ids, max_new_tokens=8, stop_strings=[stop_word], tokenizer=tokenizer, **GEN)[0, 5:]
    assert torch.equal(out, free[: stop_at + 1])
    # streamer
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        model.generate(ids, max_new_tokens=8, streamer=TextStreamer(tokenizer, skip_prompt=True), **GEN)
    assert buffer.getvalue().split() == tokenizer.decode(free).split()
    # pipeline("text-generation") with a left-padded batch
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    texts = ["w1 w2 w3 w4 w5", "w7 w8"]
    results = generator(texts, max_new_tokens=6, do_sample=False, batch_size=2, return_full_text=False)
    for text, result in zip(texts, results):
        alone = model.generate(tokenizer(text, return_tensors="pt").input_ids, max_new_tokens=6, **GEN)
        expected = tokenizer.decode(alone[0, len(text.split()) :], skip_special_tokens=True)
        assert len(expected.split()) >= 4 and result[0]["generated_text"].split() == expected.split()


def test_unknown_cache_implementation_is_refused(model):
    ids = torch.randint(3, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="cache_implementation.*'static'"):
        model.generate(ids, max_new_tokens=4, cache_implementation="offloaded", **GEN)


# ---------------------------------------------------------------------------------------------------------------------
# Cache API
# ---------------------------------------------------------------------------------------------------------------------


def test_cache_layout_and_memory_bytes(model):
    cfg = model.config
    L, k, kv_width = cfg.block_length, cfg.num_prefix_tokens, cfg.num_key_value_heads * cfg.head_dim
    torch.manual_seed(15)
    ids = torch.randint(3, VOCAB, (2, 4 * L + 1))
    with torch.no_grad():
        cache = output_cache(model(ids[:, :-1]))  # 4 complete blocks, nothing pending
        memory = cache.memory_bytes()
        assert memory["block_decoder_kv"] == cfg.num_block_decoder_layers * 2 * 2 * 4 * kv_width * 4
        assert memory["token_decoder_kv"] == cfg.num_token_decoder_layers * 2 * 2 * (k + L - 1) * kv_width * 4
        assert memory["total"] == sum(v for key, v in memory.items() if key not in ("total", "held"))
        assert 0 < memory["held"] <= memory["total"]
        assert cache.num_blocks.tolist() == [4, 4] and cache.num_pending.tolist() == [0, 0]
        for _t in range(3 * L):  # the local state never grows; the block KV grows by one per block
            model(ids[:, -1:], cache=cache)
            assert cache.memory_bytes()["token_decoder_kv"] == memory["token_decoder_kv"]
        assert cache.layers[0].keys.shape[-2] == 4 + 3
        assert cache.get_seq_length() == 4 * L + 3 * L


def test_cache_reorder_select_repeat_reset_crop(model):
    torch.manual_seed(16)
    ids = torch.randint(3, VOCAB, (3, 14))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits

        def run(prompt_ids, rest_ids):
            cache = output_cache(model(prompt_ids))
            return cache, [model(rest_ids[:, t : t + 1], cache=cache).logits[:, 0] for t in range(2)]

        # reorder_cache (beam search) / batch_select_indices / batch_repeat_interleave
        cache = output_cache(model(ids[:, :9]))
        cache.reorder_cache(torch.tensor([2, 0, 1]))
        out = model(ids[[2, 0, 1], 9:10], cache=cache).logits[:, 0]
        torch.testing.assert_close(out, full[[2, 0, 1], 9], atol=ATOL, rtol=0)
        cache = output_cache(model(ids[:, :9]))
        cache.batch_select_indices(torch.tensor([1]))
        cache.batch_repeat_interleave(2)
        out = model(ids[[1, 1], 9:10], cache=cache).logits[:, 0]
        torch.testing.assert_close(out, full[[1, 1], 9], atol=ATOL, rtol=0)
        # crop inside the current block is exact: 10 tokens = 2 blocks + 2 pending -> crop 2 -> 8 tokens
        cache = output_cache(model(ids[:, :10]))
        cache.crop(-2)
        assert cache.get_seq_length() == 8
        out = model(ids[:, 8:11], cache=cache).logits
        torch.testing.assert_close(out, full[:, 8:11], atol=ATOL, rtol=0)
        with pytest.raises(ValueError, match="block boundary"):
            cache.crop(-4)  # 11 tokens = 2 blocks + 3 pending; removing 4 would reopen block 2
        # reset -> the next forward is a fresh prefill
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.memory_bytes()["total"] == 0
        out = model(ids[:, :5], cache=cache).logits
        torch.testing.assert_close(out, full[:, :5], atol=ATOL, rtol=0)


def test_cache_is_smaller_than_llama_cache():
    model = tiny_model()
    cfg = model.config
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
        )
    ).eval()
    ids = torch.randint(3, VOCAB, (1, 64))
    with torch.no_grad():
        ours = output_cache(model(ids)).memory_bytes()["total"]
        theirs = output_cache(llama(ids, use_cache=True))
    llama_bytes = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in theirs.layers)
    # block KV (half the layers, 1/4 of the positions) + a bounded local window: far below Llama's
    assert ours < llama_bytes / 4


# ---------------------------------------------------------------------------------------------------------------------
# transformers contract: Auto classes, save/load, init, remote-code imports
# ---------------------------------------------------------------------------------------------------------------------


def test_auto_classes_and_save_load_round_trip(tmp_path, model):
    assert hasattr(hf_yoco, "BlockTransformerForCausalLM")
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, BlockTransformerConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, BlockTransformerForCausalLM)
    base = AutoModel.from_config(config)
    assert isinstance(base, BlockTransformerModel)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_tied_word_embeddings_option(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.token_decoder.embed_tokens.weight.data_ptr()
    assert tiny_model().lm_head.weight.data_ptr() != tiny_model().model.token_decoder.embed_tokens.weight.data_ptr()


def assert_same_init(reference: torch.nn.Module, model: torch.nn.Module) -> None:
    """Deterministic tensors (norms, biases, rotary buffers) equal; random ones follow the same distribution."""
    ref_tensors = dict([*reference.named_parameters(), *reference.named_buffers(remove_duplicate=False)])
    tensors = dict([*model.named_parameters(), *model.named_buffers(remove_duplicate=False)])
    assert ref_tensors.keys() == tensors.keys()
    for name, ref in ref_tensors.items():
        value = tensors[name]
        assert value.device.type != "meta", name
        if ref.numel() > 1 and ref.std() > 0:
            tolerance = 0.25 if ref.numel() >= 1000 else 0.6  # sampling noise of small tensors
            assert abs(value.std() / ref.std() - 1) < tolerance, name
            assert abs(value.mean() - ref.mean()) < 0.5 * ref.std(), name
        else:
            assert torch.equal(value, ref), name


@pytest.mark.parametrize("variant", ["llama", "gpt_neox"])
def test_meta_device_init_equals_normal_init(variant):
    config = tiny_config(**VARIANTS[variant], num_block_decoder_layers=1, hidden_size=64)
    reference = BlockTransformerForCausalLM(copy.deepcopy(config))
    loaded = BlockTransformerForCausalLM.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    assert_same_init(reference, loaded)
    with torch.device("meta"):
        meta = BlockTransformerForCausalLM(copy.deepcopy(config))
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert_same_init(reference, meta)
    for (name, a), (_, b) in zip(sorted(reference.named_buffers()), sorted(meta.named_buffers())):
        assert torch.equal(a, b), name
    # the custom parameters follow their documented init
    expansion = meta.model.token_decoder.context_to_prefix
    assert torch.equal(expansion.bias, torch.zeros_like(expansion.bias))
    assert 0.7 < meta.model.start_context.std() < 1.3
    assert abs(expansion.weight.std() / config.hidden_size**-0.5 - 1) < 0.1


def test_peft_lora_generate_and_merge():
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    ids = torch.randint(3, VOCAB, (2, 9))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    wrapped = {name.split(".")[-1] for name, _ in peft_model.named_modules() if name.endswith("lora_A")}
    assert wrapped  # LoRA got inserted (q/k/v/o, MLP and the context expansion)
    generated = peft_model.generate(input_ids=ids, max_new_tokens=5, **GEN)
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, BlockTransformerForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=ATOL, rtol=0)
    assert torch.equal(merged.generate(ids, max_new_tokens=5, **GEN), generated)


def test_model_files_follow_the_remote_code_import_rule():
    folder = pathlib.Path(hf_yoco.__file__).parent / "models"
    allowed_siblings = {"modeling_common", "configuration_block_transformer"}
    for name in ("modeling_block_transformer.py", "configuration_block_transformer.py"):
        tree = ast.parse((folder / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in {"torch", "transformers", "huggingface_hub"} for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    assert node.module.split(".")[0] in {"torch", "transformers", "huggingface_hub", "__future__"}
                else:
                    assert node.level == 1 and node.module in allowed_siblings, (name, node.module)


def test_remote_code_round_trip_without_hf_yoco(tmp_path, model):
    """`save_pretrained` ships the model files; a fresh process that never imports hf_yoco loads them as remote
    code (`trust_remote_code=True`) and reproduces the logits and greedy generation."""
    import json
    import os
    import subprocess
    import sys

    save_dir = tmp_path / "checkpoint"
    model.save_pretrained(save_dir)
    shipped = {p.name for p in save_dir.glob("*.py")}
    assert {"modeling_block_transformer.py", "configuration_block_transformer.py", "modeling_common.py"} <= shipped
    torch.manual_seed(17)
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        expected_logits = model(ids).logits
    expected_tokens = model.generate(ids, max_new_tokens=5, **GEN)
    torch.save({"ids": ids, "logits": expected_logits, "tokens": expected_tokens}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(save_dir)!r}, trust_remote_code=True).eval()
assert "hf_yoco" not in sys.modules, "hf_yoco must not be imported"
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
data = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    torch.testing.assert_close(model(data["ids"]).logits, data["logits"], atol=1e-5, rtol=0)
tokens = model.generate(data["ids"], max_new_tokens=5, **{json.dumps(GEN).replace("false", "False").replace("null", "None").replace("true", "True")})
assert torch.equal(tokens, data["tokens"])
print("REMOTE_OK")
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]


def test_packed_position_ids_are_refused():
    """Packed sequences (position_ids restarting inside a row, no attention_mask) would silently mix: refused."""
    model = tiny_model()
    input_ids = torch.randint(1, 64, (1, 10))
    position_ids = torch.cat([torch.arange(4), torch.arange(6)])[None]
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids, position_ids=position_ids)
    model(input_ids, position_ids=torch.arange(10)[None])  # plain positions are fine (and ignored)


@pytest.mark.parametrize("name", ["output_hidden_states", "output_attentions"])
def test_hidden_states_and_attentions_are_refused_not_dropped(name):
    model = tiny_model()
    input_ids = torch.randint(1, 64, (1, 9))
    with pytest.raises(ValueError, match=name):
        model(input_ids, **{name: True})
    model.config.output_hidden_states = True  # also from the config
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(input_ids)
