"""PEFT LoRA: default target modules registered by `import hf_yoco`, merge == unmerged, generate, save/load."""

import importlib.util

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_MAPPING
from training_utils import REPO, hamlet, tiny_args
from transformers import AutoModelForCausalLM, set_seed

import hf_yoco
from hf_yoco import output_cache
from hf_yoco.integrations import LORA_TARGET_MODULES
from hf_yoco.training import build_model

pytestmark = pytest.mark.transformers_compat

VARIANTS = ["yoco_retention", "yoco_swa", "block"]
CACHES = {"yoco_retention": hf_yoco.YocoCache, "yoco_swa": hf_yoco.YocoCache, "block": hf_yoco.BlockTransformerCache}


@pytest.fixture(scope="module")
def tok():
    return hamlet()[1]


def make_base(tmp_path, variant, tok):
    set_seed(0)
    return build_model(tiny_args(tmp_path, variant), tok).eval()


def lora(model, **kw):
    # init_lora_weights=False: B != 0, so the adapter really changes the outputs
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False, **kw)).eval()


def test_registered_for_both_model_types():
    for model_type in ("hf_yoco", "hf_yoco_block_transformer"):
        assert LORA_MAPPING[model_type] == LORA_TARGET_MODULES[model_type]


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_target_modules(tmp_path, tok, variant):
    peft_model = get_peft_model(make_base(tmp_path, variant, tok), LoraConfig(task_type="CAUSAL_LM"))  # no targets
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    if variant == "block":
        expected = {
            f"model.{stack}.layers.{i}.self_attn.{p}"
            for stack in ("block_decoder", "token_decoder")
            for i in range(1)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
    else:  # layer 0: self-decoder, layer 1: cross-decoder (q/o only), plus the single global K/V
        expected = {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {"model.layers.1.cross_attn.q_proj", "model.layers.1.cross_attn.o_proj"}
        expected |= {"model.global_kv.k_proj", "model.global_kv.v_proj"}
    assert wrapped == expected
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_generate_and_adapter_round_trip(tmp_path, tok, variant):
    ds, _ = hamlet()
    ids = torch.tensor(ds["test"][:2]["input_ids"])
    base_logits = make_base(tmp_path, variant, tok)(input_ids=ids).logits
    peft_model = lora(make_base(tmp_path, variant, tok))
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter is active

    # PeftModel.generate goes through the model's own cache
    prompt = ids[:, :12]
    out = peft_model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 20) and isinstance(output_cache(out), CACHES[variant])
    # greedy decoding with the cache == argmax of a full forward pass (teacher forcing on the generated tokens)
    with torch.no_grad():
        full = peft_model(input_ids=out.sequences).logits
    assert torch.equal(full[:, 11:-1].argmax(-1), out.sequences[:, 12:])

    # adapter save / load round trip on a fresh base
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(make_base(tmp_path, variant, tok), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits)

    # merge_and_unload: a plain transformers model with the same logits and the same greedy continuation
    merged = reloaded.merge_and_unload()
    assert type(merged).__name__.endswith("ForCausalLM") and not any("lora_" in n for n, _ in merged.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(merged.generate(input_ids=prompt, max_new_tokens=8, do_sample=False), out.sequences)


def test_lora_finetune_example(tmp_path):
    """examples/lora_finetune.py end to end (tiny): base on Hamlet, LoRA on Macbeth, reload, merge, save."""
    spec = importlib.util.spec_from_file_location("lora_finetune", REPO / "examples" / "lora_finetune.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    t = tiny_args(tmp_path, "yoco_swa")
    flags = ["--data-dir", t.data_dir, "--vocab-size", "512", "--block-size", "32", "--hidden-size", "32"]
    flags += ["--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1", "--self-decoder", "sliding_window"]
    flags += ["--output-dir", str(tmp_path), "--base-steps", "10", "--max-steps", "10", "--learning-rate", "1e-2"]
    flags += ["--eval-steps", "0", "--save-steps", "0", "--max-eval-samples", "16", "--no-progress", "--cpu"]
    result = example.main(flags)
    assert result["cache_type"] == "YocoCache" and result["same_greedy_tokens"]
    assert result["merged_max_abs_logit_diff"] < 1e-4
    assert result["eval_loss_lora"] < result["eval_loss_base"]  # adapted to Macbeth
    assert result["trainable_params"] < result["params"] // 5
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == "hf_yoco"
