"""A saved checkpoint loads with `trust_remote_code=True` in an interpreter where hf_yoco cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_yoco

REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockHfYoco(importlib.abc.MetaPathFinder):  # hf_yoco is installed here: make it unimportable
        def find_spec(self, name, path=None, target=None):
            if name == "hf_yoco" or name.startswith("hf_yoco."):
                raise ImportError("hf_yoco is blocked in this interpreter")

    sys.meta_path.insert(0, BlockHfYoco())
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, input_path, output_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert not any(name.split(".")[0] == "hf_yoco" for name in sys.modules), "hf_yoco was imported"
    inputs = torch.load(input_path)
    with torch.no_grad():
        logits = model(inputs).logits
        generated = model.generate(inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save({"logits": logits, "generated": generated, "module": type(model).__module__}, output_path)
    """
)

CONFIGS = {
    "yoco-swa": lambda: hf_yoco.YocoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, self_decoder_type="sliding_window", sliding_window=4,
    ),
    "yoco-gret": lambda: hf_yoco.YocoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        retention_chunk_size=4, official_numerics=True,
    ),
    "block-transformer": lambda: hf_yoco.BlockTransformerConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, block_length=4, num_block_decoder_layers=2,
        num_token_decoder_layers=2, num_attention_heads=4, num_key_value_heads=2,
    ),
}  # fmt: skip


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
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(checkpoint), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        timeout=300,
    )
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules.")
    with torch.no_grad():
        # Same weights and code path; only the reduction order may differ between processes (thread counts).
        torch.testing.assert_close(remote["logits"], model(inputs).logits, atol=1e-5, rtol=0)
        assert torch.equal(
            remote["generated"], model.generate(inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        )
