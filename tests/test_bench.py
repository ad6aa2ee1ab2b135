"""The benchmark harness: real measurements on tiny models, reports, and the arithmetic cache sizes."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hf_yoco.bench import (
    BenchSettings,
    arithmetic_cache_bytes,
    markdown_report,
    measure_point,
    measure_regime,
    measure_train,
    run_benchmark,
)

TINY = dict(
    hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=256,
    sliding_window=32, contexts=[256], decode_tokens=2, throughput_context=256, budget_gib=0.002, gen_tokens=4,
    max_batch_cap=8, decode_heavy_prompt=8, decode_heavy_new_tokens=8, decode_heavy_batch=2, threads=1,
)  # fmt: skip


@pytest.mark.parametrize("name", ["llama", "yoco-swa", "yoco-gret", "block-transformer"])
def test_measured_cache_equals_arithmetic(name):
    settings = BenchSettings(**TINY)
    point = measure_point(name, settings, 256)
    assert point["prefill_s"] > 0 and point["decode_tok_s"] > 0
    if name == "block-transformer":  # + the constant local window, pending tokens and counters
        assert 0 < point["cache_bytes"] - point["cache_bytes_arithmetic"] < 64 * 1024
    else:
        assert point["cache_bytes"] == point["cache_bytes_arithmetic"]
    per_sequence = point["cache_bytes"]
    assert point["max_batch"] == max(1, min(int(0.002 * 2**30 // per_sequence), 8))
    assert point["max_batch_decode_tok_s"] > 0 and point["max_batch_e2e_tok_s"] > 0


def test_arithmetic_limits_match_the_readme_targets():
    """At 32K with the default benchmark config the cache ratio limits are ~10x (SWA) and ~11.5x+ (gRet)."""
    settings = BenchSettings()
    llama = arithmetic_cache_bytes("llama", settings, 32768)
    assert 10.0 < llama / arithmetic_cache_bytes("yoco-swa", settings, 32768) < 10.2
    assert 11.5 < llama / arithmetic_cache_bytes("yoco-gret", settings, 32768) < 12.0


def test_run_benchmark_writes_reports(tmp_path):
    settings = BenchSettings(**{**TINY, "models": ["llama", "yoco-swa", "block-transformer"]})
    results = run_benchmark(settings, tmp_path, progress=False)
    assert not [p for p in results["points"] if "error" in p], results["points"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["model"] for r in saved["ratios"]} == {"yoco-swa", "block-transformer"}
    swa = next(r for r in saved["ratios"] if r["model"] == "yoco-swa")
    assert swa["cache_ratio"] == pytest.approx(swa["cache_ratio_limit"])
    assert "decode_heavy_speedup" in saved["ratios"][-1]
    assert (tmp_path / "bench.png").stat().st_size > 0
    report = (tmp_path / "results.md").read_text()
    assert report == markdown_report(saved) and "| yoco-swa | 256 |" in report
    with pytest.raises(ValueError, match="models"):
        run_benchmark(BenchSettings(**{**TINY, "models": ["gpt"]}), progress=False)


# -- the GPU preset and its CPU smoke -----------------------------------------------------------------------------------

SMOKE = BenchSettings.gpu().smoke()


def test_gpu_preset_is_the_papers_scale_and_its_smoke_keeps_every_section():
    gpu = BenchSettings.gpu()
    assert (gpu.hidden_size, gpu.num_layers, gpu.num_heads, gpu.num_kv_heads, gpu.intermediate_size) == (
        2048, 24, 16, 4, 5632)  # fmt: skip
    assert (gpu.device, gpu.dtype, gpu.budget_gib, gpu.throughput_context) == ("cuda", "bfloat16", 16.0, 32768)
    assert gpu.regimes == [[2048, 128, 0], [128, 2048, 0]] and gpu.train_seq == 8192 and max(gpu.contexts) == 131072
    assert SMOKE.device == "cpu" and SMOKE.dtype == "bfloat16" and len(SMOKE.regimes) == 2 and SMOKE.train_seq > 0
    # bf16 K/V: half the bytes of the fp32 CPU presets
    assert arithmetic_cache_bytes("llama", SMOKE, 100) * 2 == arithmetic_cache_bytes(
        "llama", BenchSettings(**{**TINY, **{k: getattr(SMOKE, k) for k in ("hidden_size", "num_layers", "num_heads",
                                                                           "num_kv_heads")}}), 100)  # fmt: skip


def test_regime_fits_the_budget_and_training_step_runs():
    budget_batch = max(1, min(int(SMOKE.budget_gib * 2**30 // arithmetic_cache_bytes("llama", SMOKE, 24)), 4))
    regime = measure_regime("llama", SMOKE, 16, 8, 0)
    assert regime["batch"] == budget_batch and regime["batch_fitted"] and regime["tok_s"] > 0
    fixed = measure_regime("block-transformer", SMOKE, 8, 16, 3)
    assert fixed["batch"] == 3 and not fixed["batch_fitted"] and fixed["cache_bytes"] > 0
    train = measure_train("yoco-gret", SMOKE)
    assert train["batch"] == SMOKE.train_batch and train["seq"] == SMOKE.train_seq and train["tok_s"] > 0


@pytest.mark.parametrize("name", ["llama", "yoco-swa"])
def test_compiled_decode_point_runs_on_static_caches(name):
    """`--compile`: prefill into the model's static cache (transformers' `StaticCache` for Llama), decode with the
    step compiled (fullgraph, inductor on CPU), then the max-batch point on a replicated static cache, compiled
    again for that batch. (The Block Transformer's compiled step: tests/models/test_static_cache.py.)"""
    settings = replace(SMOKE, compile=True, contexts=[32], throughput_context=32, budget_gib=1e-4)
    point = measure_point(name, settings, 32)
    assert point["decode_tok_s"] > 0 and point["max_batch"] > 1 and point["max_batch_decode_tok_s"] > 0


def test_cli_settings_pick_the_gpu_preset_for_cuda(monkeypatch):
    import argparse

    from hf_yoco import bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    settings = bench.settings_from_args(parser.parse_args(["--device", "cuda", "--compile"]))
    assert settings.preset == "gpu" and settings.device == "cuda" and settings.compile
    assert bench.default_output_dir(settings) == Path("benchmarks/results/nvidia-h100-80gb-hbm3")
    fp16 = bench.settings_from_args(
        parser.parse_args(["--device", "cuda:0", "--dtype", "float16", "--contexts", "8192"])
    )
    assert (fp16.dtype, fp16.contexts, fp16.hidden_size) == ("float16", [8192], 2048)
    with pytest.raises(ValueError, match="only 1 CUDA device"):  # a usage error: the CLI prints it, exit 2
        bench.settings_from_args(parser.parse_args(["--device", "cuda:3"]))
    smoke = bench.settings_from_args(parser.parse_args(["--preset", "gpu", "--smoke"]))
    assert smoke.device == "cpu" and bench.default_output_dir(smoke) == Path("benchmarks/results/gpu-smoke")
