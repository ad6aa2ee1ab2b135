"""Serving: continuous batching (transformers' engine, `model.generate_batch`) of YOCO, the Block Transformer and a
same-size Llama at equal cache memory.

Every model gets the same paged cache memory: the bytes of the Llama's `num_blocks` blocks (`page_size` tokens of
K/V for every layer), each other model the most blocks that fit them (`hf_yoco.continuous_batching.num_blocks_within`:
transformers sizes a block by the model's own cache groups from 5.25, by a same-depth Llama's before). Llama
spends it on every layer's K/V; YOCO on one global K/V (plus constant-size windows or retention states per request);
the Block Transformer on one entry per block of tokens (plus a constant-size local state per request). The workload
is the same list of requests for every model: prompt lengths log-uniform in a range (the paper scale: 128-8K), new
tokens uniform in a range (64-512), all submitted at once, greedy, no EOS (every request generates its full length).
The token budget per step (`max_batch_tokens`) is at least the longest prompt, so no prompt is split into chunks: the
Block Transformer continues a chunked prompt token by token (its paged step has no block-parallel chunk path yet).

Reported per model: cache bytes, wall time, requests/s, generated tokens/s (and the ratio to Llama's), the largest
and mean number of requests the scheduler held in the cache at once (`concurrent`), and the scheduler steps. Random
weights (speed and memory do not depend on them; `tests/test_continuous_batching.py` proves the tokens equal
per-request greedy `generate()`).

    python benchmarks/serving.py             # CPU scale (a few minutes on 2 cores) -> benchmarks/results/serving/
    python benchmarks/serving.py --smoke     # seconds (CI)
    python benchmarks/serving.py --device cuda --dtype bfloat16 --prompts 128 8192 --new-tokens 64 512 \\
        --hidden-size 2048 --layers 24 --heads 16 --kv-heads 4 --ffn 5632 --window 1024 --requests 256 --num-blocks 4096
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hf_yoco.continuous_batching import num_blocks_within, paged_cache_bytes

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("llama", "yoco-swa", "yoco-gret", "block-transformer")
CPU = dict(hidden_size=256, layers=8, heads=4, kv_heads=2, ffn=704, vocab=4096, window=128, block_length=4,
           requests=32, prompts=(128, 4096), new_tokens=(32, 256), num_blocks=160, page_size=32,
           max_batch_tokens=4096)  # fmt: skip
SMOKE = dict(CPU, hidden_size=64, layers=4, ffn=128, vocab=256, window=16, requests=4, prompts=(8, 48),
             new_tokens=(4, 8), num_blocks=8, page_size=8, max_batch_tokens=64)  # fmt: skip


def workload(settings: dict, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt length, new tokens) per request: prompts log-uniform, new tokens uniform in their ranges."""
    rng = random.Random(seed)
    (p_lo, p_hi), (n_lo, n_hi) = settings["prompts"], settings["new_tokens"]
    return [(round(math.exp(rng.uniform(math.log(p_lo), math.log(p_hi)))), rng.randint(n_lo, n_hi))
            for _ in range(settings["requests"])]  # fmt: skip


def model_config(name: str, settings: dict):
    from hf_yoco.bench import build_config

    size = argparse.Namespace(hidden_size=settings["hidden_size"], num_layers=settings["layers"],
                              num_heads=settings["heads"], num_kv_heads=settings["kv_heads"],
                              intermediate_size=settings["ffn"], vocab_size=settings["vocab"],
                              sliding_window=settings["window"], block_length=settings["block_length"])  # fmt: skip
    return build_config(name, size, max(settings["prompts"]) + max(settings["new_tokens"]))


def build_model(name: str, settings: dict, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(name, settings), dtype=dtype).to(device).eval()


@contextlib.contextmanager
def scheduler_probe(record: list[int]) -> Iterator[None]:
    """Record how many requests the engine's scheduler holds in the cache at each step."""
    from transformers.generation.continuous_batching.scheduler import Scheduler

    classes = [Scheduler, *Scheduler.__subclasses__()]
    originals = {cls: cls.__dict__["schedule_batch"] for cls in classes if "schedule_batch" in cls.__dict__}

    def wrap(original):
        def schedule_batch(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            record.append(len(self.active_requests))
            return result

        return schedule_batch

    for cls, original in originals.items():
        cls.schedule_batch = wrap(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.schedule_batch = original


def engine_config(settings: dict, num_blocks: int | None = None):
    from transformers import ContinuousBatchingConfig

    page = "page_size" if "page_size" in inspect.signature(ContinuousBatchingConfig).parameters else "block_size"
    return ContinuousBatchingConfig(num_blocks=num_blocks or settings["num_blocks"],
                                    max_batch_tokens=settings["max_batch_tokens"], **{page: settings["page_size"]})  # fmt: skip


def measure(name: str, settings: dict, requests: list[tuple[int, int]], device: str, dtype: torch.dtype) -> dict:
    from transformers import GenerationConfig

    import hf_yoco  # noqa: F401  (registers the models and the engine's allocators)

    model = build_model(name, settings, device, dtype)
    rng = random.Random(1)
    inputs = [[rng.randrange(3, settings["vocab"]) for _ in range(prompt)] for prompt, _ in requests]
    budget = paged_cache_bytes(model_config("llama", settings), engine_config(settings), dtype)
    num_blocks = num_blocks_within(model.config, budget, engine_config(settings), dtype)  # Llama's bytes
    engine = engine_config(settings, num_blocks)
    warm = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=2)
    model.generate_batch(inputs=[inputs[0][:8]], generation_config=warm, continuous_batching_config=engine,
                         warmup=False, progress_bar=False)  # fmt: skip
    # generate_batch takes one generation config: requests get their own lengths through per-request max_new_tokens
    # in the engine's add_request; the manager API below is what `transformers serve` uses.
    generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                                  max_new_tokens=max(n for _, n in requests))  # fmt: skip
    held: list[int] = []
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=engine)
    with scheduler_probe(held):
        start = time.perf_counter()
        manager.start()
        for index, (ids, (_, new_tokens)) in enumerate(zip(inputs, requests)):
            manager.add_request(ids, request_id=f"r{index}", max_new_tokens=new_tokens)
        done: dict[str, Any] = {}
        for result in manager:
            if result is not None and result.is_finished():
                done[result.request_id] = result
                if len(done) == len(requests):
                    break
        seconds = time.perf_counter() - start
        cache_bytes = manager.batch_processor.cache.cache_tensor.numel()  # uint8: one element per byte
        manager.stop(block=True)
    errors = [r.error for r in done.values() if r.error]
    if errors or len(done) != len(requests):
        raise RuntimeError(f"{name}: {len(done)}/{len(requests)} requests finished, errors: {errors[:3]}")
    generated = sum(len(r.generated_tokens) for r in done.values())
    return {
        "model": name,
        "non_embedding_parameters": sum(p.numel() for n, p in model.named_parameters() if "embed" not in n),
        "cache_bytes": cache_bytes,
        "num_blocks": num_blocks,
        "requests": len(requests),
        "prompt_tokens": sum(p for p, _ in requests),
        "generated_tokens": generated,
        "seconds": seconds,
        "requests_per_s": len(requests) / seconds,
        "tokens_per_s": generated / seconds,
        "max_concurrent": max(held, default=0),
        "mean_concurrent": statistics.fmean(held) if held else 0.0,
        "steps": len(held),
    }


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "# Continuous batching at equal cache memory",
        "",
        f"transformers {results['transformers']} engine (`generate_batch` / `init_continuous_batching`), "
        f"{results['device']}, {s['dtype']}. Models: d={s['hidden_size']}, {s['layers']} layers, "
        f"{s['heads']}/{s['kv_heads']} heads, FFN {s['ffn']} (YOCO: half self-decoder, window {s['window']}; "
        f"Block Transformer: block length {s['block_length']}), random weights. Cache: the bytes of the Llama's "
        f"{s['num_blocks']} blocks of {s['page_size']} tokens for every model; chunked prefill of {s['max_batch_tokens']} "
        f"tokens per step. Workload: {s['requests']} requests at once, prompts {s['prompts'][0]}-{s['prompts'][1]} "
        f"tokens (log-uniform), {s['new_tokens'][0]}-{s['new_tokens'][1]} new tokens, greedy.",
        "",
        "| model | cache MiB | wall s | requests/s | tokens/s | vs Llama | concurrent (max / mean) | steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results["runs"].get("llama", {}).get("tokens_per_s")
    for run in results["runs"].values():
        ratio = f"{run['tokens_per_s'] / base:.2f}x" if base else "-"
        mib = f"{run['cache_bytes'] / 2**20:.2f}" if run["cache_bytes"] else "-"
        lines.append(f"| {run['model']} | {mib} | {run['seconds']:.1f} | {run['requests_per_s']:.2f} | "
                     f"{run['tokens_per_s']:.1f} | {ratio} | {run['max_concurrent']} / {run['mean_concurrent']:.1f} | "
                     f"{run['steps']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; what CI runs)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--output-dir", type=Path, default=None, help="default: benchmarks/results/serving/")
    for flag, key in (("--hidden-size", "hidden_size"), ("--layers", "layers"), ("--heads", "heads"),
                      ("--kv-heads", "kv_heads"), ("--ffn", "ffn"), ("--vocab", "vocab"), ("--window", "window"),
                      ("--block-length", "block_length"), ("--requests", "requests"), ("--num-blocks", "num_blocks"),
                      ("--page-size", "page_size"), ("--max-batch-tokens", "max_batch_tokens")):  # fmt: skip
        parser.add_argument(flag, dest=key, type=int, default=None)
    parser.add_argument("--prompts", nargs=2, type=int, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", nargs=2, type=int, default=None, metavar=("MIN", "MAX"))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    settings = dict(SMOKE if args.smoke else CPU)
    for key in settings:
        if getattr(args, key, None) is not None:
            settings[key] = tuple(getattr(args, key)) if key in ("prompts", "new_tokens") else getattr(args, key)
    settings["dtype"] = args.dtype
    if settings["prompts"][0] < 1 or settings["prompts"][0] > settings["prompts"][1]:
        raise SystemExit(f"--prompts: need 1 <= MIN <= MAX, got {settings['prompts']}")
    if settings["new_tokens"][0] < 1 or settings["new_tokens"][0] > settings["new_tokens"][1]:
        raise SystemExit(f"--new-tokens: need 1 <= MIN <= MAX, got {settings['new_tokens']}")
    import transformers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    requests = workload(settings)
    results: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__,
                               "device": args.device, "settings": settings, "workload": requests, "runs": {}}  # fmt: skip
    for name in args.models:
        run = measure(name, settings, requests, args.device, getattr(torch, args.dtype))
        results["runs"][name] = run
        print(f"{name:>18}: {run['tokens_per_s']:8.1f} tok/s  {run['requests_per_s']:.2f} req/s  "
              f"concurrent max {run['max_concurrent']}  ({run['seconds']:.1f} s)", flush=True)  # fmt: skip
    out = args.output_dir or ROOT / "benchmarks" / "results" / ("serving-smoke" if args.smoke else "serving")
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(results, indent=1))
    (out / "serving.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
