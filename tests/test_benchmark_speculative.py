"""benchmarks/speculative.py: the smoke run covers every model, task and method with outputs equal to greedy, and the
counters it reports (target forwards, proposed / accepted candidates) are right."""

import copy
import json

import pytest
import torch
from conftest import load_benchmark


@pytest.fixture(scope="module")
def script():
    with load_benchmark("speculative") as module:
        yield module


def test_smoke_run_writes_every_row_and_every_output_equals_greedy(script, tmp_path):
    assert script.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "speculative.json").read_text())
    assert set(results["results"]) == set(script.TASKS)
    for per_model in results["results"].values():
        assert set(per_model) == set(script.TARGETS)
        for rows in per_model.values():
            assert set(rows) == set(script.METHODS)
            assert rows["greedy"]["tokens_per_forward"] == 1.0 and rows["greedy"]["proposed"] == 0
            for row in rows.values():
                assert row["equals_greedy"] and row["tokens_per_s"] > 0 and row["tokens_per_forward"] >= 1.0
                assert 0 <= row["accepted"] <= row["proposed"]
    report = (tmp_path / "speculative.md").read_text()
    assert "Smoke run" in report and "| yoco-gret | assisted_same |" in report


@pytest.mark.parametrize("name", ["yoco-gret", "block"])
def test_a_draft_equal_to_the_target_is_always_accepted(script, name):
    """Assisting a model with itself: every candidate is accepted, so tokens per target forward exceed 1."""
    targets, _ = script.random_models(64)
    model = targets[name]
    settings = dict(script.SMOKE, new_tokens=12)
    prompts = [torch.randint(1, 64, (10,)).tolist()]
    draft = copy.deepcopy(model)  # a distinct module: the forward counter hooks the target only
    draft.generation_config.assistant_confidence_threshold = 0  # propose all 20 candidates (random logits are unsure)
    rows = script.measure(name, model, {"llama": draft, name: draft}, prompts, settings)
    for method in ("assisted", "assisted_same"):
        row = rows[method]
        assert row["equals_greedy"] and row["proposed"] > 0
        assert row["accepted"] == row["proposed"]  # `update_candidate_strategy` saw every candidate match
        assert row["tokens_per_forward"] > 4


def test_missing_models_name_the_folder_and_the_command_that_trains_them(script, tmp_path):
    with pytest.raises(SystemExit, match=r"lacks main/llama.*hf-yoco compare"):
        script.trained_models(tmp_path)


def test_bad_settings_are_refused(script, capsys):
    with pytest.raises(SystemExit):
        script.main(["--smoke", "--cue", "50", "--passage", "10"])
    assert "--cue (50) must not exceed --passage (10)" in capsys.readouterr().err
