import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels (hf_yoco's and Liger's) run on CPU CI through the Triton interpreter. The variable must be set before
# any kernel is decorated (before triton or liger-kernel is first imported), so it is set here, first, and only when
# no CUDA device is present. It changes nothing else: with `kernel_backend="auto"` CPU tensors stay on PyTorch, and
# Liger's kernels only run in models patched with `apply_liger_kernel_to_hf_yoco`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Never reach the Hub from tests; a fresh HF_HOME per session hides no developer cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class _DeprecatedCacheName(logging.Handler):
    """transformers >= 5.24 logs (once) when the cache is read or passed as `past_key_values`; in tests every such use,
    by hf_yoco or by a test, fails where it happens (the name is removed in 5.40). The FutureWarning of the same
    deprecation is an error through `filterwarnings` in pyproject.toml."""

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecated. Use `cache` instead" in record.getMessage():
            raise AssertionError(f"deprecated cache name used: {record.getMessage()}")


logging.getLogger("transformers").addHandler(_DeprecatedCacheName())


# Property-based tests (hypothesis): the default profile "ci" is derandomized (CI is reproducible); "long"
# (HYPOTHESIS_PROFILE=long) runs ten times the examples with fresh randomness, for local runs.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int):
    """`max_examples` of a property test: `n` in CI, ten times that under the "long" profile."""
    return settings(max_examples=n * (10 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 1))


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def load_benchmark(name: str):
    """`benchmarks/<name>.py` imported as module `benchmark_<name>` (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def tiny_needle_rows(self_decoder_layers: int, prompts: int, lengths: tuple[int, int], needles: int, seed: int,
                     attention_top_k: int | None = None, sharpen: bool = False):  # fmt: skip
    """A YOCO-fied tiny random Llama (window 16, 2 sinks) and needle rows in Macbeth for the retrieval-stage tests:
    `(teacher, student, tokenizer, rows)`; with `attention_top_k` the rows hold the teacher's attention, `sharpen`
    scales its q/k first (peaked attention, as a trained model's; a random one's is nearly uniform)."""
    from hf_yoco.convert import yocofy_llama
    from hf_yoco.data import build_shakespeare_corpus, default_data_dir
    from hf_yoco.distill import needle_rows, smoke_teacher

    data_dir = Path(default_data_dir())
    teacher, tokenizer = smoke_teacher(data_dir)
    if sharpen:
        with torch.no_grad():
            for layer in teacher.model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
                layer.self_attn.k_proj.weight.mul_(8)
    student = yocofy_llama(teacher, "sliding_window", 16, num_self_decoder_layers=self_decoder_layers,
                           attention_sink_tokens=2)  # fmt: skip
    haystack = tokenizer(build_shakespeare_corpus("macbeth", data_dir).read_text(), add_special_tokens=False).input_ids
    attention = {} if attention_top_k is None else {"teacher": teacher, "attention_top_k": attention_top_k}
    rows = needle_rows(student, tokenizer, haystack, prompts, lengths, needles=needles, seed=seed, **attention)
    return teacher, student, tokenizer, rows
