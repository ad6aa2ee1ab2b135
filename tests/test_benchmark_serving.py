"""benchmarks/serving.py: the smoke run serves the whole workload with every model through transformers' engine at
equal cache memory, and the models that cache less hold more requests at once."""

import json

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def script():
    with load_benchmark("serving") as module:
        yield module


def test_workload_is_reproducible_and_in_range(script):
    settings = dict(script.CPU, requests=200)
    requests = script.workload(settings)
    assert requests == script.workload(settings)
    assert all(128 <= p <= 4096 and 32 <= n <= 256 for p, n in requests)
    assert min(p for p, _ in requests) < 256 and max(p for p, _ in requests) > 2048  # spans the range


def test_smoke_run_serves_every_request_at_equal_cache_memory(script, tmp_path):
    results = script.main(["--smoke", "--output-dir", str(tmp_path)])
    assert json.loads((tmp_path / "serving.json").read_text()) == json.loads(json.dumps(results))
    runs = results["runs"]
    assert list(runs) == list(script.MODELS)
    expected_tokens = sum(n for _, n in results["workload"])
    llama_bytes = runs["llama"]["cache_bytes"]
    for run in runs.values():
        assert run["generated_tokens"] == expected_tokens  # no EOS: every request generates its full length
        assert run["tokens_per_s"] > 0 and run["steps"] > 0
        assert abs(run["cache_bytes"] - llama_bytes) <= 0.1 * llama_bytes  # equal memory (sector rounding aside)
    for name in ("yoco-swa", "yoco-gret", "block-transformer"):  # one global K/V (or block K/V) fits more requests
        assert runs[name]["max_concurrent"] > runs["llama"]["max_concurrent"], name
    report = (tmp_path / "serving.md").read_text()
    assert "| yoco-gret |" in report and "vs Llama" in report


def test_bad_ranges_are_refused(script, tmp_path):
    with pytest.raises(SystemExit, match="--prompts"):
        script.main(["--smoke", "--prompts", "9", "3", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.main(["--smoke", "--models", "gpt", "--output-dir", str(tmp_path)])
