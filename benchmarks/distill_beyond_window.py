"""Perplexity of a distilled YOCO-fied SmolLM2 at contexts beyond 2048 tokens, against the original.

`hf-yoco distill` scores 2048-token windows. This scores 4096-token windows (stride 2048) on the first 8192 tokens of
the same held-out texts: contexts four times the self-decoder's 1024-token window, where everything beyond it reaches
the cross-decoder only through the global K/V (and the self-decoder keeps only its attention sinks). It also runs
needle retrieval (depth 0.1) at lengths within and beyond the window, which `hf-yoco distill` scores at 3072/4096:

    python benchmarks/distill_beyond_window.py --model outputs/smollm2-yoco/model \
        --output benchmarks/results/distill_smollm2/beyond_window.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from hf_yoco.data import build_austen_corpus, build_shakespeare_corpus, default_data_dir
from hf_yoco.distill import HELD_OUT_NOVEL, HELD_OUT_PLAY, evaluate, load_smollm2, retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the distilled model folder (`<output-dir>/model`)")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192, help="held-out tokens per text")
    parser.add_argument("--retrieval-lengths", type=int, nargs="*", default=[900, 1600], help="needle prompt lengths")
    parser.add_argument("--retrieval-trials", type=int, default=4)
    parser.add_argument("--output", help="write the JSON here")
    args = parser.parse_args()
    teacher, tokenizer = load_smollm2()
    student = AutoModelForCausalLM.from_pretrained(args.model).eval()
    data_dir = Path(default_data_dir())
    files = {HELD_OUT_PLAY: build_shakespeare_corpus(HELD_OUT_PLAY, data_dir),
             HELD_OUT_NOVEL: build_austen_corpus(HELD_OUT_NOVEL, data_dir)}  # fmt: skip
    texts = {name: tokenizer(path.read_text(), return_tensors="pt").input_ids[0][: args.tokens]
             for name, path in files.items()}  # fmt: skip
    original, distilled = evaluate(teacher, texts, args.window, False), evaluate(student, texts, args.window, False)
    results = {"window": args.window, "stride": args.window // 2, "tokens": args.tokens,
               "sliding_window": student.config.sliding_window, "original": original, "distilled": distilled,
               "ratio": {name: distilled[name] / original[name] for name in texts}}  # fmt: skip
    haystack = files[HELD_OUT_NOVEL].read_text()
    results["retrieval"] = {
        "needle_depth": 0.1, "trials": args.retrieval_trials,
        "original": retrieval(teacher, tokenizer, haystack, args.retrieval_lengths, args.retrieval_trials, False),
        "distilled": retrieval(student, tokenizer, haystack, args.retrieval_lengths, args.retrieval_trials, False),
    }  # fmt: skip
    print(json.dumps(results, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
