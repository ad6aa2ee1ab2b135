"""`hf-yoco compare`: equal non-embedding parameters by construction, and the whole study in its smoke form."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_yoco.quality import StudySettings, matched_config, non_embedding_parameters, passkey_length


class Vocabulary:
    """What the configs read of a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = 1, 0, 0

    def __len__(self) -> int:
        return 4096


@pytest.mark.parametrize("scale_name", ["main", "small"])
def test_study_models_have_equal_non_embedding_parameters(scale_name):
    settings = StudySettings()
    scale = settings.scales[scale_name]

    def count(architecture: str, target: int | None) -> int:
        with torch.device("meta"):
            config = matched_config(architecture, scale, settings, Vocabulary(), target)
            return non_embedding_parameters(AutoModelForCausalLM.from_config(config))

    llama = count("llama", None)
    for architecture in scale.models:
        if architecture not in ("llama", "block-large", "window-only"):
            assert abs(count(architecture, llama) / llama - 1) <= 0.02, architecture
    if "window-only" in scale.models:
        assert count("window-only", llama) == llama
    if "block-large" in scale.models:
        assert count("block-large", llama) >= 1.8 * llama  # the throughput-matched comparison: a larger model


def test_smoke_study_writes_its_reports(tmp_path, monkeypatch):
    from hf_yoco.cli import main

    monkeypatch.chdir(tmp_path)
    from pathlib import Path

    data_dir = Path(__file__).resolve().parents[1] / "data"
    assert (
        main(["compare", "--smoke", "--output-dir", "out", "--models-dir", "models", "--data-dir", str(data_dir)]) == 0
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["runs"]) == {"main/llama", "main/llama-seed1", "main/yoco-swa", "main/yoco-gret", "main/block",
                                    "small/llama", "small/window-only"}  # fmt: skip
    for run in results["runs"].values():
        assert set(run["eval_loss"]) == {"shakespeare", "austen", "kjv"} and run["curve"]
        assert all(0 < loss < 10 for loss in run["eval_loss"].values()) and run["decode_tokens_per_s"] > 0
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0 and "vs Llama" in (
        tmp_path / "out" / "results.md"
    ).read_text()
    assert (tmp_path / "models" / "main" / "yoco-gret" / "model.safetensors").exists()

    # the passkey test of the trained small-scale models, and a second run reusing every finished model
    assert main(["compare", "--smoke", "--passkey", "--output-dir", "out", "--models-dir", "models",
                 "--data-dir", str(data_dir)]) == 0  # fmt: skip
    passkey = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert set(passkey["models"]) == {"llama", "window-only"}
    assert all(0 <= run["key_accuracy"] <= 1 for run in passkey["models"].values())
    assert "| window-only |" in (tmp_path / "out" / "passkey.md").read_text()
    assert (tmp_path / "out" / "passkey.png").stat().st_size > 0
    stamp = (tmp_path / "models" / "main" / "llama" / "model.safetensors").stat().st_mtime_ns
    assert (
        main(["compare", "--smoke", "--output-dir", "out2", "--models-dir", "models", "--data-dir", str(data_dir)])
        == 0
    )
    assert (tmp_path / "models" / "main" / "llama" / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    assert json.loads((tmp_path / "out2" / "results.json").read_text())["runs"] == results["runs"]


def test_passkey_curriculum_holds_the_short_length_then_grows_then_holds_the_full_length():
    settings = StudySettings(passkey_length=384, passkey_start_length=48, passkey_steps=100, passkey_hold=0.2,
                             passkey_curriculum=0.5)  # fmt: skip
    lengths = [passkey_length(settings, step) for step in range(100)]
    assert lengths[:21] == [48] * 21 and lengths[45] == 216 and lengths[70:] == [384] * 30
    assert lengths == sorted(lengths)
    settings.passkey_curriculum = 0.0  # no ramp: the full length right after the hold
    assert passkey_length(settings, 19) == 48 and passkey_length(settings, 20) == 384
    settings.passkey_hold = 0.0  # no curriculum at all: full length from the first step
    assert passkey_length(settings, 0) == 384
