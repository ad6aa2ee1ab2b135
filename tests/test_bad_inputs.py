"""Every kind of bad input gets a clear error: what is wrong, with which argument or file, and what to do.

`MODEL_CASES` (both models' forward and config), `FILE_CASES` (damaged checkpoint folders) and `CLI_CASES` (user
mistakes at the `hf-yoco` command line: one line on stderr, exit status 2, no traceback unless `--debug`) list the
kinds covered; `test_kinds_covered` counts them. Prompts longer than `max_position_embeddings` are not an error: the
models extrapolate RoPE (and gated retention has no position limit), like transformers' Llama; tested below.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

import hf_yoco
from hf_yoco import BlockTransformerCache, YocoCache
from hf_yoco.checkpoints import CheckpointError, check_model_folder

VOCAB = 64
SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def yoco(self_decoder_type: str = "gated_retention", **overrides) -> hf_yoco.YocoForCausalLM:
    torch.manual_seed(0)
    window = {"sliding_window": 4} if self_decoder_type == "sliding_window" else {}
    kwargs = {**SIZES, "num_hidden_layers": 4, "self_decoder_type": self_decoder_type, **window, **overrides}
    return hf_yoco.YocoForCausalLM(hf_yoco.YocoConfig(**kwargs)).eval()


def block(**overrides) -> hf_yoco.BlockTransformerForCausalLM:
    torch.manual_seed(0)
    config = hf_yoco.BlockTransformerConfig(**{**SIZES, "block_length": 4, **overrides})
    return hf_yoco.BlockTransformerForCausalLM(config).eval()


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape)


def filled_cache(model, batch: int = 2):
    return hf_yoco.output_cache(model(ids(batch, 5), use_cache=True))


# (kind, call, error message pattern). Each call must raise ValueError (or a subclass) matching the pattern.
MODEL_CASES = [
    ("ids >= vocab_size", lambda: yoco()(torch.tensor([[1, VOCAB]])), r"input_ids.*\[0, 64\).*1 to 64"),
    ("negative ids", lambda: block()(torch.tensor([[-1, 3, 4]])), r"input_ids.*\[0, 64\).*-1 to 4"),
    ("empty prompt", lambda: yoco("sliding_window")(ids(1, 0)), r"empty input"),
    ("float ids", lambda: yoco()(torch.ones(1, 3)), r"input_ids.*integer.*float32"),
    ("1-D ids", lambda: block()(ids(5)), r"input_ids.*\[batch, seq_len\].*\[5\]"),
    ("ids and embeddings both", lambda: yoco()(ids(1, 3), inputs_embeds=torch.zeros(1, 3, 32)), r"exactly one"),
    ("embeddings of the wrong width", lambda: yoco()(inputs_embeds=torch.zeros(1, 3, 31)), r"inputs_embeds.*hidden_size=32"),
    ("integer embeddings", lambda: yoco()(inputs_embeds=torch.zeros(1, 3, 32, dtype=torch.long)), r"inputs_embeds.*floating"),
    ("Block Transformer embeddings", lambda: block()(inputs_embeds=torch.zeros(1, 4, 32)), r"inputs_embeds"),
    ("mask of the wrong shape", lambda: yoco()(ids(2, 5), attention_mask=torch.ones(2, 4)), r"attention_mask.*\[2, 5\].*\[2, 4\]"),
    ("3-D mask", lambda: block()(ids(2, 5), attention_mask=torch.ones(2, 5, 1)), r"attention_mask.*2D"),
    ("an all-padding row", lambda: yoco("sliding_window")(ids(2, 4), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])), r"rows \[1\] mask every token"),
    ("mask with holes (Block Transformer)", lambda: block()(ids(1, 4), attention_mask=torch.tensor([[1, 0, 1, 1]])), r"left and right padding only"),
    ("position_ids of the wrong shape", lambda: yoco()(ids(2, 5), position_ids=torch.arange(4)[None]), r"position_ids.*seq_len=5"),
    ("labels of the wrong shape", lambda: block()(ids(2, 8), labels=ids(2, 7)), r"labels.*\[2, 8\].*\[2, 7\]"),
    ("a Llama cache", lambda: yoco("sliding_window")(ids(1, 3), cache=DynamicCache(config=LlamaConfig(**SIZES, num_hidden_layers=4))), r"built for another model"),
    ("a cache of another YOCO", lambda: yoco()(ids(1, 3), cache=YocoCache(yoco(num_hidden_layers=6).config)), r"built for another model"),
    ("a cache of the other self-decoder", lambda: yoco("sliding_window")(ids(1, 3), cache=YocoCache(yoco().config)), r"built for another model"),
    ("a cache with another batch", lambda: (m := yoco())(ids(3, 1), cache=filled_cache(m, 2)), r"holds 2 sequences.*3"),
    ("a YOCO cache to the Block Transformer", lambda: block()(ids(1, 3), cache=YocoCache(yoco().config)), r"BlockTransformerCache"),
    ("a Block Transformer cache of another config", lambda: block()(ids(1, 3), cache=BlockTransformerCache(block(block_length=2).config)), r"another Block Transformer"),
    ("packed sequences with a cache", lambda: yoco()(ids(1, 6), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]), cache=YocoCache(yoco().config)), r"Packed sequences"),
    ("unknown self_decoder_type", lambda: hf_yoco.YocoConfig(self_decoder_type="mamba"), r"self_decoder_type.*sliding_window.*gated_retention"),
    ("heads not dividing kv heads", lambda: hf_yoco.YocoConfig(num_attention_heads=4, num_key_value_heads=3), r"num_key_value_heads"),
    ("unknown kernel_backend", lambda: hf_yoco.BlockTransformerConfig(kernel_backend="cuda"), r"kernel_backend"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "call", "pattern"), MODEL_CASES, ids=[case[0] for case in MODEL_CASES])
def test_model_input(kind, call, pattern):
    with pytest.raises(ValueError, match=pattern), torch.no_grad():
        call()


def test_prompts_longer_than_max_position_embeddings_extrapolate():
    """Documented behaviour, not an error: RoPE extrapolates past `max_position_embeddings` (as in Llama)."""
    for model in (yoco(max_position_embeddings=16), block(max_position_embeddings=16)):
        with torch.no_grad():
            logits = model(ids(1, 40)).logits
        assert logits.shape == (1, 40, VOCAB) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------- damaged folders


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    yoco().save_pretrained(folder)
    return folder


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                del config[key]
            else:
                config[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return edit


FILE_CASES = [
    ("truncated safetensors", _truncate, r"model\.safetensors is truncated"),
    ("corrupted safetensors", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 7), r"model\.safetensors is truncated"),
    ("garbage safetensors header", lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file"), r"model\.safetensors is truncated or corrupted"),
    ("no weights", lambda f: (f / "model.safetensors").unlink(), r"has no model\.safetensors"),
    ("pickle weights only", lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), r"loads safetensors only"),
    ("unknown config field", _edit_config(flash_mode=True), r"config\.json has fields YocoConfig does not know: \['flash_mode'\]"),
    ("field missing from config.json", _edit_config(hidden_size=None), r"config\.json does not match the weights"),
    ("config.json not JSON", lambda f: (f / "config.json").write_text("{ not json"), r"config\.json' is not a valid JSON"),
    ("no config.json", lambda f: (f / "config.json").unlink(), r"model_type` key in its config\.json"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "damage", "pattern"), FILE_CASES, ids=[case[0] for case in FILE_CASES])
def test_damaged_checkpoint(tmp_path, saved, kind, damage, pattern):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    damage(folder)
    with pytest.raises((ValueError, OSError), match=pattern):
        AutoModelForCausalLM.from_pretrained(folder)


def test_tokenizer_missing_from_a_folder(saved):
    with pytest.raises(CheckpointError, match=r"has no tokenizer"):
        check_model_folder(saved, need_tokenizer=True)


# ---------------------------------------------------------------------------------------------- command line


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`hf-yoco argv` in this process: (exit status, stderr)."""
    from hf_yoco.cli import main

    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    return status, capsys.readouterr().err


CLI_CASES = [
    ("convert: empty folder", ["convert", "yoco-official", "{empty}", "{tmp}/out"], r"no params\.json beside"),
    ("convert: missing input", ["convert", "llama-to-yoco", "{tmp}/nowhere", "{tmp}/out"], r"nowhere does not exist"),
    ("convert: output is a file", ["convert", "llama-to-yoco", "{model}", "{file}"], r"is a file; choose a folder"),
    ("convert: pickle checkpoint", ["convert", "block-transformer-official", "{file}", "{tmp}/out"], r"not a \.safetensors file"),
    ("convert: missing --config", ["convert", "block-transformer-official", "{empty}", "{tmp}/out", "--config", "{tmp}/x.yaml"], r"--config .*x\.yaml does not exist"),
    ("ppl: missing model", ["ppl", "--model", "{tmp}/nonexistent"], r"nonexistent does not exist"),
    ("ppl: model is a file", ["ppl", "--model", "{file}"], r"is a file: pass the folder"),
    ("ppl: not a model folder", ["ppl", "--model", "{empty}"], r"has no config\.json"),
    ("ppl: model without tokenizer", ["ppl", "--model", "{model}"], r"has no tokenizer"),
    ("ppl: stride above window", ["ppl", "--model", "{model}", "--window", "8", "--stride", "9"], r"--stride 9 must not exceed --window 8"),
    ("ppl: bad number", ["ppl", "--model", "{model}", "--window", "wide"], r"argument --window: expected an integer, got 'wide'"),
    ("niah: empty folder", ["niah", "--model", "{empty}"], r"has no config\.json"),
    ("niah: depth outside [0, 1]", ["niah", "--model", "{model}", "--depths", "1.5"], r"--depths: must be between 0 and 1"),
    ("lm-eval-task: unknown text file", ["lm-eval-task", "--text", "{tmp}/missing.txt", "--output-dir", "{tmp}/t"], r"is not a file; use a text file"),
    ("lm-eval-task: output is a file", ["lm-eval-task", "--output-dir", "{file}"], r"--output-dir .* is a file"),
    ("data: unknown play", ["data", "--plays", "hamlet,hamlett"], r"unknown play\(s\) \['hamlett'\]"),
    ("data: missing tokenizer folder", ["data", "--tokenizer", "{tmp}/tok"], r"neither 'bpe', 'gpt2' nor a folder"),
    ("data: tiny vocabulary", ["data", "--vocab-size", "100"], r"--vocab-size must be >= 260"),
    ("data: missing extra text", ["data", "--extra-text", "{tmp}/more.txt"], r"--extra-text: no such file"),
    ("data: eval fraction 1", ["data", "--eval-fraction", "1"], r"--eval-fraction must be below 1"),
    ("train: unknown model", ["train", "--model", "gpt", "--output-dir", "{tmp}/run"], r"--model: unknown model 'gpt'"),
    ("train: zero steps", ["train", "--max-steps", "0"], r"--max-steps: must be >= 1, got 0"),
    ("train: heads not dividing width", ["train", "--hidden-size", "30", "--num-heads", "4"], r"--hidden-size 30 must be a multiple of --num-heads 4"),
    ("train: kv heads not dividing heads", ["train", "--num-heads", "4", "--num-kv-heads", "3"], r"--num-heads 4 must be a multiple of --num-kv-heads 3"),
    ("train: missing --init-from", ["train", "--init-from", "{tmp}/nope"], r"nope does not exist"),
    ("train: nothing to resume", ["train", "--resume-from-checkpoint", "--output-dir", "{empty}"], r"no complete checkpoint-N in"),
    ("train: output dir is a file", ["train", "--output-dir", "{file}"], r"--output-dir .* is a file"),
    ("bench: negative budget", ["bench", "--budget-gib", "-1"], r"--budget-gib: must be > 0"),
    ("bench: unknown model", ["bench", "--models", "gpt"], r"invalid choice: 'gpt'"),
    ("bench: cuda without a GPU", ["bench", "--device", "cuda"], r"--device cuda: no CUDA GPU is visible here .*--preset gpu --smoke"),
    ("bench: unknown device", ["bench", "--device", "tpu"], r"--device must be cpu, cuda or cuda:N, got 'tpu'"),
    ("bench: --quick against --preset", ["bench", "--quick", "--preset", "gpu"], r"--quick and --preset gpu disagree"),
    ("bench: unknown dtype", ["bench", "--dtype", "fp8"], r"--dtype: invalid choice: 'fp8'"),
    ("distill: KL weight above 1", ["distill", "--output-dir", "{tmp}/d", "--kl-weight", "2"], r"--kl-weight: must be between 0 and 1"),
    ("distill: no output folder", ["distill", "--smoke"], r"the following arguments are required: --output-dir"),
    ("unknown command", ["launch"], r"invalid choice: 'launch'"),
]  # fmt: skip


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory, saved) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "empty").mkdir()
    (tmp / "file.bin").write_text("not a folder")
    return {"tmp": str(tmp), "empty": str(tmp / "empty"), "file": str(tmp / "file.bin"), "model": str(saved)}


@pytest.mark.parametrize(("kind", "argv", "pattern"), CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_cli_mistake(tmp_path, monkeypatch, capsys, cli_paths, kind, argv, pattern):
    monkeypatch.chdir(tmp_path)  # nothing lands in the repository
    monkeypatch.setenv("HF_YOCO_DATA_DIR", str(Path(__file__).resolve().parents[1] / "data"))
    status, stderr = run_cli([arg.format(**cli_paths) for arg in argv], capsys)
    lines = [line for line in stderr.splitlines() if line.startswith("hf-yoco")]
    assert status == 2, stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert re.search(pattern, lines[0]), lines[0]


def test_cli_debug_shows_the_traceback(tmp_path, capsys, cli_paths):
    with pytest.raises(CheckpointError, match="nonexistent does not exist"):
        run_cli(["ppl", "--model", f"{cli_paths['tmp']}/nonexistent", "--debug"], capsys)


def test_kinds_covered():
    kinds = [case[0] for case in MODEL_CASES + FILE_CASES + CLI_CASES] + ["tokenizer missing", "long prompts"]
    assert len(set(kinds)) == len(kinds) >= 30
