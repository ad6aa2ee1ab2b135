"""benchmarks/distill_retrieval_stage.py: cached needle rows survive the safetensors round trip (a haystack's
questions still share one copy of its states), and the per-token answer accuracy agrees with the whole-answer one."""

import pytest
import torch
from conftest import load_benchmark, tiny_needle_rows

from hf_yoco.convert import yocofy_llama


@pytest.fixture(scope="module")
def script():
    with load_benchmark("distill_retrieval_stage") as module:
        yield module


@pytest.fixture(scope="module")
def rows_and_model():
    _, student, _, rows = tiny_needle_rows(2, 2, (200, 300), needles=2, seed=3, attention_top_k=4)
    return student, rows


def test_rows_round_trip_and_share_their_haystack(script, rows_and_model, tmp_path):
    _, rows = rows_and_model
    script.save_rows(rows, tmp_path / "rows.safetensors")
    loaded = script.load_rows(tmp_path / "rows.safetensors")
    assert len(loaded) == len(rows) and loaded[0].prompt_states is loaded[1].prompt_states
    for row, back in zip(rows, loaded):
        assert torch.equal(row.input_ids, back.input_ids) and torch.equal(row.states, back.states)
        assert (row.answer_start, row.distance) == (back.answer_start, back.distance)
        assert torch.equal(row.attention.indices, back.attention.indices)
        assert torch.equal(row.attention.probs, back.attention.probs)


def test_token_accuracy_agrees_with_the_whole_answer(script, rows_and_model):
    from hf_yoco.distill import answer_accuracy, answer_predictions

    student, rows = rows_and_model
    by_token = script.token_accuracy(student, rows)
    assert len(by_token) == min(len(row.input_ids) - row.answer_start for row in rows)
    assert all(0 <= share <= 1 for share in by_token) and min(by_token) >= answer_accuracy(student, rows)
    perfect = [row._replace(input_ids=row.input_ids.clone()) for row in rows]
    for row in perfect:  # answers replaced by the model's own greedy predictions: every token right
        row.input_ids[row.answer_start :] = answer_predictions(student, row)
    assert script.token_accuracy(student, perfect) == [1.0] * len(by_token)


def test_a_tiny_run_writes_the_curve_the_evaluations_and_a_loadable_model_with_its_card(script, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    """The whole script on a tiny YOCO-fied Llama: rows cached on the first run and reused on the second, the
    results before and after the stage, and the saved model loads with its card."""
    import json
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from hf_yoco.data import default_data_dir
    from hf_yoco.distill import smoke_teacher

    teacher, tokenizer = smoke_teacher(Path(default_data_dir()))
    student = yocofy_llama(teacher, "sliding_window", 16, num_self_decoder_layers=3, attention_sink_tokens=2)
    student.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    argv = ["distill_retrieval_stage.py", "--model", str(tmp_path / "tiny"), "--rows-dir", str(tmp_path / "rows"),
            "--prompts", "10", "--eval-prompts", "2", "--lengths", "200", "300", "--steps", "2", "--eval-every", "1",
            "--rows-per-step", "2", "--text-positions", "4", "--pointer-weight", "1", "--pointer-heads", "2",
            "--attention-weight", "0", "--eval-tokens", "256", "--retrieval-lengths", "96", "--retrieval-trials", "1",
            "--text-blocks", "1", "--text-length", "64", "--output-dir", str(tmp_path / "out"),
            "--save", str(tmp_path / "model")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    cached = (tmp_path / "rows" / "train-000.safetensors").stat().st_mtime_ns
    results = json.loads((tmp_path / "out" / "retrieval_stage.json").read_text())
    assert results["training_rows"] == 40 and [e["step"] for e in results["curve"]] == [0, 1, 2]
    assert len(results["curve"][0]["retrieval_heads"]) == 2 and results["curve"][1]["pointer_loss"] > 0
    assert set(results["retrieval"]) == {"needle_depth", "trials", "before", "after"}  # no original loaded
    assert results["perplexity_before"]["the-tempest"] > 1 and results["perplexity"]["persuasion"] > 1
    assert 0 <= results["answer_accuracy_after"]["within_window"] <= 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.model_type == "hf_yoco"
    card = (tmp_path / "model" / "README.md").read_text()
    assert card == (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "needle retrieval, 96 tokens, depth 0.1 (after)" in card and "1.0 x the pointer loss on 2" in card
    assert results["curve"][2]["text_kl"] > 0 and "8 positions of one of 1 blocks of 64 tokens" in card
    script.main()  # the rows are reused, not rebuilt
    assert (tmp_path / "rows" / "train-000.safetensors").stat().st_mtime_ns == cached
