"""`hf-yoco serve` (transformers' OpenAI-compatible server, `transformers serve`) serves saved hf_yoco checkpoints.

One server process with continuous batching on a free local port loads the three architectures on demand (one at a
time: `transformers serve` runs one batching engine and restarts it for another model); a real `openai` client sends
concurrent chat and text completion requests, batched together by the engine; every answer must equal
offline greedy `generate()` on the same prompt (decoded the same way), and the server must stop cleanly on SIGINT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import hf_yoco

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.transformers_compat

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
NEW_TOKENS = 8
CHATS = ["hello there", "what does the global cache hold?", "a", "tell me about sliding windows and retention"]
TEXTS = ["The model", "YOCO caches once, and the cross-decoder", "x"]


def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=320, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")  # fmt: skip
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build(name: str, vocab_size: int):
    torch.manual_seed(0)
    sizes = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.2)  # fmt: skip
    if name == "block":
        return hf_yoco.BlockTransformerForCausalLM(hf_yoco.BlockTransformerConfig(**sizes, block_length=4))
    decoder = {"self_decoder_type": "sliding_window", "sliding_window": 4} if name == "swa" else {
        "self_decoder_type": "gated_retention", "retention_chunk_size": 4}  # fmt: skip
    return hf_yoco.YocoForCausalLM(hf_yoco.YocoConfig(**sizes, num_hidden_layers=4, **decoder))


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    tok = tokenizer()
    paths = {}
    for name in ("swa", "gret", "block"):
        paths[name] = root / name
        build(name, len(tok)).save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def server(checkpoints):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # A fixed cache: left to size itself on a CPU under transformers 5.25, a model process here grew to 14.7 GB.
    command = [sys.executable, "-m", "hf_yoco.cli", "serve", "--continuous-batching", "--device", "cpu",
               "--cb-num-blocks", "64", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
    deadline = time.monotonic() + 120
    while not healthy(port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start:\n{process.stdout.read()}")
        time.sleep(0.5)
    process.port = port
    yield process, client
    if process.poll() is None:
        process.kill()


def offline(path: Path, text: str, chat: bool) -> str:
    """What `generate()` answers on the server's input, decoded as the server does (skipping special tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")["input_ids"]  # fmt: skip
    else:
        ids = tok(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_concurrent_requests_to_every_model_equal_offline_greedy(server, checkpoints):
    process, client = server

    def chat(job):
        name, text = job
        reply = client.chat.completions.create(model=str(checkpoints[name]), temperature=0, max_tokens=NEW_TOKENS,
                                               messages=[{"role": "user", "content": text}])  # fmt: skip
        return reply.choices[0].message.content

    def complete(job):
        name, text = job
        reply = client.completions.create(model=str(checkpoints[name]), prompt=text, temperature=0,
                                          max_tokens=NEW_TOKENS)  # fmt: skip
        return reply.choices[0].text

    for name, path in checkpoints.items():  # one model at a time: transformers serve keeps one batching engine
        chat((name, "warm-up"))  # loads the model and starts its engine
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:  # chat and text requests batched together
                chat_answers = pool.map(chat, [(name, text) for text in CHATS])
                text_answers = pool.map(complete, [(name, text) for text in TEXTS])
                chat_answers, text_answers = list(chat_answers), list(text_answers)
        except openai.APIError:
            process.kill()
            print(process.stdout.read())
            raise
        assert chat_answers == [offline(path, text, chat=True) for text in CHATS], name
        assert text_answers == [offline(path, text, chat=False) for text in TEXTS], name


def test_server_stops_cleanly(server):
    process, _ = server
    assert healthy(process.port)
    process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn finishes in-flight work and exits
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the server did not stop within 60 s of SIGINT")
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    assert not healthy(process.port)


def test_expose_to_transformers_makes_the_classes_loadable_by_name():
    import transformers

    from hf_yoco.serving import SERVABLE, expose_to_transformers

    expose_to_transformers()
    for name in SERVABLE:
        assert getattr(transformers, name) is getattr(hf_yoco, name)


def test_a_bad_option_is_refused_before_anything_starts(capsys):
    from hf_yoco.cli import main

    assert main(["serve", "--no-such-option"]) == 2
    assert "No such option" in capsys.readouterr().err
