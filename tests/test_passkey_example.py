"""The passkey demo's data and training loop (the full run's accuracies are in benchmarks/results/passkey.json)."""

import importlib.util
import json
from pathlib import Path

import torch

spec = importlib.util.spec_from_file_location(
    "passkey_retrieval", Path(__file__).parents[1] / "examples" / "passkey_retrieval.py"
)
passkey = importlib.util.module_from_spec(spec)
spec.loader.exec_module(passkey)


def test_passkey_batches_put_the_key_beyond_the_window():
    input_ids, labels = passkey.make_batch(8, 96, 64, torch.Generator().manual_seed(0))
    assert input_ids.shape == (8, 96)
    assert (input_ids[:, 0] == passkey.KEY).all() and (input_ids[:, -5] == passkey.QUERY).all()
    assert torch.equal(input_ids[:, 1:5], input_ids[:, -4:])  # the answer repeats the key
    assert (labels[:, :-4] == -100).all() and torch.equal(labels[:, -4:], input_ids[:, -4:])
    assert (input_ids[:, 5:-5] >= passkey.FILLER_START).all()  # no digit in the filler


def test_passkey_demo_runs(tmp_path):
    results = passkey.main(["--steps", "3", "--batch", "4", "--output", str(tmp_path / "passkey.json")])
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["passkey_distance"] > saved["receptive_field_window_only"]
    for name in ("yoco-swa", "window-only"):
        assert 0.0 <= results[name]["digit_accuracy"] <= 1.0
        assert saved[name]["parameters"] > 0


def test_committed_passkey_results_show_the_global_kv_at_work():
    results = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "passkey.json").read_text())
    assert results["yoco-swa"]["key_accuracy"] > 0.9
    assert results["window-only"]["digit_accuracy"] < 0.2  # chance is 0.1
