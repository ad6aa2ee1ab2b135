"""lm-evaluation-harness runs a local YAML task on local JSONL against a saved hf_yoco model (`--model hf`,
`trust_remote_code`), offline."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_yoco
from hf_yoco.data import build_shakespeare_corpus, train_bpe_tokenizer
from hf_yoco.evaluation import write_lm_eval_task

lm_eval_cli = shutil.which("lm_eval")


def test_write_lm_eval_task(tmp_path):
    folder = write_lm_eval_task(build_shakespeare_corpus("hamlet").read_text(), tmp_path, "hamlet_ppl", max_docs=7)
    docs = [json.loads(line) for line in (folder / "hamlet_ppl.jsonl").read_text().splitlines()]
    assert len(docs) == 7 and all(len(d["text"].split()) >= 20 for d in docs)
    yaml = (folder / "hamlet_ppl.yaml").read_text()
    assert "task: hamlet_ppl" in yaml and str((folder / "hamlet_ppl.jsonl").resolve()) in yaml
    assert 'doc_to_target: "{{text}}"' in yaml and "loglikelihood_rolling" in yaml
    with pytest.raises(ValueError, match="paragraph"):
        write_lm_eval_task("too short", tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(lm_eval_cli is None, reason="lm-eval is not installed (pip install lm-eval)")
def test_lm_eval_harness_command(tmp_path):
    corpus = build_shakespeare_corpus("hamlet")
    tokenizer = train_bpe_tokenizer([corpus], tmp_path / "tokenizer", vocab_size=512)
    torch.manual_seed(0)
    config = hf_yoco.YocoConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        self_decoder_type="sliding_window", sliding_window=16, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    tasks = write_lm_eval_task(corpus.read_text(), tmp_path / "tasks", "hamlet_ppl", max_docs=3)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        lm_eval_cli, "--model", "hf",
        "--model_args", f"pretrained={tmp_path / 'model'},trust_remote_code=True,dtype=float32",
        "--include_path", str(tasks), "--tasks", "hamlet_ppl", "--device", "cpu", "--batch_size", "1",
        "--output_path", str(tmp_path / "results"),
    ]  # fmt: skip
    subprocess.run(command, check=True, env=env, timeout=600, cwd=tmp_path)
    result_files = list((tmp_path / "results").rglob("results*.json"))
    assert result_files, "lm_eval wrote no results"
    metrics = json.loads(result_files[0].read_text())["results"]["hamlet_ppl"]
    perplexity = next(v for k, v in metrics.items() if k.startswith("word_perplexity"))
    assert perplexity > 1 and torch.isfinite(torch.tensor(perplexity))
