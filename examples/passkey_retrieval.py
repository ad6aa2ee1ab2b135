"""Passkey retrieval: the global K/V at work.

A small YOCO with a sliding-window self-decoder and an attention-window-only model of the same size (Mistral-style
sliding window in every layer, same width, depth, heads and window) are trained on synthetic sequences

    <key> d1 d2 d3 d4  filler ... filler  <query> d1 d2 d3 d4

where the passkey sits further back than every window the window-only model can chain together
(receptive field: layers x (window - 1) + 1 tokens). Only the four answer digits are trained and scored. YOCO's
cross-decoder reads the one global K/V, which holds every position, so it can retrieve the key; the window-only
model cannot see it and stays at chance (10% per digit).

    python examples/passkey_retrieval.py              # ~4 minutes on a 2-core CPU
    python examples/passkey_retrieval.py --steps 50   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM

from hf_yoco import YocoConfig, YocoForCausalLM
from hf_yoco.training import fit_batches

DIGITS = 10  # token ids 0-9 are the digits
KEY, QUERY = 10, 11  # markers
FILLER_START = 12  # filler tokens 12 .. vocab-1
KEY_LENGTH = 4


def make_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences with the passkey at the start and the query at the end; labels only on the answer digits."""
    digits = torch.randint(0, DIGITS, (batch, KEY_LENGTH), generator=generator)
    filler_length = length - 2 * (KEY_LENGTH + 1)
    filler = torch.randint(FILLER_START, vocab, (batch, filler_length), generator=generator)
    key = torch.full((batch, 1), KEY)
    query = torch.full((batch, 1), QUERY)
    input_ids = torch.cat([key, digits, filler, query, digits], dim=1)  # [B, length]
    labels = torch.full_like(input_ids, -100)
    labels[:, -KEY_LENGTH:] = digits  # only the answer is trained / scored
    return input_ids, labels


@torch.no_grad()
def accuracy(model, length: int, vocab: int, samples: int = 256) -> dict[str, float]:
    """Teacher-forced accuracy on the answer digits: per digit and for whole keys."""
    model.eval()
    input_ids, labels = make_batch(samples, length, vocab, torch.Generator().manual_seed(1234))
    predictions = model(input_ids).logits[:, -KEY_LENGTH - 1 : -1].argmax(-1)  # logits at t predict t + 1
    correct = predictions == labels[:, -KEY_LENGTH:]
    return {"digit_accuracy": correct.float().mean().item(), "key_accuracy": correct.all(-1).float().mean().item()}


def train(model, steps: int, batch: int, length: int, vocab: int, lr: float) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    return fit_batches(model, lambda _step: make_batch(batch, length, vocab, generator), steps, lr, warmup_steps=20)


def build_models(hidden: int, layers: int, heads: int, window: int, vocab: int, length: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=length,
        sliding_window=window,
    )
    torch.manual_seed(0)
    yoco = YocoForCausalLM(YocoConfig(**common, self_decoder_type="sliding_window"))
    torch.manual_seed(0)
    window_only = MistralForCausalLM(MistralConfig(**common))
    return {"yoco-swa": yoco, "window-only": window_only}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=96, help="sequence length (passkey distance ~ length)")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", default="outputs/passkey.json")
    args = parser.parse_args(argv)
    receptive_field = args.layers * (args.window - 1) + 1
    distance = args.length - KEY_LENGTH - 1  # from the first key digit to the query
    if distance < receptive_field:
        raise SystemExit(f"--length too short: the passkey must be farther than {receptive_field} tokens")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = {"settings": vars(args), "receptive_field_window_only": receptive_field, "passkey_distance": distance}
    for name, model in build_models(
        args.hidden, args.layers, args.heads, args.window, args.vocab, args.length
    ).items():
        start = time.perf_counter()
        losses = train(model, args.steps, args.batch, args.length, args.vocab, args.lr)
        scores = accuracy(model, args.length, args.vocab)
        results[name] = {
            **scores,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "parameters": model.num_parameters(),
            "train_seconds": time.perf_counter() - start,
        }
        print(f"{name:12s} digit accuracy {scores['digit_accuracy']:.3f}  key accuracy {scores['key_accuracy']:.3f}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
