"""Teach a distilled YOCO-fied SmolLM2 to retrieve beyond its window: the retrieval stage on cached self-decoder
states (`hf_yoco.distill.retrieval_stage`).

Beyond the self-decoder's window only the cross-decoder reaches a needle, through the global K/V, and learning that
takes thousands of long prompts. The self-decoder is frozen, so each prompt's self-decoder output is computed once
(`needle_rows`: 4 needles per haystack of 1536-3584 Austen tokens, each needle's question continuing the cached
haystack) and every training step then runs only the global K/V and the cross-decoder, at the answer's positions and
at 32 text positions whose KL to the model before the stage holds its perplexity (with `--text-blocks`, also at
blocks of every training text). The defaults are the recipe of `hf-yoco distill --retrieval-stage-steps`:

    python benchmarks/distill_retrieval_stage.py --model outputs/smollm2-yoco/model \
        --rows-dir outputs/needle_rows --output-dir outputs/retrieval_stage

`benchmarks/results/distill_smollm2/retrieval_stage_text_kl/` (that recipe on the distilled model, after `hf-yoco
distill --output-dir outputs/smollm2-yoco`; `retrieval_stage_text_kl15/`: the same with `--kl-weight 1.5`):

    python benchmarks/distill_retrieval_stage.py --model outputs/smollm2-yoco/model --rows-dir outputs/att_rows \
        --prompts 200 --steps 300 --eval-every 60 --kl-weight 2 --text-blocks 16 --retrieval-lengths 1600 3072 4096 \
        --retrieval-trials 8 --output-dir benchmarks/results/distill_smollm2/retrieval_stage_text_kl

The earlier runs, each with the KL on the haystacks only (`--kl-weight 1 --text-blocks 0`).

`benchmarks/results/distill_smollm2/retrieval_stage/` (attention distillation on the calibrated model):

    python benchmarks/distill_retrieval_stage.py --model calibrated --rows-dir outputs/att_rows --prompts 60 \
        --steps 100 --eval-every 20 --learning-rate 3e-4 --attention-weight 1 --key-fraction 1 --key-curriculum 0 \
        --pointer-weight 0 --kl-weight 1 --text-blocks 0 --output-dir benchmarks/results/distill_smollm2/retrieval_stage

`benchmarks/results/distill_smollm2/retrieval_stage_200/` (the same with 200 haystacks; the first 60 are shared):

    python benchmarks/distill_retrieval_stage.py --model calibrated --rows-dir outputs/att_rows --prompts 200 \
        --steps 200 --eval-every 40 --learning-rate 3e-4 --attention-weight 1 --key-fraction 1 --key-curriculum 0 \
        --pointer-weight 0 --kl-weight 1 --text-blocks 0 \
        --output-dir benchmarks/results/distill_smollm2/retrieval_stage_200

`benchmarks/results/distill_smollm2/retrieval_stage_pointer/` (the same rows, plus the pointer loss on 8 retrieval
heads; the first run whose held-out answers beyond the window rise, 0 -> 8/30):

    python benchmarks/distill_retrieval_stage.py --model calibrated --rows-dir outputs/att_rows --prompts 200 \
        --steps 360 --eval-every 60 --learning-rate 3e-4 --attention-weight 1 --pointer-weight 2 --pointer-heads 8 \
        --key-fraction 1 --key-curriculum 0 --kl-weight 1 --text-blocks 0 \
        --output-dir benchmarks/results/distill_smollm2/retrieval_stage_pointer

The self-decoder is frozen by distillation too, so the same rows serve a distilled model (the script checks that the
cached states are that model's). `benchmarks/results/distill_smollm2/retrieval_stage_distilled/` (after `hf-yoco distill
--output-dir outputs/smollm2-yoco`):

    python benchmarks/distill_retrieval_stage.py --model outputs/smollm2-yoco/model --rows-dir outputs/att_rows \
        --prompts 200 --steps 300 --eval-every 60 --learning-rate 3e-4 --attention-weight 1 --pointer-weight 2 \
        --pointer-heads 8 --key-fraction 1 --key-curriculum 0 --retrieval-lengths 1600 3072 4096 --kl-weight 1 \
        --text-blocks 0 --output-dir benchmarks/results/distill_smollm2/retrieval_stage_distilled

Writes `retrieval_stage.json` (settings, curve, answer accuracy within / beyond the window before and after, per
answer token beyond it, perplexity and needle retrieval before and after, and the original's when it is loaded),
`retrieval_stage.png` and `MODEL_CARD.md`; `--save DIR` keeps the model with that card.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_yoco.data import AUSTEN_NOVELS, build_austen_corpus, build_shakespeare_corpus, default_data_dir
from hf_yoco.distill import (
    HELD_OUT_NOVEL,
    HELD_OUT_PLAY,
    AttentionTargets,
    NeedleRow,
    answer_accuracy,
    answer_predictions,
    calibrate,
    default_self_decoder_layers,
    evaluate,
    load_smollm2,
    needle_rows,
    retrieval,
    retrieval_stage,
    self_decoder_states,
    smollm2_corpora,
    text_block_states,
    train_only_what_distillation_trains,
)


def save_rows(rows: list[NeedleRow], path: Path) -> None:
    """Rows as safetensors; the questions of one haystack share its states."""
    tensors, prompts = {}, {}
    for index, row in enumerate(rows):
        prompt = prompts.setdefault(row.prompt_states.data_ptr(), len(prompts))
        tensors[f"prompt.{prompt}"] = row.prompt_states.contiguous()
        tensors[f"row.{index}.input_ids"] = row.input_ids
        tensors[f"row.{index}.question_states"] = row.question_states.contiguous()
        tensors[f"row.{index}.meta"] = torch.tensor([prompt, row.answer_start, row.distance])
        if row.attention is not None:
            tensors[f"row.{index}.attention_indices"] = row.attention.indices.contiguous()
            tensors[f"row.{index}.attention_probs"] = row.attention.probs.contiguous()
    save_file(tensors, str(path))


def load_rows(path: Path) -> list[NeedleRow]:
    tensors = load_file(str(path))
    rows = []
    for index in range(sum(1 for name in tensors if name.endswith(".meta"))):
        prompt, answer_start, distance = tensors[f"row.{index}.meta"].tolist()
        attention = None
        if f"row.{index}.attention_indices" in tensors:
            attention = AttentionTargets(tensors[f"row.{index}.attention_indices"],
                                         tensors[f"row.{index}.attention_probs"])  # fmt: skip
        rows.append(NeedleRow(tensors[f"row.{index}.input_ids"], tensors[f"prompt.{prompt}"],
                              tensors[f"row.{index}.question_states"], answer_start, distance, attention))  # fmt: skip
    return rows


def cached_rows(path: Path, build, attention: bool) -> list[NeedleRow]:
    """The rows saved at `path`, built (and saved) when absent; with `attention`, they must hold the original's."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_rows(build(), path)
    rows = load_rows(path)
    if attention and any(row.attention is None for row in rows):
        raise SystemExit(f"{path} was built without the original's attention: --attention-weight needs another "
                         "--rows-dir")  # fmt: skip
    return rows


def calibrated_smollm2(data_dir: Path):
    """SmolLM2-135M converted and calibrated as `hf-yoco distill` does by default (no training), its tokenizer, and
    the original."""
    from hf_yoco.convert import yocofy_llama
    from hf_yoco.data import build_lm_dataset

    teacher, tokenizer = load_smollm2()
    student = yocofy_llama(
        teacher,
        "sliding_window",
        1024,
        attention_sink_tokens=4,
        num_self_decoder_layers=default_self_decoder_layers(teacher.config.num_hidden_layers),
    )
    dataset = build_lm_dataset(smollm2_corpora(data_dir)[0], tokenizer, block_size=2048, eval_fraction=0.02)
    calibrate(teacher, student, dataset["train"], 16384)
    return student.eval(), tokenizer, teacher


def token_accuracy(model, rows: list[NeedleRow]) -> list[float]:
    """Share of `rows` whose answer token at each position (" ", the 4 digits, ".") the model predicts (greedy,
    teacher-forced): where a copy slips. Over the shortest answer's length."""
    length = min(len(row.input_ids) - row.answer_start for row in rows)
    right = sum((answer_predictions(model, row) == row.input_ids[row.answer_start :])[:length].float() for row in rows)
    return (right / len(rows)).tolist()


def split_accuracy(model, rows: list[NeedleRow]) -> dict[str, float]:
    window = model.config.sliding_window
    beyond = [row for row in rows if row.distance > window]
    within = [row for row in rows if row.distance <= window]
    return {"beyond_window": answer_accuracy(model, beyond), "within_window": answer_accuracy(model, within),
            "beyond_rows": len(beyond), "within_rows": len(within),
            "beyond_window_by_answer_token": token_accuracy(model, beyond) if beyond else []}  # fmt: skip


def plot(curve: list[dict], window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["answer_loss"]) for e in curve if "answer_loss" in e]
    held = [(e["step"], e["eval_answer_accuracy"]) for e in curve if "eval_answer_accuracy" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), color="tab:blue", alpha=0.6, label="answer loss (training rows)")
    ax.set_xlabel("step")
    ax.set_ylabel("answer cross-entropy")
    other = ax.twinx()
    other.plot(*zip(*held), color="tab:red", marker="o", label="held-out answer accuracy")
    other.set_ylabel("held-out answers right (Persuasion)")
    other.set_ylim(0, 1)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.88), fontsize=8)
    ax.set_title(f"retrieval stage, window {window}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def model_card(student, results: dict, args: argparse.Namespace):
    """The card of the model after the stage (`hf_yoco.hub.create_model_card`): perplexity and needle retrieval
    before and after it (and the original's, when it was loaded), and how the stage trained."""
    from hf_yoco.hub import create_model_card

    eval_results = {f"perplexity ({name}), before the retrieval stage": value
                    for name, value in results["perplexity_before"].items()}  # fmt: skip
    eval_results |= {f"perplexity ({name}), after": value for name, value in results["perplexity"].items()}
    for when in ("original", "before", "after"):
        for length, accuracy in results["retrieval"].get(when, {}).items():
            eval_results[f"needle retrieval, {length} tokens, depth 0.1 ({when})"] = accuracy
    losses = ["answer cross-entropy", f"{args.kl_weight} x KL to the model before the stage at "
              f"{args.text_positions} text positions per row"]  # fmt: skip
    if args.text_blocks:
        losses.append(f"the same KL at {args.rows_per_step * args.text_positions} positions of one of "
                      f"{args.text_blocks} blocks of {args.text_length} tokens per training text (Shakespeare, "
                      "Austen) per step")  # fmt: skip
    if args.attention_weight:
        losses.append(f"{args.attention_weight} x attention distillation (the original's cross-layer attention)")
    if args.pointer_weight:
        losses.append(f"{args.pointer_weight} x the pointer loss on {args.pointer_heads} retrieval heads")
    source = "SmolLM2 converted and calibrated" if args.model == "calibrated" else f"`{args.model}`"
    summary = (
        f"{source}, then the retrieval stage of `benchmarks/distill_retrieval_stage.py`: {args.steps} steps of "
        f"{args.rows_per_step} needle rows (of {results['training_rows']} from {results['training_prompts']} Austen "
        f"haystacks of {args.lengths[0]}-{args.lengths[1]} tokens, held-out novel excluded), lr {args.learning_rate}; "
        f"loss: {', '.join(losses)}. Only the global K/V and the cross layers' q/o and norms train, on the frozen "
        f"self-decoder's cached output. Held-out answers (Persuasion) beyond the window: "
        f"{results['answer_accuracy_before']['beyond_window']:.2f} -> "
        f"{results['answer_accuracy_after']['beyond_window']:.2f}."
    )
    return create_model_card(
        student, description="A YOCO-fied SmolLM2-135M taught to retrieve beyond its self-decoder's window.",
        base_model=args.base_model, license="apache-2.0", eval_results=eval_results,
        eval_dataset=f"held out: {', '.join(results['perplexity'])} ({args.eval_tokens} tokens each); needles in "
        f"{HELD_OUT_NOVEL}", training_summary=summary, tags=["distillation", "yoco-fied"],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="the distilled model folder (`<output-dir>/model`), or `calibrated`: SmolLM2 converted "
                        "and calibrated as `hf-yoco distill` starts (minutes)")  # fmt: skip
    parser.add_argument("--rows-dir", required=True, help="cache of the needle rows (built when absent)")
    parser.add_argument("--prompts", type=int, default=240, help="training haystacks (4 rows each)")
    parser.add_argument("--eval-prompts", type=int, default=12, help="held-out haystacks (Persuasion)")
    parser.add_argument("--lengths", type=int, nargs=2, default=[1536, 3584])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows-per-step", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--text-positions", type=int, default=32)
    parser.add_argument("--kl-weight", type=float, default=2.0)
    parser.add_argument("--text-blocks", type=int, default=16,
                        help="blocks per training text (Shakespeare, Austen) whose KL each step also takes, in "
                        "turn (0: the haystacks' text positions only)")  # fmt: skip
    parser.add_argument("--text-length", type=int, default=2048, help="tokens per text block")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--key-fraction", type=float, default=1.0, help="share of haystack keys the answer first sees")
    parser.add_argument("--key-curriculum", type=float, default=0.0, help="share of the steps it grows to 1 over")
    parser.add_argument("--attention-weight", type=float, default=1.0,
                        help="weight of the attention distillation (the original's cross-layer attention at the "
                        "answer; the rows then hold it, the original runs over each haystack once)")  # fmt: skip
    parser.add_argument("--attention-top-k", type=int, default=32, help="keys kept per head of the original's")
    parser.add_argument("--pointer-weight", type=float, default=2.0,
                        help="weight of the pointer loss (the retrieval heads pushed to attend to the needle token "
                        "each answer position copies)")  # fmt: skip
    parser.add_argument("--pointer-heads", type=int, default=8, help="retrieval heads the pointer loss trains")
    parser.add_argument("--beyond-only", action="store_true", help="train on rows with the needle beyond the window")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--retrieval-lengths", type=int, nargs="*", default=[900, 1600, 3072, 4096])
    parser.add_argument("--retrieval-trials", type=int, default=4)
    parser.add_argument("--save", help="save the trained model here (with its card)")
    parser.add_argument("--base-model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="the card's base model")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args()
    if args.key_fraction < 1 and not args.key_curriculum:
        parser.error(f"--key-fraction {args.key_fraction} below 1 needs --key-curriculum above 0")
    torch.manual_seed(0)
    data_dir = Path(default_data_dir())
    teacher = None
    if args.model == "calibrated":
        student, tokenizer, teacher = calibrated_smollm2(data_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        student = AutoModelForCausalLM.from_pretrained(args.model).eval()
        if args.attention_weight:
            teacher = load_smollm2()[0]
    teacher = teacher if args.attention_weight else None  # the rows hold its attention only when it is distilled
    attention = dict(teacher=teacher, attention_top_k=args.attention_top_k)
    novels = [n for n in AUSTEN_NOVELS if n != HELD_OUT_NOVEL]  # training text only
    train_haystack = tokenizer(build_austen_corpus(novels, data_dir).read_text(), add_special_tokens=False).input_ids
    held_out = build_austen_corpus(HELD_OUT_NOVEL, data_dir).read_text()
    held_haystack = tokenizer(held_out, add_special_tokens=False).input_ids
    rows_dir = Path(args.rows_dir)
    started = time.perf_counter()
    eval_rows = cached_rows(rows_dir / "eval.safetensors", lambda: needle_rows(
        student, tokenizer, held_haystack, args.eval_prompts, tuple(args.lengths), seed=1, progress=True),
        attention=False)  # fmt: skip
    parts = [cached_rows(rows_dir / f"train-{part:03d}.safetensors", lambda part=part: needle_rows(
        student, tokenizer, train_haystack, 10, tuple(args.lengths), seed=100 + part, progress=True, **attention),
        attention=bool(args.attention_weight)) for part in range(args.prompts // 10)]  # fmt: skip
    rows = [row for part in parts for row in part]
    if args.beyond_only:
        rows = [row for row in rows if row.distance > student.config.sliding_window]
    states_seconds = time.perf_counter() - started
    shortest = min(eval_rows, key=lambda row: len(row.input_ids))  # the cache must be this model's self-decoder
    torch.testing.assert_close(self_decoder_states(student, shortest.input_ids[None])[0], shortest.states,
                               atol=1e-4, rtol=1e-4)  # fmt: skip

    files = {HELD_OUT_PLAY: build_shakespeare_corpus(HELD_OUT_PLAY, data_dir),
             HELD_OUT_NOVEL: build_austen_corpus(HELD_OUT_NOVEL, data_dir)}  # fmt: skip
    texts = {name: tokenizer(path.read_text(), return_tensors="pt").input_ids[0][: args.eval_tokens]
             for name, path in files.items()}  # fmt: skip
    window = min(2048, args.eval_tokens)
    needles = dict(haystack=held_out, lengths=args.retrieval_lengths, trials=args.retrieval_trials, progress=False)
    perplexity_before = evaluate(student, texts, window, False)
    retrieval_before = retrieval(student, tokenizer, **needles)
    retrieval_original = retrieval(teacher, tokenizer, **needles) if teacher is not None else None

    text_states = None
    if args.text_blocks:  # the distillation's training text: Shakespeare, and the Austen of the haystacks
        shakespeare, _ = smollm2_corpora(data_dir)[0]
        shakespeare_ids = tokenizer(shakespeare.read_text(), add_special_tokens=False).input_ids
        text_states = text_block_states(student, [shakespeare_ids, train_haystack], args.text_blocks, args.text_length)

    train_only_what_distillation_trains(student)
    before = split_accuracy(student, eval_rows)
    print(f"{len(rows)} training rows, {len(eval_rows)} held out; answers right before: {before}", flush=True)
    start = time.perf_counter()
    curve = retrieval_stage(student, rows, eval_rows, args.steps, args.rows_per_step, args.learning_rate,
                            args.text_positions, args.kl_weight, args.eval_every, args.key_fraction,
                            args.key_curriculum, args.attention_weight, args.pointer_weight, args.pointer_heads,
                            text_states, progress=True)  # fmt: skip
    train_seconds = time.perf_counter() - start
    after = split_accuracy(student, eval_rows)
    print(f"answers right after: {after}", flush=True)
    results = {
        "settings": vars(args), "sliding_window": student.config.sliding_window,
        "attention_sink_tokens": student.config.attention_sink_tokens,
        "training_rows": len(rows), "training_prompts": len(parts) * 10, "held_out_rows": len(eval_rows),
        "row_tokens": sum(len(row.input_ids) for row in rows), "states_seconds": states_seconds,
        "train_seconds": train_seconds, "row_visits": args.steps * args.rows_per_step,
        "answer_accuracy_before": before, "answer_accuracy_after": after, "curve": curve,
        "perplexity_before": perplexity_before, "perplexity": evaluate(student, texts, window, False),
        "retrieval": {"needle_depth": 0.1, "trials": args.retrieval_trials, "before": retrieval_before,
                      "after": retrieval(student, tokenizer, **needles)},
    }  # fmt: skip
    if retrieval_original is not None:
        results["retrieval"]["original"] = retrieval_original
    print(json.dumps({k: results[k] for k in ("perplexity", "retrieval")}, indent=1))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "retrieval_stage.json").write_text(json.dumps(results, indent=1))
    plot(curve, student.config.sliding_window, output_dir / "retrieval_stage.png")
    card = model_card(student, results, args)
    card.save(str(output_dir / "MODEL_CARD.md"))
    if args.save:
        student.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
        card.save(str(Path(args.save) / "README.md"))


if __name__ == "__main__":
    main()
