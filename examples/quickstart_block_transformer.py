"""Quickstart: build a small Block Transformer, generate with stock `generate()`, compare cache bytes with a Llama.

    python examples/quickstart_block_transformer.py                  # a few seconds on a 2-core CPU
    python examples/quickstart_block_transformer.py --context 4096   # the gap grows with the context

The Block Transformer (block length 4, 2 prefix vectors, 4 block-decoder + 4 token-decoder layers) and a
`LlamaForCausalLM` with the same width, total depth and heads get the same random prompt (batch of two rows, the
second left-padded). The table shows the bytes each cache holds after generation, measured from the cache tensors,
next to the arithmetic prediction for the Block Transformer: block-decoder K/V for every completed block plus a local
token-decoder window of `num_prefix_tokens + block_length - 1` positions, independent of the context length.
"""

from __future__ import annotations

import argparse

import torch
from quickstart import compare_caches, print_cache_table  # examples/quickstart.py, beside this script
from transformers import LlamaConfig

import hf_yoco  # noqa: F401  (registers "hf_yoco_block_transformer" with the Auto classes)
from hf_yoco import BlockTransformerConfig, output_cache

WIDTH = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_attention_heads=8,
    num_key_value_heads=2,
)


def block_transformer_prediction(config: BlockTransformerConfig, batch: int, tokens: int) -> int:
    """fp32 K/V bytes: block-decoder layers x completed blocks + token-decoder layers x the local window."""
    kv_per_position = 2 * batch * config.num_key_value_heads * config.head_dim * 4
    blocks = tokens // config.block_length
    block_kv = config.num_block_decoder_layers * blocks * kv_per_position
    local_kv = config.num_token_decoder_layers * config.token_decoder_length * kv_per_position
    return block_kv + local_kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=1024, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(3, WIDTH["vocab_size"], (2, args.context))
    attention_mask = torch.ones_like(prompt)
    attention_mask[1, :3] = 0  # the second row is a prompt 3 tokens shorter, left-padded

    configs = {
        "Block Transformer": BlockTransformerConfig(
            **WIDTH, block_length=4, num_prefix_tokens=2, num_block_decoder_layers=4, num_token_decoder_layers=4
        ),
        "Llama": LlamaConfig(**WIDTH, num_hidden_layers=8),
    }

    def predict(config, out) -> int | None:
        if not isinstance(config, BlockTransformerConfig):
            return None
        print("Block Transformer cache parts (bytes):", output_cache(out).memory_bytes())
        # the unpadded row has seen every token but the last generated one
        return block_transformer_prediction(config, 2, out.sequences.shape[1] - 1)

    rows = compare_caches(configs, prompt, predict, attention_mask=attention_mask, max_new_tokens=args.new_tokens)
    print(
        f"\nbatch 2, context {args.context} + {args.new_tokens} new tokens, d={WIDTH['hidden_size']}, 8 layers, ",
        end="",
    )
    print(f"{WIDTH['num_attention_heads']}q/{WIDTH['num_key_value_heads']}kv heads, fp32")
    print_cache_table(rows, 20)


if __name__ == "__main__":
    main()
