"""benchmarks/profile_train_step.py on tiny models: time categories add up, reports are written, the measured
logits/loss tensors match the arithmetic."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_train_step.py"
TINY = [
    "--hidden-size", "64", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
    "--intermediate-size", "128", "--vocab-size", "256", "--sliding-window", "32",
    "--batch", "1", "--seq-len", "128", "--warmup", "1", "--steps", "1", "--top-ops", "1000", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("profile_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize(
    "name, tag, category",
    [
        ("aten::mm", None, "matmul (linear/GEMM)"),
        ("autograd::engine::evaluate_function: MmBackward0", None, "matmul (linear/GEMM)"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", None, "attention (sdpa/softmax)"),
        ("ScaledDotProductFlashAttentionForCpuBackward0", None, "attention (sdpa/softmax)"),
        ("aten::_log_softmax_backward_data", None, "loss (log_softmax/nll + backward)"),
        ("aten::nll_loss_forward", None, "loss (log_softmax/nll + backward)"),
        ("aten::silu_backward", None, "elementwise (norm / RoPE / SwiGLU act / residual)"),
        ("aten::add_", None, "elementwise (norm / RoPE / SwiGLU act / residual)"),
        ("aten::copy_", None, "other"),
        ("torch::autograd::AccumulateGrad", None, "other"),
        ("aten::bmm", "gated_retention", "gated retention"),
        ("aten::mm", "lm_head", "matmul (linear/GEMM)"),
    ],
)
def test_op_category(script, name, tag, category):
    assert script.op_category(name, tag) == category


def test_main_writes_reports_that_add_up(script, tmp_path):
    from hf_yoco.models import modeling_yoco

    results = script.main([*TINY, "--output-dir", str(tmp_path)])
    for name in script.RETENTION_FUNCTIONS:  # the profiling scopes are removed again
        assert not hasattr(getattr(modeling_yoco, name), "__wrapped__"), name
    written = json.loads((tmp_path / "profile_train_step.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert "| yoco-gret |" in (tmp_path / "profile_train_step.md").read_text()
    assert [r["model"] for r in written["models"]] == ["llama", "yoco-swa", "yoco-gret", "block-transformer"]

    for r in written["models"]:
        shares = r["share_pct"]
        assert list(shares) == list(script.CATEGORIES)
        assert sum(shares.values()) == pytest.approx(100.0, abs=1e-6)
        assert r["profiled_ms_per_step"] == pytest.approx(r["key_averages_ms_per_step"], rel=1e-6)
        for category in ("matmul (linear/GEMM)", "attention (sdpa/softmax)", "loss (log_softmax/nll + backward)"):
            assert shares[category] > 0, (r["model"], category)
        assert (shares["gated retention"] > 0) == (r["model"] == "yoco-gret"), r["model"]
        if r["model"] == "yoco-gret":  # the retention core's GEMMs, forward and backward, are tagged by scope
            categories = {(op["op"], op["category"]) for op in r["top_ops"]}
            for op in ("aten::bmm", "autograd::engine::evaluate_function: BmmBackward0"):
                assert (op, "gated retention") in categories and (op, "matmul (linear/GEMM)") not in categories, op
            assert ("aten::mm", "matmul (linear/GEMM)") in categories
        assert 0 < r["lm_head_pct"] < shares["matmul (linear/GEMM)"]

        memory = r["memory"]
        logits = 1 * 128 * 256 * 4
        assert memory["logits_bytes"] == logits
        # logits, log-probs, d log-probs, d logits; at most the last three live together
        assert memory["vocab_tensors_allocated_bytes"] == 4 * logits
        assert memory["vocab_tensors_max_live_bytes"] == 3 * logits == memory["loss_path_bytes_live_at_once"]
        assert memory["step_peak_bytes"] >= memory["vocab_tensors_max_live_bytes"]
        assert memory["total_peak_bytes"] == memory["param_bytes"] + memory["step_peak_bytes"]
