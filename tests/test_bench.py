"""The benchmark harness: real measurements on tiny models, reports, and the arithmetic cache sizes."""

import json

import pytest

from hf_yoco.bench import BenchSettings, arithmetic_cache_bytes, markdown_report, measure_point, run_benchmark

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
