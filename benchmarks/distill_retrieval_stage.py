"""Teach a distilled YOCO-fied SmolLM2 to retrieve through its global K/V: a short retrieval stage (experiment).

Beyond the self-decoder's window only the cross-decoder can find a needle, through the global K/V, and the
distillation shows it too few such needles to learn that. Long rows are expensive on a CPU, so this stage shrinks the
self-decoder's window while it trains (`--train-window`, 16 tokens): short rows (4-16 windows long) then put the
asked needle beyond the window, and a few thousand of them fit in half an hour. It trains what the distillation
trains (the global K/V, the cross-decoder's q/o projections and norms) with KL to the original on every token plus
cross-entropy on the answer, then scores needle retrieval at the training window and, with the real window
restored, perplexity and retrieval beyond it.

Measured on the distilled SmolLM2 (window 1024 + 4 sinks; 250 steps x 8 rows, 30 minutes on 2 cores): the answer
loss falls from 2.0 to ~0.3 and at the 16-token window the model now retrieves needles 200 tokens back (4/4; 400
back: 2/4; before the stage 0/4), so the cross-decoder can learn to read a needle from the global K/V. It does not
carry over to the real window (1600 / 3072 tokens: 0/4, 0/4) and costs perplexity (Tempest 47.6 -> 59.6, Persuasion
38.1 -> 44.1): the self-decoder's states at a 16-token window are not the ones it produces at 1024. A curriculum
that grows the window while training is the next thing to try.

    python benchmarks/distill_retrieval_stage.py --model outputs/smollm2-yoco/model \
        --output benchmarks/results/distill_smollm2/retrieval_stage.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_yoco.data import AUSTEN_NOVELS, build_austen_corpus, build_shakespeare_corpus, default_data_dir
from hf_yoco.distill import (
    HELD_OUT_NOVEL,
    HELD_OUT_PLAY,
    distillation_loss,
    evaluate,
    load_smollm2,
    retrieval,
    trainable_names,
)
from hf_yoco.evaluation import build_niah_prompt


@contextmanager
def self_decoder_window(model, window: int):
    """Give the self-decoder another sliding window for a while (the config and every attention module's copy)."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "sliding_window", None), int)]
    previous = model.config.sliding_window
    for holder in [model.config, *modules]:
        holder.sliding_window = window
    try:
        yield
    finally:
        for holder in [model.config, *modules]:
            holder.sliding_window = previous


def beyond_window_row(tokenizer, haystack_ids: list[int], window: int, rng: random.Random):
    """One needle prompt of 4-16 windows (1-2 needles), the asked needle more than `window` tokens before the
    question, with its answer; returns `(input_ids [1, T], answer_mask [1, T])`."""
    while True:
        length = rng.randint(4 * window, 16 * window)
        depth = rng.uniform(0.0, max(0.02, (length - window - 40) / length))
        prompt, answer, needles = build_niah_prompt(tokenizer, haystack_ids, length, depth, rng.randint(1, 2), rng)
        if len(prompt) - needles[0][2] > window + 4:  # the asked needle starts beyond the window
            answer_ids = tokenizer(f" {answer}.", add_special_tokens=False).input_ids
            input_ids = torch.tensor([prompt + answer_ids])
            answer_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            answer_mask[0, len(prompt) :] = True
            return input_ids, answer_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the distilled model folder (`<output-dir>/model`)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--rows-per-step", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--answer-weight", type=float, default=1.0)
    parser.add_argument("--train-window", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--retrieval-lengths", type=int, nargs="*", default=[1600, 3072])
    parser.add_argument("--retrieval-trials", type=int, default=4)
    parser.add_argument("--train-window-lengths", type=int, nargs="*", default=[200, 400],
                        help="needle prompt lengths scored at the training window")  # fmt: skip
    parser.add_argument("--save", help="save the trained model here")
    parser.add_argument("--output", help="write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    data_dir = Path(default_data_dir())
    teacher, tokenizer = load_smollm2()
    student = AutoModelForCausalLM.from_pretrained(args.model)
    trainable = set(trainable_names(student))
    for name, parameter in student.named_parameters():
        parameter.requires_grad_(name in trainable)
    novels = [n for n in AUSTEN_NOVELS if n != HELD_OUT_NOVEL]  # training text only
    haystack_ids = tokenizer(build_austen_corpus(novels, data_dir).read_text(), add_special_tokens=False).input_ids
    rng = random.Random(0)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    curve, start = [], time.perf_counter()
    student.train()
    with self_decoder_window(student, args.train_window):
        for step in range(args.steps):
            kls, answers = [], []
            for _ in range(args.rows_per_step):
                input_ids, answer_mask = beyond_window_row(tokenizer, haystack_ids, args.train_window, rng)
                with torch.no_grad():
                    teacher_logits = teacher(input_ids).logits  # [1, T, V]
                logits = student(input_ids).logits
                _, kl = distillation_loss(logits, teacher_logits, input_ids, 1.0, 1.0, 0.0)  # KL on every token
                answer = answer_mask[0, 1:]  # positions whose next token is part of the answer
                answer_loss = F.cross_entropy(logits[0, :-1][answer].float(), input_ids[0, 1:][answer])
                ((kl + args.answer_weight * answer_loss) / args.rows_per_step).backward()
                kls.append(kl.item())
                answers.append(answer_loss.item())
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            curve.append({"step": step, "kl": sum(kls) / len(kls), "answer_loss": sum(answers) / len(answers)})
            if step % 10 == 0:
                print(f"step {step}: KL {curve[-1]['kl']:.3f}, answer loss {curve[-1]['answer_loss']:.3f}", flush=True)
    train_seconds = time.perf_counter() - start
    student.eval()
    files = {HELD_OUT_PLAY: build_shakespeare_corpus(HELD_OUT_PLAY, data_dir),
             HELD_OUT_NOVEL: build_austen_corpus(HELD_OUT_NOVEL, data_dir)}  # fmt: skip
    haystack = files[HELD_OUT_NOVEL].read_text()
    with self_decoder_window(student, args.train_window):
        at_train_window = retrieval(student, tokenizer, haystack, args.train_window_lengths, args.retrieval_trials,
                                    False)  # fmt: skip
    texts = {name: tokenizer(path.read_text(), return_tensors="pt").input_ids[0][: args.eval_tokens]
             for name, path in files.items()}  # fmt: skip
    results = {"settings": vars(args), "sliding_window": student.config.sliding_window,
               "train_seconds": train_seconds, "rows": args.steps * args.rows_per_step,
               "curve": curve, "perplexity": evaluate(student, texts, 2048, False)}  # fmt: skip
    results["retrieval"] = {"needle_depth": 0.1, "trials": args.retrieval_trials,
                            "at_train_window": at_train_window,
                            "at_real_window": retrieval(student, tokenizer, haystack, args.retrieval_lengths,
                                                        args.retrieval_trials, False)}  # fmt: skip
    print(json.dumps({k: results[k] for k in ("perplexity", "retrieval")}, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))
    if args.save:
        student.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)


if __name__ == "__main__":
    main()
