"""A saved checkpoint loads with `trust_remote_code=True` in an interpreter where hf_yoco cannot be imported, also
under another supported transformers release than the one that saved it.

The cross-release test needs a second interpreter whose transformers is another supported release (CI builds one
with the oldest supported transformers): `HF_YOCO_OTHER_PYTHON=/path/to/python`. Without it, it is skipped."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from tiny_models import CONFIGS
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.transformers_compat

OTHER_PYTHON = os.environ.get("HF_YOCO_OTHER_PYTHON")

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys, warnings

    # The remote code must not use a deprecated cache keyword of this release either.
    warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)

    class BlockHfYoco(importlib.abc.MetaPathFinder):  # hf_yoco is installed here: make it unimportable
        def find_spec(self, name, path=None, target=None):
            if name == "hf_yoco" or name.startswith("hf_yoco."):
                raise ImportError("hf_yoco is blocked in this interpreter")

    sys.meta_path.insert(0, BlockHfYoco())
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    checkpoint, input_path, output_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert not any(name.split(".")[0] == "hf_yoco" for name in sys.modules), "hf_yoco was imported"
    inputs = torch.load(input_path)
    with torch.no_grad():
        logits = model(inputs).logits
        generated = model.generate(inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    module, version = type(model).__module__, transformers.__version__
    torch.save({"logits": logits, "generated": generated, "module": module, "transformers": version}, output_path)
    """
)

# Run where hf_yoco is importable: load a checkpoint with hf_yoco, save it again under this interpreter's transformers,
# and record the reference outputs.
RESAVE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    import hf_yoco

    source, checkpoint, input_path, output_path = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    assert type(model).__module__.startswith("hf_yoco.")
    model.save_pretrained(checkpoint)
    inputs = torch.load(input_path)
    with torch.no_grad():
        logits = model(inputs).logits
        generated = model.generate(inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated, "transformers": transformers.__version__}, output_path)
    """
)


def run_script(python: str, script: str, *args, tmp_path) -> dict:
    """Run `script` in a fresh `python` process (own HF caches) and load the dict it saves as its last argument."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([python, "-c", script, *map(str, args)], check=True, env=env, timeout=300)
    return torch.load(args[-1])


def assert_same_outputs(reference: dict, other: dict) -> None:
    # Same weights and code path; only the reduction order may differ between processes (thread counts).
    torch.testing.assert_close(other["logits"], reference["logits"], atol=1e-5, rtol=0)
    assert torch.equal(other["generated"], reference["generated"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_remote_code_load_without_package(tmp_path, name):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    assert (checkpoint / "modeling_common.py").exists()  # sibling modules travel with the checkpoint
    assert not list(checkpoint.glob("*.bin")) and (checkpoint / "model.safetensors").exists()

    inputs = torch.randint(1, 64, (2, 11))
    torch.save(inputs, tmp_path / "inputs.pt")
    remote = run_script(
        sys.executable, REMOTE_SCRIPT, checkpoint, tmp_path / "inputs.pt", tmp_path / "out.pt", tmp_path=tmp_path
    )
    assert remote["module"].startswith("transformers_modules.")
    assert_same_outputs(local_outputs(model, inputs), remote)


def local_outputs(model, inputs: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = model(inputs).logits
        generated = model.generate(inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return {"logits": logits, "generated": generated}


@pytest.mark.skipif(
    OTHER_PYTHON is None, reason="HF_YOCO_OTHER_PYTHON (an interpreter with another transformers) unset"
)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_moves_between_transformers_releases(tmp_path, name):
    """Saved under this release -> remote code under the other one, and saved under the other -> remote code here:
    same logits and greedy tokens both ways."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    model.save_pretrained(tmp_path / "here")
    inputs = torch.randint(1, 64, (2, 11))
    torch.save(inputs, tmp_path / "inputs.pt")
    reference = local_outputs(model, inputs)

    there = run_script(
        OTHER_PYTHON,
        REMOTE_SCRIPT,
        tmp_path / "here",
        tmp_path / "inputs.pt",
        tmp_path / "there.pt",
        tmp_path=tmp_path,
    )
    assert there["transformers"] != transformers.__version__, "HF_YOCO_OTHER_PYTHON has the same transformers"
    assert_same_outputs(reference, there)

    saved_there = run_script(
        OTHER_PYTHON, RESAVE_SCRIPT, tmp_path / "here", tmp_path / "there_ckpt", tmp_path / "inputs.pt",
        tmp_path / "saved_there.pt", tmp_path=tmp_path,
    )  # fmt: skip
    assert (
        json.loads((tmp_path / "there_ckpt" / "config.json").read_text())["transformers_version"]
        == there["transformers"]
    )
    back_here = run_script(
        sys.executable,
        REMOTE_SCRIPT,
        tmp_path / "there_ckpt",
        tmp_path / "inputs.pt",
        tmp_path / "back.pt",
        tmp_path=tmp_path,
    )
    assert back_here["module"].startswith("transformers_modules.")
    assert_same_outputs(saved_there, back_here)
    assert_same_outputs(reference, back_here)
