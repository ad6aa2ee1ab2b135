"""benchmarks/windowed_retrieval_probe.py: the windowed layers see exactly their window and sinks (equal to the
plain model run on just those tokens), the other layers and cached decoding are unchanged, and the model's attention
implementation comes back afterwards."""

import pytest
import torch
from conftest import load_benchmark
from transformers import LlamaConfig, LlamaForCausalLM

import hf_yoco

WINDOW, SINKS, LENGTH = 6, 2, 20


@pytest.fixture(scope="module")
def script():
    with load_benchmark("windowed_retrieval_probe") as module:
        yield module


def llama(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config).eval()


def last_logits(model, ids, positions=None):
    return model(ids, position_ids=positions).logits[0, -1]


@torch.no_grad()
@pytest.mark.parametrize("sinks", [0, SINKS])
def test_a_windowed_layer_sees_only_its_window_and_sinks(script, sinks):
    model, ids = llama(1), torch.randint(0, 64, (1, LENGTH))
    with script.windowed_lower_layers(model, split=1, window=WINDOW, sinks=sinks):
        windowed = last_logits(model, ids)
    visible = torch.cat([torch.arange(sinks), torch.arange(LENGTH - WINDOW, LENGTH)])  # the sinks, then the window
    expected = last_logits(model, ids[:, visible], visible[None])  # the same tokens at their own positions
    torch.testing.assert_close(windowed, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(windowed, last_logits(model, ids), atol=1e-3)  # the window did cut something off


@torch.no_grad()
def test_layers_from_the_split_on_and_split_zero_keep_full_attention(script):
    model, ids = llama(2), torch.randint(0, 64, (1, LENGTH))
    plain = model(ids).logits
    with script.windowed_lower_layers(model, split=0, window=WINDOW, sinks=SINKS):
        torch.testing.assert_close(model(ids).logits, plain, atol=1e-5, rtol=1e-5)
    with script.windowed_lower_layers(model, split=1, window=WINDOW, sinks=SINKS):
        windowed = model(ids).logits
    torch.testing.assert_close(windowed[:, :WINDOW], plain[:, :WINDOW], atol=1e-5, rtol=1e-5)  # nothing cut yet
    assert not torch.allclose(windowed[:, -1], plain[:, -1], atol=1e-3)
    assert model.config._attn_implementation == "sdpa"  # restored


@torch.no_grad()
def test_cached_decoding_matches_the_full_forward(script):
    model, ids = llama(2), torch.randint(0, 64, (1, LENGTH))
    with script.windowed_lower_layers(model, split=1, window=WINDOW, sinks=SINKS):
        full = last_logits(model, ids)
        cache = hf_yoco.output_cache(model(ids[:, :-3], use_cache=True))
        step = model(ids[:, -3:], **hf_yoco.cache_kwarg(cache)).logits[0, -1]  # 3 queries, 20 cached keys
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_padded_batches_are_refused(script):
    model = llama(1)
    with script.windowed_lower_layers(model, split=1, window=WINDOW, sinks=SINKS):
        with pytest.raises(ValueError, match="one unpadded sequence"):
            model(torch.randint(0, 64, (2, LENGTH)))
