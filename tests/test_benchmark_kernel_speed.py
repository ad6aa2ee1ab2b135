"""benchmarks/kernel_speed.py --smoke: every section runs (on CPU through the Triton interpreter) and writes its reports."""

import importlib.util
import json
import math

import pytest
import torch
from conftest import load_benchmark

LENGTHS = (64, 128)
TRAINING = ("fwd", "fwd+bwd")
EXPECTED = {  # section -> implementations, modes
    "gated_retention": (("triton", "torch_chunk", "sdpa_causal"), TRAINING),
    "sliding_window_attention": (("triton", "naive", "sdpa_mask"), TRAINING),
    "shared_kv_decode": (("triton", "naive", "sdpa_grouped"), ("fwd",)),
}
if importlib.util.find_spec("liger_kernel") is not None:
    EXPECTED |= {
        "liger_rms_norm": (("liger", "torch"), TRAINING),
        "liger_swiglu": (("liger", "torch"), TRAINING),
        "liger_rope": (("liger", "torch"), TRAINING),
        "liger_lm_head_ce": (("liger_flce", "torch"), TRAINING),
    }


@pytest.fixture(scope="module")
def script():
    with load_benchmark("kernel_speed") as module:
        yield module


@pytest.fixture(scope="module")
def smoke(script, tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels")
    argv = ["--smoke", "--reps", "1", "--lengths", *map(str, LENGTHS), "--out", str(out)]
    return script.main(argv), out


def test_smoke_run_times_every_op(smoke, script):
    results, out = smoke
    written = json.loads((out / "kernels.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["smoke"] and written["dtype"] == "float32" and written["shapes"]["lengths"] == list(LENGTHS)
    cells = {(row["section"], row["impl"], row["mode"], row["T"]): row for row in written["rows"]}
    expected = {
        (section, impl, mode, length)
        for section, (impls, modes) in EXPECTED.items()
        for impl in impls
        for mode in modes
        for length in LENGTHS
    }
    assert set(cells) == expected and len(written["rows"]) == len(expected)
    for key, row in cells.items():
        assert row["error"] is None, (key, row["error"])
        assert math.isfinite(row["ms"]) and row["ms"] > 0, (key, row["ms"])
    assert not script.failed(written)


def test_smoke_run_writes_markdown(smoke, script):
    results, out = smoke
    report = (out / "kernels.md").read_text()
    assert report.startswith(f"# Kernel micro-benchmark: {results['device']}")
    blocks = report.split("\n## ")[1:]
    titles = [script.SECTION_TITLES[section].format(**results["shapes"]) for section in EXPECTED]
    assert [block.splitlines()[0] for block in blocks] == titles
    for block in blocks:  # a row per length, every timing cell a positive number
        header, _, *rows = [line.strip("|").split(" | ") for line in block.splitlines() if line.startswith("|")]
        assert [int(row[0]) for row in rows] == list(LENGTHS), block
        timings = [i for i, name in enumerate(header) if name.strip().endswith(("fwd", "fwd+bwd"))]
        assert len(timings) >= 3 and all(float(row[i]) > 0 for row in rows for i in timings), block


def test_failed_cells_and_device_slug(script):
    row = dict(section="s", T=1, tokens=1, impl="i", mode="fwd", ms=1.0, peak_mib=None, inputs_mib=None, error=None)
    assert not script.failed({"rows": [row, {**row, "ms": None, "error": "OOM"}]})
    assert script.failed({"rows": [{**row, "ms": None, "error": "RuntimeError: boom"}]})
    assert script.failed({"rows": [{**row, "ms": math.nan}]})
    assert script.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_full_run_needs_cuda(script):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        script.main([])
