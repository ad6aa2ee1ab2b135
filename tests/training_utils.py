"""Shared helpers for the training / PEFT / distributed tests: a cached Hamlet dataset and tiny CLI args."""

from __future__ import annotations

import argparse
from pathlib import Path

from hf_yoco import data as data_lib
from hf_yoco.training import parse_args

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"  # git-ignored; reused across runs
VOCAB = 512
BLOCK = 32

# (model alias, extra CLI flags) for the three architectures
VARIANTS = {
    "yoco_retention": ["--model", "yoco", "--self-decoder", "gated_retention"],
    "yoco_swa": ["--model", "yoco", "--self-decoder", "sliding_window", "--sliding-window", "8"],
    "block": ["--model", "block", "--block-length", "4"],
}


def hamlet(block_size: int = BLOCK):
    """(DatasetDict, tokenizer) for Hamlet with a 512-token BPE, packed into `block_size` tokens."""
    return data_lib.prepare_data("hamlet", DATA_DIR, "bpe", VOCAB, block_size, 0.05)


def tiny_args(output_dir: str | Path, variant: str = "yoco_retention", *extra: str) -> argparse.Namespace:
    """CLI args for a ~0.1M-parameter model on Hamlet: a few steps take a second or two on CPU."""
    argv = [
        "--data-dir", str(DATA_DIR), "--plays", "hamlet", "--vocab-size", str(VOCAB), "--block-size", str(BLOCK),
        "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
        "--output-dir", str(output_dir), "--batch-size", "4", "--max-steps", "4", "--eval-steps", "0",
        "--save-steps", "0", "--logging-steps", "1", "--max-train-samples", "64", "--max-eval-samples", "8",
        "--warmup-steps", "0", "--no-progress", "--no-eval-before", "--cpu",
    ]  # fmt: skip
    return parse_args(argv + VARIANTS[variant] + list(extra))
