"""`hf-yoco` command line. Each sub-command lives in its own module, imported only when used.

A module listed in `COMMANDS` defines `add_arguments(parser)` and `run(args) -> int | None`; an entry
"module:name" uses `add_<name>_arguments` and `run_<name>` instead (several commands in one module).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ppl": ("hf_yoco.evaluation:ppl", "sliding-window perplexity of a text under any causal LM"),
    "niah": ("hf_yoco.evaluation:niah", "needle-in-a-haystack retrieval grid (JSON + heatmap)"),
    "lm-eval-task": ("hf_yoco.evaluation:lm_eval_task", "write a local lm-evaluation-harness task (YAML + JSONL)"),
    "bench": ("hf_yoco.bench", "memory and speed of YOCO / Block Transformer vs a same-size Llama"),
    "convert": ("hf_yoco.convert", "convert official YOCO / Block Transformer or Llama checkpoints to hf_yoco models"),
    "data": ("hf_yoco.data", "build the offline training corpus, tokenizer and packed blocks"),
    "train": ("hf_yoco.training", "train or fine-tune (full or LoRA) a model with the stock Trainer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-yoco", description="YOCO and Block Transformer tools for transformers.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module_name, _, prefix = module_name.partition(":")
        sub.set_defaults(_module=module_name, _run=f"run_{prefix}" if prefix else "run")
        module = importlib.import_module(module_name)
        getattr(module, f"add_{prefix}_arguments" if prefix else "add_arguments")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return getattr(importlib.import_module(args._module), args._run)(args) or 0


if __name__ == "__main__":
    sys.exit(main())
