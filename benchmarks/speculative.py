"""Speculative decoding: greedy vs prompt-lookup vs assisted decoding for YOCO, the Block Transformer and a Llama.

Every model's cache rolls back exactly (`cache.crop`), so transformers' assisted and prompt-lookup decoding return the
greedy tokens for all of them; this script measures what they buy. It uses the models `hf-yoco compare` trained
(equal non-embedding parameters, the same BPE tokenizer; `outputs/quality/`): the main-scale Llama, YOCO-SWA,
YOCO-gRet and Block Transformer are the targets, and the small-scale models the drafts.

    hf-yoco compare                                  # once (~1 hour on 2 CPU cores): trains the models
    python benchmarks/speculative.py                 # ~5 minutes -> benchmarks/results/speculative/
    python benchmarks/speculative.py --smoke         # random tiny models, seconds (CI)

Tasks, on held-out Shakespeare (the tail of the corpus, which no model trained on):
  - `quote`: a passage, a blank line, then its first words again; the model goes on quoting it (the repetitive
    case speculative decoding is for: editing or quoting text that is in the prompt),
  - `continue`: a passage to continue (free text; drafts rarely match).
Methods: `greedy`; `prompt_lookup` (`prompt_lookup_num_tokens=10`, n-grams from the prompt); `assisted` with the
small-scale Llama as the draft for every target; `assisted_same` with the small-scale model of the target's own
architecture. transformers' defaults otherwise (batch 1, the assistant's adaptive number of candidates).

Reported per target and method: new tokens/s (eager, this CPU, the median of `--repeats` passes over the prompts),
the speed-up over the same model's greedy decoding, tokens per target forward, the acceptance rate (accepted /
proposed candidate tokens) and whether every output equals greedy. Writes `speculative.json` and `speculative.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("llama", "yoco-swa", "yoco-gret", "block")
METHODS = ("greedy", "prompt_lookup", "assisted", "assisted_same")
TASKS = ("quote", "continue")
FULL = dict(prompts=6, passage=96, cue=8, new_tokens=96, repeats=3)
SMOKE = dict(prompts=2, passage=12, cue=3, new_tokens=8, repeats=1)


# ---------------------------------------------------------------------------------------------------- instruments


class Counters:
    """Target forwards, proposed and accepted candidate tokens of one `generate` call."""

    def __init__(self) -> None:
        self.forwards = self.proposed = self.accepted = 0


@contextlib.contextmanager
def counting(model: torch.nn.Module, counters: Counters) -> Iterator[None]:
    """Count the target's forwards and, through transformers' candidate generators, the candidates it verified and
    accepted (`get_candidates` returns the candidates; `update_candidate_strategy` is told how many matched)."""
    from transformers.generation import candidate_generator as cg

    def pre_hook(*_):
        counters.forwards += 1

    patched = []
    for cls in (cg.AssistedCandidateGenerator, cg.PromptLookupCandidateGenerator):
        get, update = cls.get_candidates, cls.update_candidate_strategy

        def get_candidates(self, input_ids, *args, _get=get, **kwargs):
            candidates, logits = _get(self, input_ids, *args, **kwargs)
            counters.proposed += candidates.shape[1] - input_ids.shape[1]
            return candidates, logits

        def update_candidate_strategy(self, input_ids, scores, num_matches, _update=update):
            counters.accepted += int(num_matches)
            return _update(self, input_ids, scores, num_matches)

        patched.append((cls, get, update))
        cls.get_candidates, cls.update_candidate_strategy = get_candidates, update_candidate_strategy
    handle = model.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        for cls, get, update in patched:
            cls.get_candidates, cls.update_candidate_strategy = get, update


# ------------------------------------------------------------------------------------------------ models and data


def trained_models(models_dir: Path) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """(targets, drafts, tokenizer) from `hf-yoco compare`'s output folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_yoco  # noqa: F401  (registers the model types)

    found = lambda scale, name: (models_dir / scale / name / "config.json").is_file()  # noqa: E731
    missing = [f"main/{name}" for name in TARGETS if not found("main", name)]
    missing += [] if found("small", "llama") else ["small/llama"]
    if missing:
        raise SystemExit(f"error: --models-dir {models_dir} lacks {', '.join(missing)}; run `hf-yoco compare` first "
                         "(it trains and saves them), or pass --smoke")  # fmt: skip
    load = lambda scale, name: AutoModelForCausalLM.from_pretrained(models_dir / scale / name).eval()  # noqa: E731
    targets = {name: load("main", name) for name in TARGETS}
    # same-architecture drafts where the study trained them (`assisted_same` is skipped for the others)
    drafts = {name: load("small", name) for name in TARGETS if found("small", name)}
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "main" / "llama")
    if any(model.config.vocab_size != len(tokenizer) for model in [*targets.values(), *drafts.values()]):
        raise SystemExit(f"error: the models in {models_dir} do not share one tokenizer; retrain with hf-yoco compare")
    return targets, drafts, tokenizer


def random_models(vocab_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tiny random targets and drafts (for `--smoke`: the machinery runs, the numbers mean nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_yoco

    def build(name: str, hidden: int, layers: int):
        sizes = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=2,
                     num_key_value_heads=1, pad_token_id=0, max_position_embeddings=512)  # fmt: skip
        if name == "block":
            config = hf_yoco.BlockTransformerConfig(**sizes, block_length=4, num_block_decoder_layers=layers // 2,
                                                    num_token_decoder_layers=layers // 2)  # fmt: skip
            return hf_yoco.BlockTransformerForCausalLM(config).eval()
        sizes["num_hidden_layers"] = layers
        if name == "llama":
            return LlamaForCausalLM(LlamaConfig(**sizes)).eval()
        self_decoder = {"self_decoder_type": "sliding_window", "sliding_window": 8} if name == "yoco-swa" else {
            "self_decoder_type": "gated_retention", "retention_chunk_size": 8}  # fmt: skip
        return hf_yoco.YocoForCausalLM(hf_yoco.YocoConfig(**sizes, **self_decoder)).eval()

    torch.manual_seed(0)
    return {name: build(name, 32, 4) for name in TARGETS}, {name: build(name, 16, 2) for name in TARGETS}


def held_out_passages(tokenizer, data_dir: Path, settings: dict[str, int], max_chars: int = 0) -> list[list[int]]:
    """`prompts` disjoint passages of `passage + new_tokens` tokens from the last 5% of the Shakespeare corpus."""
    from hf_yoco import data

    path = data.build_shakespeare_corpus("all", data_dir)
    text = path.read_text()[: max_chars or None]
    ids = tokenizer(text[int(len(text) * 0.95) :], add_special_tokens=False)["input_ids"]
    span = settings["passage"] + settings["new_tokens"]
    if len(ids) < settings["prompts"] * span:
        raise SystemExit(f"error: the held-out text has {len(ids)} tokens, fewer than --prompts x {span}")
    stride = len(ids) // settings["prompts"]
    return [ids[i * stride : i * stride + span] for i in range(settings["prompts"])]


def task_prompts(
    task: str, passages: list[list[int]], settings: dict[str, int], newline: list[int]
) -> list[list[int]]:
    """quote: passage + blank line + its first `cue` tokens; continue: the passage alone."""
    if task == "quote":
        return [p[: settings["passage"]] + newline + p[: settings["cue"]] for p in passages]
    return [p[: settings["passage"]] for p in passages]


# -------------------------------------------------------------------------------------------------------- measure


def method_kwargs(method: str, name: str, drafts: dict[str, Any]) -> dict[str, Any]:
    if method == "prompt_lookup":
        return {"prompt_lookup_num_tokens": 10}
    if method == "assisted":
        return {"assistant_model": drafts["llama"]}
    if method == "assisted_same":
        return {"assistant_model": drafts[name]}
    return {}


@torch.no_grad()
def measure(name: str, model, drafts: dict[str, Any], prompts: list[list[int]], settings: dict[str, int]) -> dict:
    """One row per method: tokens/s, tokens per target forward, acceptance, equality with greedy."""
    new = settings["new_tokens"]
    common = dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=True)
    rows, greedy_outputs = {}, []
    for method in METHODS:
        if method == "assisted_same" and name not in drafts:
            continue  # no small-scale model of this architecture
        kwargs = {**common, **method_kwargs(method, name, drafts)}
        model.generate(torch.tensor([prompts[0][:8]]), **{**kwargs, "max_new_tokens": 4})
        passes, counters, outputs = [], Counters(), []
        for repeat in range(settings["repeats"]):
            start = time.perf_counter()
            for prompt in prompts:
                if repeat == 0:
                    with counting(model, counters):
                        out = model.generate(torch.tensor([prompt]), **kwargs)
                    outputs.append(out[0, len(prompt) :].tolist())
                else:
                    model.generate(torch.tensor([prompt]), **kwargs)
            passes.append(time.perf_counter() - start)
        if method == "greedy":
            greedy_outputs = outputs
        tokens = new * len(prompts)
        rows[method] = {
            "tokens_per_s": tokens / statistics.median(passes),
            "tokens_per_forward": tokens / counters.forwards,
            "proposed": counters.proposed,
            "accepted": counters.accepted,
            "acceptance": counters.accepted / counters.proposed if counters.proposed else None,
            "equals_greedy": outputs == greedy_outputs,
        }
    for row in rows.values():
        row["speedup"] = row["tokens_per_s"] / rows["greedy"]["tokens_per_s"]
    return rows


def run(settings: dict[str, int], models_dir: Path, data_dir: Path, smoke: bool, targets_wanted: list[str]) -> dict:
    from hf_yoco import data

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if smoke:
        files = [data.build_shakespeare_corpus("all", data_dir)]
        tokenizer = data.get_tokenizer("bpe", files, data_dir, 300)
        targets, drafts = random_models(len(tokenizer))
    else:
        targets, drafts, tokenizer = trained_models(models_dir)
    passages = held_out_passages(tokenizer, data_dir, settings, max_chars=200_000 if smoke else 0)
    newline = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    results: dict[str, Any] = {"settings": settings, "smoke": smoke, "models_dir": str(models_dir), "results": {},
                               "parameters": {n: m.num_parameters() for n, m in targets.items()},
                               "draft_parameters": {n: m.num_parameters() for n, m in drafts.items()}}  # fmt: skip
    for task in TASKS:
        prompts = task_prompts(task, passages, settings, newline)
        for name in targets_wanted:
            print(f"== {task} / {name}", flush=True)
            results["results"].setdefault(task, {})[name] = measure(name, targets[name], drafts, prompts, settings)
    return results


# -------------------------------------------------------------------------------------------------------- reports


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Speculative decoding: greedy vs prompt lookup vs assisted (batch 1, eager, CPU)",
        "",
        f"{s['prompts']} held-out Shakespeare passages of {s['passage']} tokens, {s['new_tokens']} new tokens each, "
        f"median of {s['repeats']} passes. `quote`: the passage, a blank line and its first {s['cue']} tokens (the "
        "model goes on quoting); `continue`: free continuation. Drafts: the small-scale Llama (`assisted`) or the "
        "small-scale model of the target's architecture (`assisted_same`). tokens/fwd: new tokens per target "
        "forward; acceptance: accepted / proposed candidates; exact: every output equals greedy.",
        "",
    ]
    if results["smoke"]:
        lines += ["**Smoke run: random tiny models; the numbers mean nothing.**", ""]
    for task, per_model in results["results"].items():
        lines += [f"## {task}", "", "| model | method | tokens/s | speed-up | tokens/fwd | acceptance | exact |",
                  "|---|---|---:|---:|---:|---:|:-:|"]  # fmt: skip
        for name, rows in per_model.items():
            for method, row in rows.items():
                acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
                lines.append(f"| {name} | {method} | {row['tokens_per_s']:.0f} | {row['speedup']:.2f}x | "
                             f"{row['tokens_per_forward']:.2f} | {acceptance} | "
                             f"{'yes' if row['equals_greedy'] else '**no**'} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="random tiny models, seconds (CI)")
    parser.add_argument("--models-dir", default="outputs/quality", help="hf-yoco compare's trained models")
    parser.add_argument("--data-dir", default=None, help="corpora and tokenizers (default: data/)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/speculative[-smoke])")
    parser.add_argument("--models", nargs="+", choices=TARGETS, default=list(TARGETS), help="targets to measure")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    from hf_yoco import data

    settings = dict(SMOKE if args.smoke else FULL)
    for key in FULL:
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
            settings[key] = value
    if settings["cue"] > settings["passage"]:
        parser.error(f"--cue ({settings['cue']}) must not exceed --passage ({settings['passage']})")
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("speculative-smoke" if args.smoke else "speculative"))
    results = run(settings, Path(args.models_dir), Path(args.data_dir or data.default_data_dir()), args.smoke,
                  args.models)  # fmt: skip
    report = markdown(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speculative.json").write_text(json.dumps(results, indent=1))
    (out / "speculative.md").write_text(report + "\n")
    print(report)
    print(f"wrote {out}/speculative.json and speculative.md")
    inexact = [f"{task}/{name}/{method}" for task, per_model in results["results"].items()
               for name, rows in per_model.items() for method, row in rows.items() if not row["equals_greedy"]]  # fmt: skip
    if inexact:
        print(f"error: outputs differ from greedy: {', '.join(inexact)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
