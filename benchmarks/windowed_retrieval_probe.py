"""Where does SmolLM2 retrieve a needle from beyond the window? The original model with its first S layers limited to
the YOCO self-decoder's window (1024 keys plus 4 attention sinks) and every later layer keeping full attention over
its *own* keys and values.

A YOCO conversion with S self-decoder layers can at best match this: its cross layers read one shared K/V (an
approximation of their own), computed from the same windowed self-decoder output. So this probe bounds what training
the cross-decoder alone (the distillation, the retrieval stage) can reach: if retrieval beyond the window fails here,
the windowed lower layers themselves carry part of the original's retrieval, and the cross-decoder has to learn the
lookup anew rather than be calibrated into it.

    python benchmarks/windowed_retrieval_probe.py --output benchmarks/results/distill_smollm2/windowed_probe.json

Needle retrieval as `hf-yoco distill` scores it (depth 0.1, held-out Persuasion haystack, greedy answer).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_yoco.data import build_austen_corpus, default_data_dir
from hf_yoco.distill import HELD_OUT_NOVEL, load_smollm2, retrieval

IMPLEMENTATION = "hf_yoco_windowed_probe"


def windowed_attention(module, query, key, value, attention_mask, *, split: int, window: int, sinks: int, **kwargs):
    """SDPA with layers below `split` seeing only the last `window` keys and the first `sinks` (one unpadded row,
    keys at positions 0 .. N-1 as a dynamic cache holds them); the other layers keep the causal mask."""
    if query.shape[0] != 1 or (attention_mask is not None and attention_mask.dim() == 2 and not attention_mask.all()):
        raise ValueError("the windowed probe takes one unpadded sequence at a time")
    queries, keys = query.shape[2], key.shape[2]
    q_pos = torch.arange(keys - queries, keys, device=query.device)[:, None]  # [Q, 1]
    k_pos = torch.arange(keys, device=query.device)[None]  # [1, N]
    allowed = k_pos <= q_pos
    if module.layer_idx < split:
        allowed &= (q_pos - k_pos < window) | (k_pos < sinks)
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, allowed[None, None], is_causal=False, **kwargs)


@contextlib.contextmanager
def windowed_lower_layers(model, split: int, window: int, sinks: int) -> Iterator[None]:
    """Run `model` (a Llama-architecture causal LM) with its first `split` layers windowed; restores its attention
    implementation afterwards."""
    previous = model.config._attn_implementation

    def attention(*args, **kwargs):
        return windowed_attention(*args, split=split, window=window, sinks=sinks, **kwargs)

    AttentionInterface.register(IMPLEMENTATION, attention)
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def probe(model, tokenizer, haystack: str, splits: list[int], lengths: list[int], trials: int, window: int,
          sinks: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Needle accuracy per split (0: the original) and prompt length."""
    results = {}
    for split in splits:
        with windowed_lower_layers(model, split, window, sinks):
            results[str(split)] = retrieval(model, tokenizer, haystack, lengths, trials, False)
        print(f"first {split:2d} layers windowed: {results[str(split)]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, nargs="+", default=[0, 5, 10, 15, 20],
                        help="layers windowed (S); 0 is the original")  # fmt: skip
    parser.add_argument("--lengths", type=int, nargs="+", default=[1600, 3072], help="needle prompt lengths")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--output", help="write the JSON here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = load_smollm2()
    haystack = build_austen_corpus(HELD_OUT_NOVEL, Path(default_data_dir())).read_text()
    with torch.inference_mode():
        accuracy = probe(model.eval(), tokenizer, haystack, args.splits, args.lengths, args.trials, args.window,
                         args.sinks)  # fmt: skip
    results = {"model": "SmolLM2-135M-Instruct", "layers": model.config.num_hidden_layers, "window": args.window,
               "sinks": args.sinks, "needle_depth": 0.1, "trials": args.trials, "haystack": HELD_OUT_NOVEL,
               "accuracy_by_windowed_layers": accuracy, "seconds": round(time.perf_counter() - start)}  # fmt: skip
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
