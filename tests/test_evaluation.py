"""Perplexity (function, `evaluate` module, CLI) and needle-in-a-haystack on real text with tiny models."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_yoco
from hf_yoco.cli import main as cli_main
from hf_yoco.data import build_shakespeare_corpus, train_bpe_tokenizer
from hf_yoco.evaluation import (
    PERPLEXITY_METRIC,
    build_niah_prompt,
    needle_in_a_haystack,
    save_niah,
    score_answer,
    sliding_window_perplexity,
)

COMMON = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    corpus = build_shakespeare_corpus("hamlet")
    tokenizer = train_bpe_tokenizer([corpus], tmp_path_factory.mktemp("tok"), vocab_size=512)
    return corpus.read_text(), tokenizer


def models():
    torch.manual_seed(0)
    yield (
        "yoco",
        AutoModelForCausalLM.from_config(
            hf_yoco.YocoConfig(**COMMON, self_decoder_type="sliding_window", sliding_window=16)
        ).eval(),
    )
    yield "llama", AutoModelForCausalLM.from_config(LlamaConfig(**COMMON)).eval()


def test_sliding_window_perplexity(corpus_and_tokenizer):
    text, tokenizer = corpus_and_tokenizer
    ids = tokenizer(text[:4000], return_tensors="pt").input_ids[0][:300]
    for _, model in models():
        with torch.no_grad():
            full_loss = model(ids[None], labels=ids[None]).loss.item()
            # One window covering the text == the plain full-sequence loss.
            result = sliding_window_perplexity(model, ids, window=512, stride=256)
            assert result["tokens"] == 299 and result["perplexity"] == pytest.approx(math.exp(full_loss), rel=1e-5)
            # Non-overlapping windows == the token-weighted mean of per-window losses.
            chunks = [ids[i : i + 100] for i in range(0, 300, 100)]
            nll = sum(model(c[None], labels=c[None]).loss.item() * (len(c) - 1) for c in chunks)
            disjoint = sliding_window_perplexity(model, ids, window=100, stride=100)
            assert disjoint["tokens"] == 297 and disjoint["nll"] == pytest.approx(nll / 297, rel=1e-5)
            # Overlapping windows score every predicted token exactly once.
            assert sliding_window_perplexity(model, ids, window=128, stride=32)["tokens"] == 299
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, ids, window=64, stride=128)


def test_perplexity_evaluate_module_and_cli(tmp_path, corpus_and_tokenizer, capsys):
    import evaluate

    text, tokenizer = corpus_and_tokenizer
    _, model = next(models())
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    sample = text[:3000]
    metric = evaluate.load(PERPLEXITY_METRIC)
    result = metric.compute(
        predictions=[sample, text[3000:5000]], model_id=str(tmp_path / "model"), window=128, stride=64
    )
    direct = sliding_window_perplexity(model, tokenizer(sample, return_tensors="pt").input_ids[0], 128, 64)
    assert result["perplexities"][0] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert len(result["perplexities"]) == 2 and result["tokens"] > direct["tokens"]
    (tmp_path / "text.txt").write_text(sample)
    assert cli_main(["ppl", "--model", str(tmp_path / "model"), "--text", str(tmp_path / "text.txt"),
                     "--window", "128", "--stride", "64"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{") :])["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)


def test_niah_prompt_places_needles(corpus_and_tokenizer):
    text, tokenizer = corpus_and_tokenizer
    haystack = tokenizer(text, add_special_tokens=False).input_ids
    for depth in (0.0, 0.3, 0.5, 1.0):
        prompt, answer, needles = build_niah_prompt(tokenizer, haystack, 400, depth, 1, random.Random(0))
        key, value, offset = needles[0]
        question = tokenizer(f"\nWhat is the special magic number of {key}? The special magic number of {key} is",
                             add_special_tokens=False).input_ids  # fmt: skip
        needle = tokenizer(f" The special magic number of {key} is {value}. ", add_special_tokens=False).input_ids
        haystack_tokens = len(prompt) - len(question) - len(needle)
        assert len(prompt) == 400 and prompt[-len(question) :] == question
        assert offset == round(depth * haystack_tokens)  # the needle sits at `depth` of the haystack
        assert value == answer and 1000 <= answer <= 9999
    prompt, answer, needles = build_niah_prompt(tokenizer, haystack, 600, 0.5, 3, random.Random(1))
    decoded = tokenizer.decode(prompt)
    assert len(prompt) == 600 and decoded.count("The special magic number of") == 4  # 3 needles + the question
    assert decoded.rstrip().endswith(f"The special magic number of {needles[0][0]} is")
    assert len({key for key, _, _ in needles}) == 3
    assert score_answer(" 4821. And then", 4821) and not score_answer(" 482", 4821)


def test_niah_grid_runs_for_any_causal_lm(tmp_path, corpus_and_tokenizer):
    text, tokenizer = corpus_and_tokenizer
    for name, model in models():
        results = needle_in_a_haystack(model, tokenizer, text, [128, 256], [0.0, 1.0], num_needles=2, trials=1,
                                       max_new_tokens=4, progress=False)  # fmt: skip
        assert len(results["accuracy"]) == 2 and len(results["accuracy"][0]) == 2
        assert len(results["cells"]) == 4 and all(c["prompt_tokens"] in (128, 256) for c in results["cells"])
        save_niah(results, tmp_path / name)
        assert json.loads((tmp_path / name / "niah.json").read_text())["num_needles"] == 2
        assert (tmp_path / name / "niah.png").stat().st_size > 0
    with pytest.raises(ValueError, match="num_needles"):
        needle_in_a_haystack(model, tokenizer, text, [128], [0.5], num_needles=0)


def _debian_lists_available() -> bool:
    import shutil
    import subprocess

    if shutil.which("apt-cache") is None:
        return False
    policy = subprocess.run(["apt-cache", "policy", "r-cran-janeaustenr"], capture_output=True, text=True).stdout
    return "Candidate:" in policy and "Candidate: (none)" not in policy


@pytest.mark.slow
@pytest.mark.skipif(not _debian_lists_available(), reason="Debian package lists missing: run `apt-get update`")
def test_austen_haystack_from_debian_package(tmp_path):
    from hf_yoco.data import build_austen_corpus

    path = build_austen_corpus("persuasion", tmp_path)
    text = path.read_text()
    assert text.lstrip().startswith("Persuasion") and "Sir Walter Elliot, of Kellynch Hall" in text
    assert 400_000 < len(text) < 500_000
