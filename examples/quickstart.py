"""Quickstart: build small YOCO models, generate with stock `generate()`, and compare KV-cache bytes with a Llama.

    python examples/quickstart.py                     # ~10 s on a 2-core CPU
    python examples/quickstart.py --context 8192      # the gap grows with the context

Both YOCO variants (sliding-window and gated-retention self-decoder) and a `LlamaForCausalLM` of the same width,
depth and heads get the same random prompt; the table shows the bytes each cache holds after generation, measured
from the cache tensors, and the arithmetic prediction for YOCO.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_yoco  # noqa: F401  (registers "hf_yoco" with the Auto classes)
from hf_yoco import YocoConfig, output_cache, yoco_cache_bytes
from hf_yoco.bench import cache_bytes

COMMON = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=16384,
)


def compare_caches(configs: dict, prompt: torch.Tensor, predict, **generate_kwargs) -> list[tuple]:
    """Greedy `generate()` with a fresh model per config (the same-size Llama last); one row per model:
    (name, cache bytes, `predict(config, output)` (bytes or None), seconds, last tokens of row 0)."""
    rows = []
    for name, config in configs.items():
        model = AutoModelForCausalLM.from_config(config).eval()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                prompt, do_sample=False, pad_token_id=0, return_dict_in_generate=True, **generate_kwargs
            )
        seconds = time.perf_counter() - start
        predicted = predict(config, out)
        rows.append((name, cache_bytes(output_cache(out)), predicted, seconds, out.sequences[0, -8:].tolist()))
    return rows


def print_cache_table(rows: list[tuple], name_width: int) -> None:
    """The rows of `compare_caches`, with each cache's size against the Llama's (the last row)."""
    llama_bytes = rows[-1][1]
    print(f"{'model':<{name_width}}{'cache MiB':>11}{'predicted':>11}{'vs Llama':>10}{'generate s':>12}  last tokens")
    for name, size, predicted, seconds, tail in rows:
        predicted_text = f"{predicted / 2**20:.2f}" if predicted else "-"
        print(
            f"{name:<{name_width}}{size / 2**20:>11.2f}{predicted_text:>11}{llama_bytes / size:>9.1f}x"
            f"{seconds:>12.2f}  {tail}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=2048, help="prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--window", type=int, default=256, help="sliding window of the SWA variant")
    args = parser.parse_args()
    torch.manual_seed(0)
    prompt = torch.randint(3, COMMON["vocab_size"], (1, args.context))

    configs = {
        "YOCO (sliding window)": YocoConfig(**COMMON, self_decoder_type="sliding_window", sliding_window=args.window),
        "YOCO (gated retention)": YocoConfig(**COMMON, self_decoder_type="gated_retention"),
        "Llama": LlamaConfig(**COMMON),
    }
    rows = compare_caches(
        configs,
        prompt,
        lambda config, out: (
            # the last generated token never went through the model: the cache holds one position less
            yoco_cache_bytes(config, out.sequences.shape[1] - 1)["total"] if isinstance(config, YocoConfig) else None
        ),
        max_new_tokens=args.new_tokens,
    )
    print(f"\ncontext {args.context} + {args.new_tokens} new tokens, d={COMMON['hidden_size']}, ", end="")
    print(
        f"{COMMON['num_hidden_layers']} layers, {COMMON['num_attention_heads']}q/{COMMON['num_key_value_heads']}kv heads, fp32"
    )
    print_cache_table(rows, 24)


if __name__ == "__main__":
    main()
