"""Evaluation for any transformers causal LM (YOCO, Block Transformer, Llama, ...): perplexity and needle retrieval.

- `sliding_window_perplexity`: perplexity of a long text with overlapping windows, each window scoring only the
  tokens the previous one did not (every token is scored once, with up to `window - stride` tokens of context).
  Also exposed as an `evaluate` metric module (`evaluate.load(hf_yoco.evaluation.PERPLEXITY_METRIC)`) and as
  `hf-yoco ppl`.
- `needle_in_a_haystack`: single- or multi-needle retrieval over a grid of context lengths x depths, haystack from
  a real public-domain text (Jane Austen by default, see `hf_yoco.data.build_austen_corpus`); greedy answers scored
  by substring match; JSON + heatmap PNG. CLI: `hf-yoco niah`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import fraction, positive_int, usage_error

PERPLEXITY_METRIC = str(Path(__file__).with_name("metrics") / "sliding_window_perplexity.py")


@torch.no_grad()
def sliding_window_perplexity(
    model: torch.nn.Module, input_ids: torch.Tensor, window: int = 1024, stride: int = 512, progress: bool = False
) -> dict[str, float]:
    """Perplexity of the 1D token sequence `input_ids` under `model` (any causal LM taking `labels`).

    Returns `{"perplexity", "nll", "tokens"}`: `nll` is the mean negative log-likelihood (nats) over the
    `tokens = len(input_ids) - 1` predicted tokens.
    """
    if input_ids.ndim != 1:
        raise ValueError(f"`input_ids` must be 1D (one token sequence), got shape {tuple(input_ids.shape)}.")
    if not 0 < stride <= window:
        raise ValueError(f"`stride` must be in (0, window={window}], got {stride}.")
    if input_ids.numel() < 2:
        raise ValueError("`input_ids` needs at least 2 tokens.")
    device = next(model.parameters()).device
    total_nll, total_tokens, scored_until = 0.0, 0, 0
    starts = list(range(0, max(input_ids.numel() - window, 0) + stride, stride))
    for start in tqdm(starts, desc="perplexity", disable=not progress):
        end = min(start + window, input_ids.numel())
        chunk = input_ids[start:end][None].to(device)
        labels = chunk.clone()
        labels[:, : max(scored_until - start, 0)] = -100  # already scored by the previous window
        scored = int((labels[:, 1:] != -100).sum())
        if scored:
            total_nll += model(chunk, labels=labels, use_cache=False).loss.float().item() * scored
            total_tokens += scored
        scored_until = end
        if end == input_ids.numel():
            break
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens}


def text_perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    window: int = 1024,
    stride: int = 512,
    max_tokens: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """`sliding_window_perplexity` of `text` tokenized by `tokenizer` (only its first `max_tokens` tokens if given)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    return sliding_window_perplexity(model, ids, window, stride, progress)


# ---------------------------------------------------------------------------------------------------- NIAH

NEEDLE_KEYS = ("Kellynch", "Pemberley", "Hartfield", "Norland", "Mansfield", "Northanger", "Longbourn", "Uppercross")


def _needle(key: str, value: int) -> str:
    return f" The special magic number of {key} is {value}. "


def _question(key: str) -> str:
    return f"\nWhat is the special magic number of {key}? The special magic number of {key} is"


def score_answer(generated: str, expected: int) -> bool:
    """Substring match, as in the YOCO evaluation: the number must appear in the generated continuation."""
    return str(expected) in generated


def build_niah_prompt(
    tokenizer, haystack_ids: list[int], context_length: int, depth: float, num_needles: int, rng: random.Random
) -> tuple[list[int], int, list[tuple[str, int, int]]]:
    """A prompt of about `context_length` tokens with `num_needles` needles; returns (ids, answer, needles).

    The first needle (the one asked about) sits at `depth` (0 = start, 1 = end of the haystack); the others are spread
    at random depths. `needles` lists (key, value, token offset).
    """
    keys = rng.sample(NEEDLE_KEYS, num_needles)
    values = [rng.randint(1000, 9999) for _ in keys]
    needle_ids = [tokenizer(_needle(k, v), add_special_tokens=False).input_ids for k, v in zip(keys, values)]
    question_ids = tokenizer(_question(keys[0]), add_special_tokens=False).input_ids
    budget = context_length - len(question_ids) - sum(len(n) for n in needle_ids)
    if budget <= 0:
        raise ValueError(f"`context_length` {context_length} is too short for the needles and the question.")
    start = rng.randint(0, max(len(haystack_ids) - budget, 0))
    hay = list(haystack_ids[start : start + budget])
    depths = [depth] + [rng.random() for _ in keys[1:]]
    # Cut points in the original haystack; needles go in at their cut points, shallowest first.
    cuts = sorted((int(round(d * len(hay))), i) for i, d in enumerate(depths))
    pieces, offsets, previous = [], [None] * len(keys), 0
    for cut, i in cuts:
        pieces.extend(hay[previous:cut])
        offsets[i] = (keys[i], values[i], len(pieces))
        pieces.extend(needle_ids[i])
        previous = cut
    hay = pieces + hay[previous:]
    return hay + question_ids, values[0], offsets


@torch.no_grad()
def needle_in_a_haystack(
    model,
    tokenizer,
    haystack: str,
    context_lengths: list[int],
    depths: list[float],
    num_needles: int = 1,
    trials: int = 2,
    max_new_tokens: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the grid; returns `{"accuracy": [[...per depth] per length], "cells": [...], ...}`."""
    if not 1 <= num_needles <= len(NEEDLE_KEYS):
        raise ValueError(f"`num_needles` must be in [1, {len(NEEDLE_KEYS)}], got {num_needles}.")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"`depths` must lie in [0, 1], got {depths}.")
    rng = random.Random(seed)
    haystack_ids = tokenizer(haystack, add_special_tokens=False).input_ids
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cells, accuracy = [], []
    grid = [(length, depth) for length in context_lengths for depth in depths]
    bar = tqdm(total=len(grid) * trials, desc="niah", disable=not progress)
    for length in context_lengths:
        row = []
        for depth in depths:
            correct = 0
            for _ in range(trials):
                prompt, answer, needles = build_niah_prompt(tokenizer, haystack_ids, length, depth, num_needles, rng)
                ids = torch.tensor([prompt], device=device)
                output = model.generate(
                    ids,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    attention_mask=torch.ones_like(ids),
                )
                text = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
                hit = score_answer(text, answer)
                correct += hit
                cells.append({"length": length, "depth": depth, "answer": answer, "output": text, "correct": hit,
                              "prompt_tokens": len(prompt), "needles": needles})  # fmt: skip
                bar.update()
            row.append(correct / trials)
        accuracy.append(row)
    bar.close()
    return {
        "context_lengths": context_lengths,
        "depths": depths,
        "num_needles": num_needles,
        "trials": trials,
        "accuracy": accuracy,
        "mean_accuracy": sum(map(sum, accuracy)) / (len(context_lengths) * len(depths)),
        "cells": cells,
    }


def save_niah(results: dict, output_dir: str | Path, title: str = "needle in a haystack") -> None:
    """Write `niah.json` and the accuracy heatmap `niah.png` (depth x context length)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "niah.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.tensor(results["accuracy"]).T  # [depths, lengths]
    figure, axis = plt.subplots(figsize=(1.2 * len(results["context_lengths"]) + 2, 0.5 * len(results["depths"]) + 2))
    image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    axis.set_xticks(range(len(results["context_lengths"])), [str(n) for n in results["context_lengths"]])
    axis.set_yticks(range(len(results["depths"])), [f"{d:.0%}" for d in results["depths"]])
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("needle depth")
    axis.set_title(f"{title} ({results['num_needles']} needle(s), {results['trials']} trials)")
    for (y, x), value in zip([(y, x) for y in range(grid.shape[0]) for x in range(grid.shape[1])], grid.flatten()):
        axis.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8)
    figure.colorbar(image, ax=axis, label="accuracy")
    figure.tight_layout()
    figure.savefig(output_dir / "niah.png", dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------- CLI


def load_model_and_tokenizer(model_path: str, dtype: str = "float32"):
    """A saved causal LM (any type, hf_yoco's included) in eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_yoco  # noqa: F401  (registers the hf_yoco model types)
    from hf_yoco.checkpoints import check_model_folder

    check_model_folder(model_path, need_tokenizer=True)  # a clear error for a missing / wrong folder
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    return model, AutoTokenizer.from_pretrained(model_path)


TEXT_SOURCES = "a text file, 'austen', or 'shakespeare:<play>[,<play>...]'"


def _read_text(source: str, data_dir: str | None) -> str:
    from hf_yoco import data

    if source == "austen":
        return data.build_austen_corpus("all", data_dir).read_text()
    if source.startswith("shakespeare:"):
        return data.build_shakespeare_corpus(source.split(":", 1)[1], data_dir).read_text()
    if not Path(source).is_file():
        usage_error(f"text {source!r} is not a file; use {TEXT_SOURCES}")
    return Path(source).read_text()


def add_ppl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved model folder (any causal LM)")
    parser.add_argument("--text", default="shakespeare:the-tempest", help=TEXT_SOURCES)
    parser.add_argument("--window", type=positive_int, default=1024)
    parser.add_argument("--stride", type=positive_int, default=512, help="<= --window")
    parser.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--data-dir", help="where corpora are built (default: $HF_YOCO_DATA_DIR or ./data)")


def run_ppl(args: argparse.Namespace) -> int:
    if args.stride > args.window:
        usage_error(f"--stride {args.stride} must not exceed --window {args.window} (tokens would go unscored)")
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    text = _read_text(args.text, args.data_dir)
    result = text_perplexity(model, tokenizer, text, args.window, args.stride, args.max_tokens, progress=True)
    print(json.dumps({"model": args.model, "text": args.text, **result}, indent=2))
    return 0


def add_niah_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a saved model folder (any causal LM)")
    parser.add_argument("--haystack", default="austen", help=TEXT_SOURCES)
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--depths", type=fraction, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--needles", type=positive_int, default=1, help="needles per prompt (the first one is asked)")
    parser.add_argument("--trials", type=positive_int, default=2)
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--output-dir", default="outputs/niah")
    parser.add_argument("--data-dir", help="where corpora are built (default: $HF_YOCO_DATA_DIR or ./data)")


def run_niah(args: argparse.Namespace) -> int:
    model, tokenizer = load_model_and_tokenizer(args.model, args.dtype)
    results = needle_in_a_haystack(
        model, tokenizer, _read_text(args.haystack, args.data_dir), args.lengths, args.depths, args.needles,
        args.trials, args.max_new_tokens, args.seed,
    )  # fmt: skip
    results["model"] = args.model
    save_niah(results, args.output_dir, title=Path(args.model).name)
    print(f"mean accuracy {results['mean_accuracy']:.3f}; wrote {args.output_dir}/niah.json and niah.png")
    return 0


# ------------------------------------------------------------------------------------------ lm-evaluation-harness

LM_EVAL_TASK_TEMPLATE = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_lm_eval_task(text: str, output_dir: str | Path, name: str = "hf_yoco_ppl", max_docs: int = 100) -> Path:
    """Write a local lm-evaluation-harness task: `<name>.jsonl` (one paragraph per document) and `<name>.yaml`
    (rolling log-likelihood: word/byte perplexity, bits per byte). Run it with

        lm_eval --model hf --model_args pretrained=<model dir>,trust_remote_code=True,dtype=float32 \\
            --include_path <output_dir> --tasks <name> --device cpu

    Returns the task folder. No data comes from the Hub.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip().split()) >= 20][:max_docs]
    if not paragraphs:
        raise ValueError("`text` has no paragraph of 20 words or more to evaluate on.")
    data_file = output_dir / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    (output_dir / f"{name}.yaml").write_text(LM_EVAL_TASK_TEMPLATE.format(name=name, data_file=data_file.resolve()))
    return output_dir


def add_lm_eval_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text", default="shakespeare:the-tempest", help="a text file, 'austen', or 'shakespeare:<play>'"
    )
    parser.add_argument("--output-dir", default="outputs/lm_eval_task")
    parser.add_argument("--name", default="hf_yoco_ppl")
    parser.add_argument("--max-docs", type=positive_int, default=100)
    parser.add_argument("--data-dir", help="where corpora are built (default: $HF_YOCO_DATA_DIR or ./data)")


def run_lm_eval_task(args: argparse.Namespace) -> int:
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        usage_error(f"--output-dir {args.output_dir} is a file; choose a folder")
    folder = write_lm_eval_task(_read_text(args.text, args.data_dir), args.output_dir, args.name, args.max_docs)
    print(
        f"wrote {folder}/{args.name}.yaml and .jsonl; run:\n  lm_eval --model hf --model_args "
        f"pretrained=<model dir>,trust_remote_code=True,dtype=float32 --include_path {folder} --tasks {args.name} "
        "--device cpu"
    )
    return 0
