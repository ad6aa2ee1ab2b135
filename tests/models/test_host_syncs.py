"""Host syncs per decode step, counted on CPU with `torch.profiler`: the ops that make the host wait for a GPU
(`aten::_local_scalar_dense`, behind `.item()` / `bool(tensor)` / `int(tensor)`, and `aten::nonzero`, whose output
size the host must read). On CPU they are cheap; on a GPU each one stalls the launch queue, so a decode step should
have none beyond what a stock Llama has. Input value checks, which run on CPU only at decode, are switched to their
GPU behaviour for the count."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

import hf_yoco
from hf_yoco import cache_kwarg, output_cache
from hf_yoco.models import modeling_common

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0)  # fmt: skip


def build(name: str):
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**SIZES, num_hidden_layers=4)).eval()
    if name == "block":
        return hf_yoco.BlockTransformerForCausalLM(hf_yoco.BlockTransformerConfig(**SIZES, block_length=4)).eval()
    decoder = dict(self_decoder_type="sliding_window", sliding_window=8) if name == "swa" else {}
    return hf_yoco.YocoForCausalLM(hf_yoco.YocoConfig(**SIZES, num_hidden_layers=4, **decoder)).eval()


def decode_syncs(name: str, padded: bool, steps: int = 4) -> list[int]:
    """Host-sync ops of each of `steps` decode steps after a 10-token prefill (batch 2)."""
    model = build(name)
    ids = torch.randint(1, 64, (2, 10))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
    counts = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        for _ in range(steps):
            cache = output_cache(out)
            mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            token = out.logits[:, -1:].argmax(-1)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = model(token, attention_mask=mask if padded else None, **cache_kwarg(cache), use_cache=True)
            counts.append(sum(event.count for event in prof.key_averages() if event.key in SYNC_OPS))
    return counts


@pytest.fixture(autouse=True)
def gpu_value_checks(monkeypatch):
    monkeypatch.setattr(modeling_common, "checks_values", lambda reference, past_length: past_length == 0)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", ["swa", "gret"])
def test_yoco_decode_syncs_no_more_than_llama(name, padded):
    llama = decode_syncs("llama", padded)
    assert decode_syncs(name, padded) == llama  # 0 unpadded; with a mask, transformers' own mask check only


def test_block_transformer_decode_syncs_once_per_step():
    """The one sync is `completes.nonzero()`: the block decoder runs only for rows whose block just completed (block
    masks are sized from a host-side bound; the static cache's compiled step has no sync at all)."""
    assert decode_syncs("block", padded=False, steps=8) == [1] * 8
