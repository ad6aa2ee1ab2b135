"""`hf-yoco distill`: the smoke run converts a tiny Llama, distils it with the stock Trainer, evaluates and saves a
loadable YOCO model with its card; the loss, the trained parameter set, resume and the KV arithmetic are right."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_needle_rows
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_yoco.cli import main
from hf_yoco.convert import yocofy_llama
from hf_yoco.distill import (
    distillation_loss,
    kv_cache_bytes,
    retrieval_rows,
    train_only_what_distillation_trains,
    trainable_names,
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")  # the retrieval stage with its defaults (the recipe that works) but
    # for its KL's weight, text positions and text blocks, set to show that they reach the stage
    assert main(["distill", "--smoke", "--no-progress", "--output-dir", str(out / "run"), "--retrieval-stage-steps",
                 "2", "--retrieval-stage-kl-weight", "0.5", "--retrieval-stage-text-positions", "8",
                 "--retrieval-stage-text-blocks", "2", "--results-dir", str(out / "results")]) == 0  # fmt: skip
    return out


def test_smoke_run_saves_a_loadable_yoco_model_with_its_card_and_numbers(smoke_run):
    results = json.loads((smoke_run / "run" / "distill.json").read_text())
    for key in ("teacher_ppl", "converted_ppl", "distilled_ppl"):
        assert results[key]["the-tempest"] > 1
    assert results["steps"] == 3 and results["training_tokens"] == 3 * 1 * 128
    assert any("kl" in entry for entry in results["curve"]) and any("eval_loss" in e for e in results["curve"])
    assert results["kv_cache_8k"]["saving"] > 1
    model = AutoModelForCausalLM.from_pretrained(smoke_run / "run" / "model")
    assert model.config.model_type == "hf_yoco" and model.config.sliding_window == 16
    assert model.config.attention_sink_tokens == 4 and results["retrieval_rows"] > 0
    card = (smoke_run / "run" / "model" / "README.md").read_text()
    assert results["self_decoder_layers"] == model.config.num_self_decoder_layers == 3  # two thirds of 4 layers
    stage = results["retrieval_stage"]  # 2 haystacks x 4 needles, held-out rows scored before and after
    assert stage["rows"] == 8 and stage["steps"] == 2 and [e["step"] for e in stage["curve"]] == [0, 1, 2]
    assert len(stage["curve"][0]["retrieval_heads"]) == 2 and stage["curve"][1]["pointer_loss"] > 0
    assert "2.0 x the pointer loss on 2 retrieval heads" in card  # 8 by default, 2 in a smoke run
    assert "eval_answer_accuracy" in stage["curve"][-1] and "retrieval stage: 2 steps on 8" in card
    assert stage["curve"][1]["attention_loss"] > 0 and "the original's attention" in card
    for entry in stage["curve"][1:]:  # answer + 0.5 x (KL + text KL) + 1.0 x attention + 2.0 x pointer
        weighted = entry["answer_loss"] + 0.5 * (entry["kl"] + entry["text_kl"]) + entry["attention_loss"]
        assert entry["loss"] == pytest.approx(weighted + 2.0 * entry["pointer_loss"])
    assert stage["curve"][2]["text_kl"] > 0  # the training text's blocks: after one step the model has moved
    assert "0.5 x the KL to the distilled model at 8 text positions" in card
    assert "at 64 positions of one of 2 blocks per training text per step" in card
    assert "perplexity (the-tempest), distilled" in card and "hf-yoco distill" in card
    assert {p.name for p in (smoke_run / "results").iterdir()} == {"distill.json", "MODEL_CARD.md", "curve.png"}
    assert not list((smoke_run / "results").glob("*.safetensors"))  # results never hold weights


def test_checkpoints_hold_every_trained_parameter(smoke_run):
    """An adapter checkpoint holds only what PEFT saves: the global K/V and the cross layers' q/o and norms, trained
    beside the LoRA adapters, must be in it too, or `--resume` would restart them from the conversion."""
    from safetensors import safe_open

    (checkpoint,) = (smoke_run / "run" / "checkpoints").glob("checkpoint-*")
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as saved:
        names = {
            name.replace(".modules_to_save.default", "").removeprefix("base_model.model.") for name in saved.keys()
        }
    assert {"model.global_kv.k_proj.weight", "model.global_kv.v_proj.weight", "model.global_kv.norm.weight",
            "model.layers.3.cross_attn.q_proj.weight", "model.layers.3.cross_attn.o_proj.weight",
            "model.layers.3.input_layernorm.weight"} <= names  # fmt: skip
    assert any("lora_A" in name for name in names)


def test_an_existing_run_needs_resume(smoke_run, capsys):
    assert main(["distill", "--smoke", "--no-progress", "--output-dir", str(smoke_run / "run")]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["distill", "--smoke", "--no-progress", "--resume", "--max-steps", "4", "--output-dir",
                 str(smoke_run / "run")]) == 0  # fmt: skip
    assert json.loads((smoke_run / "run" / "distill.json").read_text())["steps"] == 4  # 2 saved + 2 more


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_trainable_parameters_are_what_the_conversion_changed():
    student = yocofy_llama(tiny_llama(), "sliding_window", 8)
    names = set(trainable_names(student))
    assert {"model.global_kv.norm.weight", "model.global_kv.k_proj.weight", "model.global_kv.v_proj.weight"} <= names
    for i in (2, 3):
        for part in ("cross_attn.q_proj", "cross_attn.o_proj", "input_layernorm"):
            assert f"model.layers.{i}.{part}.weight" in names
    assert not [n for n in names if n.startswith(("model.layers.0.", "model.layers.1.", "model.embed"))]
    assert not [n for n in names if ".mlp." in n or "post_attention_layernorm" in n]


def test_distillation_loss_is_the_kl_plus_the_lm_share():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 4:] = -100
    loss, kl = distillation_loss(teacher, teacher, labels, 0.9, 2.0, torch.tensor(3.0))
    assert kl.abs() < 1e-6 and torch.allclose(loss, torch.tensor(0.3))
    _, kl = distillation_loss(student, teacher, labels, 1.0, 1.0, torch.tensor(0.0))
    valid = labels[:, 1:] != -100
    p = teacher[:, :-1][valid].log_softmax(-1)
    q = student[:, :-1][valid].log_softmax(-1)
    expected = (p.exp() * (p - q)).sum(-1).mean()
    assert torch.allclose(kl, expected, atol=1e-6)


def test_kv_cache_arithmetic():
    config = yocofy_llama(tiny_llama(), "sliding_window", 8).config
    row = 2 * 2 * 8 * 4  # K and V, 2 kv heads, head 8, fp32
    assert kv_cache_bytes(config, 100, yoco=False) == 4 * 100 * row
    assert kv_cache_bytes(config, 100, yoco=True) == 100 * row + 2 * 7 * row
    config = yocofy_llama(tiny_llama(), "sliding_window", 8, attention_sink_tokens=3).config
    assert kv_cache_bytes(config, 100, yoco=True) == 100 * row + 2 * (7 + 3) * row  # the sinks beside each window


def test_retrieval_rows_hold_a_needle_its_question_and_the_answer():
    from pathlib import Path

    from hf_yoco.data import build_shakespeare_corpus, default_data_dir
    from hf_yoco.distill import smoke_teacher

    data_dir = Path(default_data_dir())
    _, tokenizer = smoke_teacher(data_dir)
    haystack = tokenizer(build_shakespeare_corpus("macbeth", data_dir).read_text(), add_special_tokens=False).input_ids
    for length in (128, 512):
        rows = retrieval_rows(tokenizer, haystack, 6, length, seed=1)
        assert len(rows) == 6 and all(len(row) == length for row in rows)
        for row in rows:
            text = tokenizer.decode(row)
            question, answer = text.rsplit("? The special magic number of ", 1)
            key = question.rsplit("What is the special magic number of ", 1)[1]
            value = answer.split(" is ", 1)[1].strip(" .")
            assert f"special magic number of {key} is {value}." in question  # the needle precedes the question
    assert retrieval_rows(tokenizer, haystack, 3, 128, seed=1) == retrieval_rows(tokenizer, haystack, 3, 128, seed=1)


def test_gradient_accumulation_matches_one_larger_batch(tmp_path):
    """Two accumulated batches of one row train exactly as one batch of two (the loss is averaged, not summed)."""
    import argparse

    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from hf_yoco.distill import make_trainer

    teacher = tiny_llama()
    # two rows of 16 ids, none the padding id 0 (every position has a label)
    rows = Dataset.from_dict({"input_ids": torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(0))
                              .tolist()})  # fmt: skip
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                        pad_token="<pad>")  # the collator's padding only  # fmt: skip
    trained = []
    for batch, accumulation in ((2, 1), (1, 2)):
        torch.manual_seed(0)
        student = yocofy_llama(teacher, "sliding_window", 8)
        for name, parameter in student.named_parameters():
            parameter.requires_grad_(name in set(trainable_names(student)))
        args = argparse.Namespace(max_steps=1, batch_size=batch, gradient_accumulation_steps=accumulation,
                                  learning_rate=1e-3, warmup_steps=0, logging_steps=1, eval_steps=10, save_steps=10,
                                  no_progress=True, kl_weight=0.9, temperature=1.0)  # fmt: skip
        trainer = make_trainer(student, teacher, args, rows, rows, tokenizer, tmp_path / f"b{batch}")
        trainer.train()
        loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        trained.append((loss, student.model.global_kv.k_proj.weight.detach().clone()))
    (loss_one, weight_one), (loss_two, weight_two) = trained
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    torch.testing.assert_close(weight_two, weight_one, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def needle_setup():
    _, student, tokenizer, rows = tiny_needle_rows(3, 2, (300, 400), needles=3, seed=1)
    return student, tokenizer, rows


def test_needle_rows_cache_the_self_decoder_output_of_each_question(needle_setup):
    """Each prompt runs through the self-decoder once and each needle's question continues it from a copy of the
    cache: the cached states equal the self-decoder's output over the whole row, the answer is that needle's value,
    and `distance` counts the tokens from the needle to the question."""
    from hf_yoco.distill import self_decoder_states

    student, tokenizer, rows = needle_setup
    assert len(rows) == 2 * 3 and all(300 <= len(row.input_ids) <= 440 for row in rows)
    assert rows[0].prompt_states is rows[1].prompt_states  # one prompt's questions share its states
    for row in rows:
        torch.testing.assert_close(row.states, self_decoder_states(student, row.input_ids[None])[0], atol=1e-5,
                                   rtol=1e-5)  # fmt: skip
        question_start = len(row.prompt_states)
        key = tokenizer.decode(row.input_ids[question_start : row.answer_start]).split(" of ")[1].split("?")[0]
        value = tokenizer.decode(row.input_ids[row.answer_start :]).strip(" .")
        needle = tokenizer.decode(row.input_ids[question_start - row.distance : question_start])
        assert needle.startswith(f" The special magic number of {key} is {value}.")
    assert any(row.distance > 16 for row in rows)  # beyond the window: only the global K/V holds the needle


def test_text_block_states_are_the_self_decoder_output_over_blocks_of_each_text_in_turn(needle_setup):
    from hf_yoco.distill import self_decoder_states, text_block_states

    student, _, rows = needle_setup
    texts = [rows[0].input_ids.tolist(), list(range(5, 45))]  # the second shorter than a block: taken whole
    blocks = text_block_states(student, texts, 2, 64, seed=3)
    assert [len(block) for block in blocks] == [64, 40, 64, 40]  # the texts alternate
    torch.testing.assert_close(blocks[1], self_decoder_states(student, torch.tensor([texts[1]]))[0])
    ids = texts[0]  # each block is the states of a window of its text
    assert any(torch.allclose(blocks[0], self_decoder_states(student, torch.tensor([ids[s : s + 64]]))[0], atol=1e-5)
               for s in range(len(ids) - 63))  # fmt: skip
    again = text_block_states(student, texts, 2, 64, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(blocks, again))


def test_retrieval_stage_learns_the_answers_and_trains_only_what_distillation_trains(needle_setup):
    """On cached states, the stage lowers the answer loss, starts from a zero KL to the model as it was (the
    reference), reports held-out answer accuracy on schedule, and leaves the frozen self-decoder untouched."""
    import copy

    from hf_yoco.distill import answer_accuracy, retrieval_stage

    student, _, rows = needle_setup
    student = copy.deepcopy(student)
    trainable = train_only_what_distillation_trains(student)
    frozen = {name: p.detach().clone() for name, p in student.named_parameters() if name not in trainable}
    torch.manual_seed(0)
    curve = retrieval_stage(student, rows, rows[:2], steps=40, rows_per_step=3, learning_rate=2e-2,
                            text_positions=8, eval_every=20)  # fmt: skip
    assert [entry["step"] for entry in curve if "eval_answer_accuracy" in entry] == [0, 20, 40]
    assert curve[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's student is the reference
    train = [entry for entry in curve if "answer_loss" in entry]
    first, last = (sum(e["answer_loss"] for e in part) / 5 for part in (train[:5], train[-5:]))
    assert len(train) == 40 and last < first - 0.4  # a tiny random teacher's cross layer learns slowly: ~0.6 nats
    assert all(torch.equal(p, frozen[name]) for name, p in student.named_parameters() if name in frozen)
    assert 0.0 <= answer_accuracy(student, rows) <= 1.0 and not student.training


def test_retrieval_stage_lengths_must_reach_beyond_the_window(tmp_path, capsys):
    assert main(["distill", "--smoke", "--no-progress", "--retrieval-stage-steps", "2", "--retrieval-stage-lengths",
                 "300", "16", "--output-dir", str(tmp_path)]) == 2  # fmt: skip
    assert "--retrieval-stage-lengths must be MIN <= MAX with MAX above --sliding-window 16" in capsys.readouterr().err
    assert main(["distill", "--smoke", "--no-progress", "--retrieval-stage-steps", "2", "--retrieval-stage-key-fraction",
                 "0.2", "--retrieval-stage-key-curriculum", "0", "--output-dir", str(tmp_path)]) == 2  # fmt: skip
    assert "--retrieval-stage-key-curriculum above 0" in capsys.readouterr().err


def test_key_curriculum_keeps_the_needle_and_the_question_and_grows_to_every_key(needle_setup):
    import copy

    from hf_yoco.distill import NEEDLE_SPAN, kept_keys, retrieval_stage

    student, _, rows = needle_setup
    row = max(rows, key=lambda r: r.distance)
    generator = torch.Generator().manual_seed(0)
    keys = kept_keys(row, 0.1, generator)
    needle, question = len(row.prompt_states) - row.distance, len(row.prompt_states)
    assert torch.equal(keys, keys.sort().values) and len(keys) < 0.4 * len(row.input_ids)
    assert set(range(needle, needle + NEEDLE_SPAN)) | set(range(question, len(row.input_ids))) <= set(keys.tolist())
    assert torch.equal(kept_keys(row, 1.0, generator), torch.arange(len(row.input_ids)))

    student = copy.deepcopy(student)
    train_only_what_distillation_trains(student)
    curve = retrieval_stage(student, rows, [], steps=6, rows_per_step=1, learning_rate=1e-3, text_positions=4,
                            key_fraction=0.1, key_curriculum=0.5)  # fmt: skip
    assert [round(e["key_fraction"], 2) for e in curve] == [0.1, 0.4, 0.7, 1.0, 1.0, 1.0]
    assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # text positions always see every key
    with pytest.raises(ValueError, match="key_curriculum > 0"):  # no ramp would ignore key_fraction
        retrieval_stage(student, rows, [], steps=6, rows_per_step=1, learning_rate=1e-3, key_fraction=0.1)


@pytest.fixture(scope="module")
def attention_setup():
    teacher, student, _, rows = tiny_needle_rows(2, 2, (200, 300), needles=2, seed=2, attention_top_k=8, sharpen=True)
    return teacher, student, rows


def test_needle_rows_hold_the_originals_attention_at_the_answer(attention_setup):
    """The targets are the top-k of the original's attention in each cross layer from the positions predicting the
    answer, as one full forward over the row computes it (the rows continue a cached haystack)."""
    teacher, student, rows = attention_setup
    teacher.set_attn_implementation("eager")
    try:
        for row in rows:
            attentions = teacher(row.input_ids[None], output_attentions=True).attentions
            answer = torch.arange(row.answer_start - 1, len(row.input_ids) - 1)
            full = torch.stack([attentions[i][0][:, answer] for i in range(2, 4)])  # [L_cross, H, A, T]
            probs, indices = full.topk(8, dim=-1)
            assert row.attention.indices.shape == (2, 4, len(answer), 8)
            torch.testing.assert_close(row.attention.probs, probs, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(full.gather(-1, row.attention.indices), probs, atol=1e-5, rtol=1e-4)
    finally:
        teacher.set_attn_implementation("sdpa")
    assert teacher.config._attn_implementation == "sdpa"


def test_attention_distillation_loss_is_zero_at_the_original_and_pulls_toward_it():
    from hf_yoco.distill import AttentionTargets, attention_distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 4, 50).mul(3).softmax(-1)
    probs, indices = teacher.topk(8, dim=-1)
    targets = AttentionTargets(indices, probs)
    assert attention_distillation_loss(teacher, targets).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(2, 3, 4, 50, requires_grad=True)  # uniform attention
    loss = attention_distillation_loss(logits.softmax(-1), targets)
    assert loss.item() > 0.5
    loss.backward()
    top = logits.grad.gather(-1, indices[..., :1])  # the original's favourite key: its logit must rise
    assert (top < 0).all()


def test_retrieval_stage_distils_the_originals_attention(attention_setup):
    """With `attention_weight`, the cross layers' attention at the answer moves toward the original's (the loss
    falls) and the model returns to its attention implementation; rows without targets are refused."""
    import copy

    from hf_yoco.distill import retrieval_stage

    _, student, rows = attention_setup
    student = copy.deepcopy(student)
    train_only_what_distillation_trains(student)
    curve = retrieval_stage(student, rows, [], steps=30, rows_per_step=2, learning_rate=1e-2, text_positions=4,
                            attention_weight=1.0)  # fmt: skip
    losses = [entry["attention_loss"] for entry in curve]
    assert losses[0] > 0.3 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # ~0.6 -> ~0.2
    assert student.config._attn_implementation == "sdpa"
    bare = [row._replace(attention=None) for row in rows]
    with pytest.raises(ValueError, match="needle_rows\\(teacher=...\\)"):
        retrieval_stage(student, bare, [], steps=1, rows_per_step=1, learning_rate=1e-3, attention_weight=1.0)


def test_answer_pointers_name_the_needle_tokens_each_answer_position_copies(needle_setup):
    from hf_yoco.distill import answer_pointers

    _, _, rows = needle_setup
    for row in rows:
        pointers = answer_pointers(row)
        needle = len(row.prompt_states) - row.distance
        assert torch.equal(row.input_ids[pointers], row.input_ids[row.answer_start :])
        assert needle <= int(pointers[0]) and torch.equal(pointers.diff(), torch.ones(len(pointers) - 1).long())
    broken = rows[0]._replace(input_ids=rows[0].input_ids.clone())
    broken.input_ids[answer_pointers(rows[0])] = 0  # the answer no longer in its needle
    with pytest.raises(ValueError, match="does not appear in its needle"):
        answer_pointers(broken)


def test_pointer_loss_is_low_on_the_copied_token_and_pulls_the_chosen_heads_toward_it():
    from hf_yoco.distill import pointer_loss

    pointers = torch.tensor([3, 4, 5])
    heads = torch.tensor([[1, 2]])  # cross layer 1, head 2
    logits = torch.zeros(2, 4, 3, 10, requires_grad=True)  # [L_cross, H, A, T]: uniform attention
    loss = pointer_loss(logits.softmax(-1), heads, pointers)
    assert loss.item() == pytest.approx(math.log(10), rel=1e-5)
    loss.backward()
    grad = logits.grad[1, 2]  # [A, T]
    assert (grad[torch.arange(3), pointers] < 0).all()  # the copied token's logit must rise ...
    assert logits.grad.abs().sum() == pytest.approx(grad.abs().sum().item())  # ... in the chosen head only
    peaked = torch.full((2, 4, 3, 10), -30.0)
    peaked[..., torch.arange(3), pointers] = 0.0
    assert pointer_loss(peaked.softmax(-1), heads, pointers).item() < 1e-6


def test_retrieval_stage_pointer_loss_sharpens_the_retrieval_heads(needle_setup):
    """With `pointer_weight`, the stage names the retrieval heads it trains (those that read the copied needle token
    most before the stage) and their attention on that token rises (the loss falls); a bad head count is refused."""
    import copy

    from hf_yoco.distill import retrieval_heads, retrieval_stage

    student, _, rows = needle_setup
    student = copy.deepcopy(student)
    train_only_what_distillation_trains(student)
    heads = retrieval_heads(student, rows, 2)
    assert heads.shape == (2, 2) and int(heads[:, 0].max()) < 1 and int(heads[:, 1].max()) < 4  # one cross layer
    curve = retrieval_stage(student, rows, [], steps=30, rows_per_step=2, learning_rate=1e-2, text_positions=4,
                            pointer_weight=1.0, pointer_heads=2)  # fmt: skip
    assert curve[0]["retrieval_heads"] == [[3 + int(i), int(h)] for i, h in heads]
    losses = [entry["pointer_loss"] for entry in curve[1:]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert student.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="pointer_heads must be between 1 and the cross-decoder's heads"):
        retrieval_stage(student, rows, [], steps=1, rows_per_step=1, learning_rate=1e-3, pointer_weight=1.0,
                        pointer_heads=5)  # fmt: skip
