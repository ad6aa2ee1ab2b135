"""Writing and reading model folders and training checkpoints so that nothing is lost or half-read.

- `atomic_directory(target)`: everything is written into a hidden temporary folder beside `target`, which replaces
  `target` only once complete. An interrupted write (an exception, SIGKILL, a full disk) leaves `target` as it was:
  absent, or the previous complete version. `save_pretrained` of both models, the converters and the data builder
  write this way.
- `check_model_folder(path)`: a clear `CheckpointError` naming the file for a folder that is missing, not a folder,
  without `config.json`, with a `config.json` that is not JSON, has unknown fields or disagrees with the weights (a
  field removed from `config.json` takes its default), with truncated or corrupted safetensors, or without the
  tokenizer a command needs. `from_pretrained` of both models runs it on local folders.
- `latest_complete_checkpoint(output_dir)`: the newest `checkpoint-N` that the Trainer finished writing (its
  `trainer_state.json`, written last, parses; its weights and optimizer state are whole). A checkpoint interrupted
  mid-write is skipped with a warning, so `--resume-from-checkpoint` never loads one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

WEIGHT_FILES = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
# Keys transformers writes into config.json besides the config's own fields.
CONFIG_BOOKKEEPING = {"architectures", "auto_map", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}


class CheckpointError(ValueError):
    """A model folder or checkpoint that cannot be used, with what is wrong and which file."""


# ------------------------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success it becomes `target`, on any error it is removed.

    If `target` already exists, its files that the new content does not replace are kept (a tokenizer or README saved
    beside the weights), except stale weight files (`model*.safetensors` / `*.bin` and their index, which
    `save_pretrained` replaces as a set). The old folder is renamed aside before the new one takes its name and is
    deleted after: at every instant `target` or that `.old` folder holds a complete version.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder: choose another output folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = target.parent / f".{target.name}.tmp-{token}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists() and any(target.iterdir()):
            for entry in target.iterdir():
                if not (tmp / entry.name).exists() and not WEIGHT_FILES.match(entry.name):
                    if entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name)
                    else:
                        shutil.copy2(entry, tmp / entry.name)
            old = target.parent / f".{target.name}.old-{token}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------ reading


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file `path` cannot be loaded (truncated, corrupted), or None. Reads only its header."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                return f"{path} is truncated ({size} bytes)"
            (header_length,) = struct.unpack("<Q", f.read(8))
            if header_length > size - 8:
                return f"{path} is truncated or corrupted (header of {header_length} bytes in a {size}-byte file)"
            header = json.loads(f.read(header_length))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"{path} is corrupted ({type(error).__name__}: {error})"
    if not isinstance(header, dict):
        return f"{path} is corrupted (its header is not a JSON object)"
    end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    if 8 + header_length + end > size:
        return f"{path} is truncated: its tensors need {8 + header_length + end} bytes, the file has {size}"
    return None


def safetensors_shapes(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tensor name -> shape, from the header of a (checked) safetensors file."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_length))
    return {key: info["shape"] for key, info in header.items() if key != "__metadata__"}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (single or sharded), in load order."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{index} is corrupted ({type(error).__name__}: {error})") from None
        return [folder / shard for shard in shards]
    return [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []


def read_config(folder: Path) -> dict:
    """`config.json` of `folder` as a dict (a `CheckpointError` naming the file otherwise)."""
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(
            f"{folder} has no config.json: it is not a saved model folder (save one with save_pretrained)."
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}.")
    return config


def unknown_config_fields(config_dict: dict, config_class: type) -> list[str]:
    """Keys of a config.json that `config_class` does not know (neither its fields nor transformers' own)."""
    known = set(config_class().to_dict()) | CONFIG_BOOKKEEPING
    return sorted(set(config_dict) - known)


def check_model_folder(
    path: str | os.PathLike, model_class: type | None = None, config=None, need_tokenizer: bool = False
) -> Path:
    """Check a local model folder before it is loaded; returns it as a `Path`.

    With `model_class` (an hf_yoco model class), also: no unknown `config.json` fields, and every tensor in the
    safetensors files has the shape the config implies. `need_tokenizer`: the folder must hold a tokenizer.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist: pass a saved model folder (hub downloads are off here).")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file: pass the folder that holds config.json and the weights.")
    config_dict = read_config(folder)
    files = weight_files(folder)
    if not files:
        found = sorted(p.name for p in folder.iterdir())
        raise CheckpointError(f"{folder} has no model.safetensors (found: {found}); hf_yoco loads safetensors only.")
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{file} is missing (listed in {folder / 'model.safetensors.index.json'}).")
        if problem := safetensors_problem(file):
            raise CheckpointError(f"{problem}: save the model again.")
    if model_class is not None:
        config_class = model_class.config_class
        unknown = unknown_config_fields(config_dict, config_class)
        if unknown:
            raise CheckpointError(
                f"{folder / 'config.json'} has fields {config_class.__name__} does not know: {unknown}. Remove them, or "
                "update hf_yoco if the checkpoint comes from a newer release."
            )
        if config is None:
            config = config_class.from_dict(config_dict)
        mismatches = _shape_mismatches(model_class, config, files)
        if mismatches:
            raise CheckpointError(
                f"{folder / 'config.json'} does not match the weights in {files[0].name}: {mismatches[:3]} "
                f"({len(mismatches)} tensors). A field missing from config.json takes its default; restore the file."
            )
    if need_tokenizer and not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder} has no tokenizer ({' / '.join(TOKENIZER_FILES)}): save it beside the model with "
            "tokenizer.save_pretrained(folder)."
        )
    return folder


def _shape_mismatches(model_class: type, config, files: list[Path]) -> list[str]:
    """'name: file [..] vs config [..]' for every tensor whose saved shape differs from the model's."""
    import torch

    with torch.device("meta"):
        expected = {name: list(t.shape) for name, t in model_class(config).state_dict().items()}
    mismatches = []
    for file in files:
        for name, shape in safetensors_shapes(file).items():
            if name in expected and expected[name] != shape:
                mismatches.append(f"{name}: file {shape} vs config {expected[name]}")
    return mismatches


# ------------------------------------------------------------------------------------------------------ checkpoints


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why a Trainer `checkpoint-N` folder is incomplete (interrupted while written or deleted), or None."""
    checkpoint = Path(checkpoint)
    state = checkpoint / "trainer_state.json"
    try:
        json.loads(state.read_text())  # the Trainer writes it last
    except (OSError, ValueError):
        return f"{state} is missing or incomplete"
    files = weight_files(checkpoint)
    if not files and not any(checkpoint.glob("*.safetensors")):
        return f"{checkpoint} has no weights"
    for file in files or checkpoint.glob("*.safetensors"):
        if problem := safetensors_problem(file):
            return problem
    if not (checkpoint / "optimizer.pt").exists() and not (checkpoint / "pytorch_model_fsdp_0").exists():
        return f"{checkpoint / 'optimizer.pt'} is missing"
    return None


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` in `output_dir` (None if there is none); warns about skipped ones."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    checkpoints = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for checkpoint in sorted(checkpoints, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        warnings.warn(f"skipping {checkpoint}, which was not written completely ({problem})", stacklevel=2)
    return None


def resolve_resume_checkpoint(resume: bool | str | None, output_dir: str | os.PathLike) -> str | None:
    """`--resume-from-checkpoint` as a path: the latest complete checkpoint for `True`, the checked path otherwise."""
    if not resume:
        return None
    if resume is True:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise CheckpointError(
                f"--resume-from-checkpoint: no complete checkpoint-N in {output_dir} to resume from."
            )
        return str(checkpoint)
    if not Path(resume).is_dir():
        raise CheckpointError(f"--resume-from-checkpoint: {resume} is not a checkpoint folder.")
    if problem := checkpoint_problem(resume):
        raise CheckpointError(f"--resume-from-checkpoint: {resume} is incomplete ({problem}); pick an earlier one.")
    return str(resume)
