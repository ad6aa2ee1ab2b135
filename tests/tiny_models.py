"""Tiny configs of the three hf_yoco architectures, shared by the remote-code and transformers-compatibility tests."""

from __future__ import annotations

import hf_yoco

CONFIGS = {
    "yoco-swa": lambda: hf_yoco.YocoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, self_decoder_type="sliding_window", sliding_window=4,
    ),
    "yoco-gret": lambda: hf_yoco.YocoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        retention_chunk_size=4, official_numerics=True,
    ),
    "block-transformer": lambda: hf_yoco.BlockTransformerConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, block_length=4, num_block_decoder_layers=2,
        num_token_decoder_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ),
}  # fmt: skip
