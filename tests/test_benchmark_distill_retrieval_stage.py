"""benchmarks/distill_retrieval_stage.py: cached needle rows survive the safetensors round trip (a haystack's
questions still share one copy of its states), and the per-token answer accuracy agrees with the whole-answer one."""

import pytest
import torch
from conftest import load_benchmark

from hf_yoco.convert import yocofy_llama


@pytest.fixture(scope="module")
def script():
    with load_benchmark("distill_retrieval_stage") as module:
        yield module


@pytest.fixture(scope="module")
def rows_and_model():
    from pathlib import Path

    from hf_yoco.data import build_shakespeare_corpus, default_data_dir
    from hf_yoco.distill import needle_rows, smoke_teacher

    data_dir = Path(default_data_dir())
    teacher, tokenizer = smoke_teacher(data_dir)
    student = yocofy_llama(teacher, "sliding_window", 16, num_self_decoder_layers=2, attention_sink_tokens=2)
    haystack = tokenizer(build_shakespeare_corpus("macbeth", data_dir).read_text(), add_special_tokens=False).input_ids
    rows = needle_rows(student, tokenizer, haystack, 2, (200, 300), needles=2, seed=3, teacher=teacher,
                       attention_top_k=4)  # fmt: skip
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
    from hf_yoco.distill import answer_accuracy

    student, rows = rows_and_model
    by_token = script.token_accuracy(student, rows)
    assert len(by_token) == min(len(row.input_ids) - row.answer_start for row in rows)
    assert all(0 <= share <= 1 for share in by_token) and min(by_token) >= answer_accuracy(student, rows)
    perfect = [row._replace(input_ids=row.input_ids.clone()) for row in rows]
    for row in perfect:  # answers replaced by the model's own greedy predictions: every token right
        positions = torch.arange(row.answer_start - 1, len(row.input_ids) - 1)
        with torch.no_grad():
            logits = student.lm_head(student.model.cross_decoder_forward(row.states[None], positions[None]))[0]
        row.input_ids[row.answer_start :] = logits.argmax(-1)
    assert script.token_accuracy(student, perfect) == [1.0] * len(by_token)
