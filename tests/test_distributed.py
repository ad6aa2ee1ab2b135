"""Multi-process training on CPU (gloo): the Trainer script under torchrun (DDP) and FSDP2 `fully_shard`."""

import json
import os
import socket
import subprocess
import sys

import pytest
from training_utils import DATA_DIR, REPO, hamlet

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: int = 300) -> None:
    hamlet()  # build the cached data once, before the ranks start
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_YOCO_DATA_DIR": str(DATA_DIR)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    proc = subprocess.run(cmd + list(args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def rank_summaries(out_dir) -> list[dict]:
    return [json.loads((out_dir / f"summary_rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_trainer_script_two_ranks_agree(tmp_path):
    """examples/train.py under `torchrun --nproc_per_node 2`: DDP on gloo, both ranks end with the same weights."""
    torchrun(
        "examples/train.py", "--data-dir", str(DATA_DIR), "--vocab-size", "512", "--block-size", "32",
        "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
        "--output-dir", str(tmp_path), "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4",
        "--eval-steps", "0", "--save-steps", "2", "--max-eval-samples", "8", "--no-progress",
        "--learning-rate", "1e-2", "--activation-checkpointing", "--cpu",
    )  # fmt: skip
    r0, r1 = rank_summaries(tmp_path)
    assert (r0["world_size"], r1["world_size"]) == (2, 2) and (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["global_step"] == r1["global_step"] == 4
    assert r0["param_checksum"] == pytest.approx(r1["param_checksum"], rel=1e-9)  # DDP kept replicas identical
    assert r0["eval_loss_after"] == pytest.approx(r1["eval_loss_after"], rel=1e-6)
    assert r0["eval_loss_after"] < r0["eval_loss_before"]
    assert (tmp_path / "checkpoint-4").is_dir() and (tmp_path / "final" / "config.json").is_file()


@pytest.mark.parametrize("model", ["yoco", "block"])
def test_fsdp2_fully_shard_trains_like_unsharded(tmp_path, model):
    """fully_shard per decoder layer + root on a 2-rank CPU mesh: same losses/weights as an unsharded replica
    trained on the global batch; generation with the model's cache still works after sharding."""
    torchrun("-m", "hf_yoco.distributed", "--model", model, "--steps", "3", "--output-dir", str(tmp_path),
             "--data-dir", str(DATA_DIR))  # fmt: skip
    for s in rank_summaries(tmp_path):
        assert s["world_size"] == 2 and s["dtensor_params"] == s["params"] > 0
        assert s["losses"] == pytest.approx(s["reference_losses"], rel=1e-5)
        assert s["losses"][-1] < s["losses"][0]
        assert s["max_param_diff_vs_reference"] < 1e-5
        assert s["generated"] == s["reference_generated"] and len(s["generated"]) == 20
        assert s["cache_type"] == ("YocoCache" if model == "yoco" else "BlockTransformerCache")
