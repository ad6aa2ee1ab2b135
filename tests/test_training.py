"""Trainer on real text: gradient accumulation (num_items_in_batch), activation checkpointing, resume, CLI."""

import json

import pytest
import torch
from training_utils import hamlet, tiny_args
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_yoco.cli import main as cli_main
from hf_yoco.training import build_model, fit_batches, train

pytestmark = pytest.mark.transformers_compat

VARIANTS = ["yoco_retention", "yoco_swa", "block"]


class GrabGrads(TrainerCallback):
    """Copy every gradient right before the (single) optimizer step."""

    def __init__(self):
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def masked_dataset():
    """Hamlet blocks whose labels mask a prefix of varying length, so micro-batches hold different token counts."""
    ds, tok = hamlet()

    def add_labels(row, idx):
        k = (idx * 11) % 29  # 0..28 masked positions out of 32
        return {"labels": [-100] * k + row["input_ids"][k:]}

    return ds["train"].select(range(64)).map(add_labels, with_indices=True), tok


def one_step(tmp_path, variant, dataset, tok, batch_size, grad_accum, checkpointing=False):
    args = tiny_args(tmp_path, variant)
    set_seed(0)
    model = build_model(args, tok)
    grab = GrabGrads()
    targs = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_grad_norm=0.0,  # no clipping: compare raw gradients
        activation_checkpointing=checkpointing,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=targs, train_dataset=dataset, data_collator=default_data_collator, callbacks=[grab]
    )
    trainer.train()
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch reaches the model's loss
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return grab.grads, loss, trainer.model


def assert_grads_close(a, b, rtol=1e-4, atol=1e-7):
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_accumulation_matches_big_batch(tmp_path, masked_dataset, variant):
    dataset, tok = masked_dataset
    g_big, loss_big, _ = one_step(tmp_path / "big", variant, dataset, tok, batch_size=8, grad_accum=1)
    g_acc, loss_acc, _ = one_step(tmp_path / "acc", variant, dataset, tok, batch_size=4, grad_accum=2)
    assert_grads_close(g_acc, g_big)
    assert loss_acc == pytest.approx(loss_big, rel=1e-4)

    # The data makes the check discriminative: averaging per-micro-batch mean losses (what happens when
    # num_items_in_batch is dropped) gives different gradients, since the micro-batches hold different token counts.
    set_seed(0)
    model = build_model(tiny_args(tmp_path, variant), tok)
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:8].tolist()
    batch = default_data_collator([dataset[i] for i in perm])
    for half in (slice(0, 4), slice(4, 8)):
        (model(input_ids=batch["input_ids"][half], labels=batch["labels"][half]).loss / 2).backward()
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert max((naive[n] - g_big[n]).abs().max().item() for n in naive) > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_checkpointing_same_loss_and_grads(tmp_path, masked_dataset, variant):
    dataset, tok = masked_dataset
    g_ref, loss_ref, _ = one_step(tmp_path / "ref", variant, dataset, tok, batch_size=4, grad_accum=1)
    g_ckpt, loss_ckpt, model = one_step(tmp_path / "ck", variant, dataset, tok, 4, 1, checkpointing=True)
    assert model.is_activation_checkpointing
    assert loss_ckpt == pytest.approx(loss_ref, rel=1e-5)
    assert_grads_close(g_ckpt, g_ref, rtol=1e-5, atol=1e-8)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True  # the checkpoint of this step is still written


@pytest.mark.parametrize("variant", ["yoco_retention", "block"])
def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, variant):
    flags = ["--max-steps", "6", "--save-steps", "3", "--learning-rate", "3e-3"]
    full = train(tiny_args(tmp_path / "full", variant, *flags))
    stopped = train(tiny_args(tmp_path / "cut", variant, *flags), callbacks=[StopAt(3)])
    assert stopped["global_step"] == 3 and (tmp_path / "cut" / "checkpoint-3").is_dir()
    assert stopped["param_checksum"] != pytest.approx(full["param_checksum"], rel=1e-6)
    resumed = train(tiny_args(tmp_path / "cut", variant, *flags, "--resume-from-checkpoint"))
    assert resumed["global_step"] == 6
    assert resumed["eval_loss_after"] == pytest.approx(full["eval_loss_after"], rel=1e-5)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "final").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_cli_train_learns(tmp_path):
    """`hf-yoco train` end to end: eval loss drops, checkpoints + final model + summary are written."""
    args = tiny_args(tmp_path, "yoco_swa").__dict__
    argv = [
        "train",
        "--data-dir",
        args["data_dir"],
        "--vocab-size",
        "512",
        "--block-size",
        "32",
        "--hidden-size",
        "32",
    ]
    argv += ["--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1", "--output-dir", str(tmp_path)]
    argv += ["--max-steps", "20", "--eval-steps", "10", "--save-steps", "10", "--learning-rate", "1e-2"]
    argv += ["--max-eval-samples", "16", "--no-progress", "--cpu", "--self-decoder", "sliding_window"]
    assert cli_main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["model_type"] == "hf_yoco"
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5
    assert (tmp_path / "checkpoint-20").is_dir() and (tmp_path / "final" / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert model.config.self_decoder_type == "sliding_window"
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "final" / "README.md")  # the model card carries the run's eval results
    metrics = {m["type"]: m["value"] for m in card.data.to_dict()["model-index"][0]["results"][0]["metrics"]}
    assert metrics["eval_loss"] == pytest.approx(summary["eval_loss_after"])
    assert "20 steps of the stock `Trainer`" in card.text


def test_fit_batches_warms_up_clips_and_learns_a_fixed_batch():
    """The small loop of the examples and the passkey study: a repeated batch is learnt, the first step runs at
    1/warmup of the rate, and each call of `next_batch` gets its step number."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    ids = torch.randint(0, 32, (2, 12))
    steps_seen, before = [], [p.detach().clone() for p in model.parameters()]
    first = fit_batches(model, lambda step: (steps_seen.append(step), (ids, ids))[1], 1, 1e-2, warmup_steps=10)
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(model.parameters(), before))
    assert moved <= 1e-3 + 1e-6  # Adam's first step moves each weight by at most the (warmed-up) rate: 1e-2 / 10
    losses = fit_batches(model, lambda step: (steps_seen.append(step), (ids, ids))[1], 60, 1e-2, warmup_steps=5)
    assert steps_seen == [0, *range(60)] and len(losses) == 60
    assert losses[-1] < 0.5 * first[0]
