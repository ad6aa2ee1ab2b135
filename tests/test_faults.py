"""Faults lose nothing: a run killed with SIGKILL (mid-step, mid-checkpoint) resumes to the uninterrupted result, and
interrupted writes (save_pretrained, the converters, the data builder) leave either nothing or the previous output.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_utils import tiny_args
from transformers import AutoModelForCausalLM

import hf_yoco
from hf_yoco.checkpoints import atomic_directory, checkpoint_problem, latest_complete_checkpoint
from hf_yoco.training import train

pytestmark = pytest.mark.transformers_compat

FLAGS = ["--max-steps", "6", "--save-steps", "2", "--learning-rate", "3e-3", "--save-total-limit", "3"]


def flags_of(args) -> list[str]:
    """The CLI flags of a `tiny_args` namespace (for the subprocess)."""
    return [flag for key, value in vars(args).items() for flag in _flag(key, value)]


def _flag(key: str, value) -> list[str]:
    name = "--" + key.replace("_", "-")
    if key in ("eval_before",):
        return [] if value else ["--no-eval-before"]
    if key == "no_progress":
        return ["--no-progress"] if value else []
    if isinstance(value, bool):
        return [name] if value else []
    if value is None or value == []:
        return []
    if isinstance(value, list):
        return [name, *map(str, value)]
    return [name, str(value)]


def killed_run(tmp_path: Path, where: str, step: int, variant: str = "yoco_retention") -> Path:
    out = tmp_path / f"killed-{where}"
    args = tiny_args(out, variant, *FLAGS)
    script = Path(__file__).with_name("fault_injection.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run([sys.executable, str(script), where, str(step), "--", *flags_of(args)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    return out


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder / "final").state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("full")
    summary = train(tiny_args(out, "yoco_retention", *FLAGS))
    return summary, final_weights(out)


@pytest.mark.parametrize(("where", "step", "resumes_from"), [("step", 4, 4), ("checkpoint", 4, 2)])
def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, where, step, resumes_from):
    out = killed_run(tmp_path, where, step)
    if where == "checkpoint":  # the weights of checkpoint-4 were written, its optimizer state half, no state file
        assert (out / "checkpoint-4" / "model.safetensors").exists()
        assert checkpoint_problem(out / "checkpoint-4") is not None
    assert latest_complete_checkpoint(out).name == f"checkpoint-{resumes_from}"
    resumed = train(tiny_args(out, "yoco_retention", *FLAGS, "--resume-from-checkpoint"))
    full, full_weights = uninterrupted
    assert resumed["global_step"] == full["global_step"] == 6
    assert resumed["eval_loss_after"] == pytest.approx(full["eval_loss_after"], rel=1e-5)
    weights = final_weights(out)
    assert weights.keys() == full_weights.keys()
    for name, tensor in full_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)


def test_an_incomplete_checkpoint_named_explicitly_is_refused(tmp_path):
    out = killed_run(tmp_path, "checkpoint", 2)
    with pytest.raises(ValueError, match=r"checkpoint-2 is incomplete .*trainer_state\.json is missing"):
        train(tiny_args(out, "yoco_retention", *FLAGS, "--resume-from-checkpoint", str(out / "checkpoint-2")))


# ---------------------------------------------------------------------------------------------- atomic writes


def tiny_model():
    config = hf_yoco.YocoConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                num_attention_heads=4)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


def test_save_pretrained_interrupted_leaves_the_previous_save(tmp_path, monkeypatch):
    import transformers.modeling_utils

    target = tmp_path / "model"
    first = tiny_model()
    first.save_pretrained(target)
    (target / "notes.txt").write_text("kept")  # a file of the user's beside the weights
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def fail_midway(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", fail_midway)  # what save_pretrained calls
    with pytest.raises(OSError, match="No space left"):
        tiny_model().save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
    monkeypatch.undo()

    second = tiny_model()
    second.save_pretrained(target)  # a complete re-save replaces the weights and keeps the user's file
    assert (target / "notes.txt").read_text() == "kept"
    reloaded = AutoModelForCausalLM.from_pretrained(target).state_dict()
    for name, tensor in second.state_dict().items():
        torch.testing.assert_close(reloaded[name], tensor)


SAVE_AND_DIE = """
import os, signal, sys
import hf_yoco
import transformers.modeling_utils
from transformers import AutoModelForCausalLM

def die(tensors, filename, *args, **kwargs):
    open(filename, "wb").write(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)

transformers.modeling_utils.safe_save_file = die
config = hf_yoco.YocoConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=4)
AutoModelForCausalLM.from_config(config).save_pretrained(sys.argv[1])
"""


def test_save_pretrained_killed_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    run = subprocess.run([sys.executable, "-c", SAVE_AND_DIE, str(target)], capture_output=True, timeout=300)
    assert run.returncode == -signal.SIGKILL
    assert not target.exists()  # only a hidden temporary folder, which no loader reads
    assert all(p.name.startswith(".model.tmp-") for p in tmp_path.iterdir())


def test_converter_interrupted_leaves_no_output(tmp_path, monkeypatch):
    from hf_yoco.cli import main

    source = tmp_path / "llama"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(source)  # fmt: skip

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_yoco.YocoForCausalLM, "save_pretrained", fail)
    assert main(["convert", "llama-to-yoco", str(source), str(tmp_path / "out"), "--sliding-window", "4"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_data_builder_interrupted_leaves_no_half_tokenizer(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from hf_yoco import data

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n\n" * 50)

    def fail(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", fail)
    with pytest.raises(OSError):
        data.train_bpe_tokenizer([corpus], tmp_path / "tok", vocab_size=300)
    assert not (tmp_path / "tok").exists()
    monkeypatch.undo()
    tokenizer = data.train_bpe_tokenizer([corpus], tmp_path / "tok", vocab_size=300)  # the next run builds it whole
    assert (tmp_path / "tok" / "tokenizer.json").exists() and len(tokenizer) <= 300


def test_atomic_directory_refuses_a_file_target(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"), atomic_directory(tmp_path / "file"):
        pass
