"""`hf-yoco` command line. Each sub-command lives in its own module, imported only when used.

A module listed in `COMMANDS` defines `add_arguments(parser)` and `run(args) -> int | None`; an entry
"module:name" uses `add_<name>_arguments` and `run_<name>` instead (several commands in one module).

A user mistake (a missing or wrong path, a bad flag value, an unknown play or corpus) prints one line saying what is
wrong and what to do, and exits with status 2; `--debug` (on any sub-command) shows the traceback instead. The
argument types below (`positive_int`, `fraction`, ...) give the flags their checks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "ppl": ("hf_yoco.evaluation:ppl", "sliding-window perplexity of a text under any causal LM"),
    "niah": ("hf_yoco.evaluation:niah", "needle-in-a-haystack retrieval grid (JSON + heatmap)"),
    "lm-eval-task": ("hf_yoco.evaluation:lm_eval_task", "write a local lm-evaluation-harness task (YAML + JSONL)"),
    "bench": ("hf_yoco.bench", "memory and speed of YOCO / Block Transformer vs a same-size Llama"),
    "convert": ("hf_yoco.convert", "convert official YOCO / Block Transformer or Llama checkpoints to hf_yoco models"),
    "data": ("hf_yoco.data", "build the offline training corpus, tokenizer and packed blocks"),
    "train": ("hf_yoco.training", "train or fine-tune (full or LoRA) a model with the stock Trainer"),
    "compare": ("hf_yoco.quality", "train Llama, YOCO and the Block Transformer on equal budgets and compare them"),
    "distill": ("hf_yoco.distill", "YOCO-fy a pretrained Llama-architecture model and distill it from the original"),
    "serve": (
        "hf_yoco.serving",
        "transformers' OpenAI-compatible server (`transformers serve`) for hf_yoco checkpoints",
    ),
}
EXIT_USAGE = 2
# What a user can get wrong: invalid values (ValueError and its subclasses, hf_yoco's CheckpointError among them) and
# paths (OSError: missing, of the wrong kind, unreadable). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `hf-yoco train: error: argument --max-steps: must be >= 1, got 0 (see --help)`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types ----------------------------------------------------------------------------------------------------


def _number(text: str, cast: type, kind: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0."""
    value = _number(text, float, "a number")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float, "a number")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def usage_error(message: str) -> NoReturn:
    """Raise the error a command reports as a user mistake (one line, exit 2)."""
    raise ValueError(message)


# -- entry point -------------------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="hf-yoco", description="YOCO and Block Transformer tools for transformers.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, parents=[common])
        module_name, _, prefix = module_name.partition(":")
        sub.set_defaults(_module=module_name, _run=f"run_{prefix}" if prefix else "run")
        module = importlib.import_module(module_name)
        getattr(module, f"add_{prefix}_arguments" if prefix else "add_arguments")(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not hasattr(args, "serve_args"):  # `serve` hands every option it does not know to transformers
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:
        args.serve_args = unknown + args.serve_args
    try:
        return getattr(importlib.import_module(args._module), args._run)(args) or 0
    except USER_ERRORS as error:
        if args.debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"hf-yoco {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
