"""transformers compatibility: the supported-release check and the cache's name (`past_key_values` up to 5.23,
`cache` from 5.24). These tests fail if a future release renames the cache keyword again."""

import inspect
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from tiny_models import CONFIGS
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

import hf_yoco
from hf_yoco import CACHE_NAME, cache_kwarg, output_cache
from hf_yoco.compat import SKIP_CHECK_ENV, check_transformers_version, supported_transformers

pytestmark = pytest.mark.transformers_compat

GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None, disable_compile=True)


def tiny(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


@pytest.fixture(params=list(CONFIGS))
def model(request):
    return tiny(request.param)


def test_declared_range_is_the_one_checked():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    declared = [Requirement(d) for d in pyproject["project"]["dependencies"]]
    (transformers_requirement,) = [r for r in declared if r.name == "transformers"]
    assert supported_transformers() == transformers_requirement  # the installed metadata is pyproject's range
    import transformers

    assert transformers_requirement.specifier.contains(transformers.__version__)


@pytest.mark.parametrize("version", ["5.22.2", "5.26.0", "6.0.0"])
def test_unsupported_release_refused_with_a_clear_message(monkeypatch, version):
    monkeypatch.delenv(SKIP_CHECK_ENV, raising=False)
    with pytest.raises(
        ImportError, match=rf"hf_yoco supports transformers >=5\.\d+,<5\.\d+.*found transformers {version}"
    ):
        check_transformers_version(version)
    monkeypatch.setenv(SKIP_CHECK_ENV, "1")
    with pytest.warns(UserWarning, match=f"found transformers {version}"):
        check_transformers_version(version)


def test_supported_release_accepted(monkeypatch):
    monkeypatch.delenv(SKIP_CHECK_ENV, raising=False)
    lower = next(s.version for s in supported_transformers().specifier if s.operator == ">=")
    check_transformers_version(lower)  # the oldest supported release passes silently


def test_cache_name_is_what_this_release_reads():
    """generate(), prepare_inputs_for_generation and the mask functions take the cache under CACHE_NAME."""
    for function in (
        GenerationMixin.prepare_inputs_for_generation,
        create_causal_mask,
        create_sliding_window_causal_mask,
    ):
        assert CACHE_NAME in inspect.signature(function).parameters, function.__name__


def test_generate_returns_the_users_cache_and_matches_no_cache(model):
    """The canary for a renamed keyword: a cache passed to generate() is the one updated and returned, and its tokens
    are those of generating without any cache (a silently ignored cache gives other tokens)."""
    prompt = torch.randint(1, 64, (2, 7))
    no_cache = model.generate(prompt, max_new_tokens=6, use_cache=False, **GEN)
    cache_class = hf_yoco.YocoCache if isinstance(model, hf_yoco.YocoForCausalLM) else hf_yoco.BlockTransformerCache
    user_cache = cache_class(model.config)
    out = model.generate(prompt, max_new_tokens=6, return_dict_in_generate=True, **cache_kwarg(user_cache), **GEN)
    assert output_cache(out) is user_cache
    assert user_cache.get_seq_length() == 7 + 6 - 1
    assert torch.equal(out.sequences, no_cache)
    # ... and generation continues from it
    longer = model.generate(prompt, max_new_tokens=8, use_cache=False, **GEN)
    continued = model.generate(
        out.sequences,
        attention_mask=torch.ones_like(out.sequences),
        max_new_tokens=2,
        **cache_kwarg(user_cache),
        **GEN,
    )
    assert torch.equal(continued, longer)


def test_forward_accepts_both_names_and_cache_wins(model):
    ids = torch.randint(1, 64, (1, 6))
    with torch.no_grad():
        reference = model(ids).logits[:, 5:]
        for name in ("cache", "past_key_values"):
            prefix = output_cache(model(ids[:, :5], use_cache=True))
            out = model(ids[:, 5:], **{name: prefix})
            torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)
            assert output_cache(out) is prefix and CACHE_NAME in out  # returned under this release's name
        prefix, ignored = output_cache(model(ids[:, :5])), output_cache(model(ids[:, :3]))
        out = model(ids[:, 5:], cache=prefix, past_key_values=ignored)
        assert output_cache(out) is prefix
        torch.testing.assert_close(out.logits, reference, atol=1e-5, rtol=0)


def test_gradient_checkpointed_layers_drop_the_cache_under_this_releases_name():
    """transformers' `GradientCheckpointingLayer` drops the cache it receives under its own name; a layer that received
    the cache under another name would write to it during training."""
    model = tiny("yoco-swa").train()
    model.activation_checkpointing_enable()
    cache = hf_yoco.YocoCache(model.config)
    model(torch.randint(1, 64, (1, 6)), cache=cache).logits.sum().backward()
    assert all(not layer.is_initialized for layer in cache.layers[: model.config.num_self_decoder_layers])


ROOT = Path(__file__).resolve().parents[1]


def test_no_script_folder_shadows_an_installed_package():
    """A script runs with its own folder first on `sys.path`, so a module there named like an installed package
    replaces that package for everything the script imports (`benchmarks/kernels.py` broke every benchmark once
    transformers 5.25 began importing Hugging Face's `kernels`). The repository root holds `kernels/`, which hands the
    name over (see `kernels/__init__.py`)."""
    from importlib.metadata import packages_distributions

    installed = set(packages_distributions())
    for folder in ("benchmarks", "examples"):
        shadowing = sorted(p.name for p in (ROOT / folder).iterdir() if p.suffix == ".py" and p.stem in installed)
        assert not shadowing, f"{folder}/{shadowing} shadow installed packages of the same name: rename them"


def test_the_repository_kernels_folder_hands_its_name_to_an_installed_kernels_library(tmp_path):
    """With the repository root first on `sys.path`, `import kernels` gives Hugging Face's library when one is
    installed (a stand-in here), and this folder, importable as before, when none is."""
    import subprocess
    import sys

    stand_in = tmp_path / "site" / "kernels"
    stand_in.mkdir(parents=True)
    (stand_in / "__init__.py").write_text("")
    probe = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin or '')"
    installed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    installed = installed.stdout.strip()  # Hugging Face's library, if installed (looked up away from the root)
    without = Path(installed).parent if installed else ROOT / "kernels"
    code = "import sys; sys.path[1:1] = sys.argv[1:]; import kernels; print(kernels.__file__)"  # path[0]: the root
    for extra, expected in (([str(stand_in.parent)], stand_in), ([], without)):
        out = subprocess.run([sys.executable, "-c", code, *extra], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert Path(out.stdout.strip()).parent == expected
