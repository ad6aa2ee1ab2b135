"""`hf-yoco bench`: memory and speed of YOCO-SWA, YOCO-gRet and the Block Transformer against a same-size Llama.

    hf-yoco bench --quick                                  # CPU, ~1 minute: small models, 1K/2K contexts
    hf-yoco bench                                          # CPU, the README's sweep (~15 minutes on 2 cores)
    hf-yoco bench --device cuda --dtype bfloat16           # GPU preset at the paper's scale (~8 minutes on an H100)
    hf-yoco bench --device cuda --dtype bfloat16 --compile # the same with static caches + torch.compile decode
    hf-yoco bench --preset gpu --smoke                     # the GPU preset's every section, tiny, on CPU (CI)

Every (model, context) point runs in a fresh subprocess so peak memory is its own: the worker builds the model
(random weights, fixed seed, `--dtype`, on `--device`), prefills one sequence with `logits_to_keep=1`, and records

- `prefill_s` and `prefill_peak_mib`: wall time, and the peak memory growth during prefill (CUDA: the allocator's
  peak; CPU: the peak RSS, Linux `VmHWM`, reset first);
- `cache_bytes`: bytes of the cache tensors after prefill (`memory_bytes()`, or the K/V tensors of a DynamicCache);
- `decode_tok_s`: greedy decode tokens/s at batch 1 after the prefill;
- at `--throughput-context`: `max_batch` whose cache fits `--budget-gib`, and `max_batch_decode_tok_s`, the decode
  tokens/s of that batch (the prefilled cache replicated with `batch_repeat_interleave`), plus
  `max_batch_e2e_tok_s`, which also charges the batch's prefill (batch x `prefill_s`) for `--gen-tokens` tokens.

With `--compile` every model (Llama included) decodes through its static cache (`StaticCache`, `YocoStaticCache`,
`BlockTransformerStaticCache`) with the step compiled by `torch.compile(fullgraph=True)` ("reduce-overhead", i.e.
CUDA graphs, on a GPU): the fastest path of each. Regimes (`regimes`: prompt, new tokens, batch; batch 0 = as many
sequences as fit `--budget-gib` of cache for that model) time `generate()` end to end; the GPU preset runs the Block
Transformer paper's two (2048/128 and 128/2048). The training point times forward + backward at `train_seq` tokens
with the largest batch that fits (CUDA; doubling until out of memory) or `train_batch`. Results: `results.json`,
`results.md` (tables with ratios vs Llama) and PNG plots in `--output-dir` (default for a GPU:
`benchmarks/results/<gpu name>/`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .cli import positive_float, positive_int, usage_error
from .models.modeling_common import cache_kwarg, output_cache

# bench model name -> `hf_yoco.training.tiny_config` arguments that pick the architecture
MODEL_KWARGS = {
    "llama": dict(model="llama"),
    "yoco-swa": dict(model="yoco", self_decoder_type="sliding_window"),
    "yoco-gret": dict(model="yoco", self_decoder_type="gated_retention"),
    "block-transformer": dict(model="block"),
}
MODELS = tuple(MODEL_KWARGS)


@dataclass
class BenchSettings:
    """Benchmark configuration (the defaults are the README's benchmark: d=768, 12 layers, 12q/4kv heads, W=1024)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 4
    intermediate_size: int = 2048
    vocab_size: int = 32000
    sliding_window: int = 1024
    block_length: int = 4
    contexts: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    decode_tokens: int = 16
    throughput_context: int = 16384
    budget_gib: float = 4.0
    gen_tokens: int = 128
    max_batch_cap: int = 128
    decode_heavy_prompt: int = 128
    decode_heavy_new_tokens: int = 256
    decode_heavy_batch: int = 32
    models: list[str] = field(default_factory=lambda: list(MODELS))
    threads: int = 2
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    # (prompt, new tokens, batch; batch 0 = as many as fit `budget_gib`): generate() throughput, Llama and the
    # Block Transformer. Empty: the decode-heavy point above (the CPU presets).
    regimes: list[list[int]] = field(default_factory=list)
    train_seq: int = 0  # 0: no training-step point
    train_batch: int = 0  # 0: the largest power of two that fits (CUDA), else 1
    preset: str = "cpu"

    @classmethod
    def quick(cls) -> BenchSettings:
        """About a minute on a 2-core CPU: a small model and short contexts."""
        return cls(
            hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=4096,
            sliding_window=128, contexts=[1024, 2048], decode_tokens=8, throughput_context=2048, budget_gib=0.25,
            gen_tokens=32, max_batch_cap=64, decode_heavy_prompt=32, decode_heavy_new_tokens=32,
            decode_heavy_batch=16, preset="quick",
        )  # fmt: skip

    @classmethod
    def gpu(cls) -> BenchSettings:
        """One GPU, bf16, the scale of the papers' comparisons: d=2048, 24 layers, 16 query / 4 kv heads (head 128),
        FFN 5632, vocab 32000, window 1024; contexts 4K..128K, a 16 GiB cache budget at 32K, the Block Transformer's
        two regimes, and a training step at 8K."""
        return cls(
            hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=4, intermediate_size=5632, vocab_size=32000,
            sliding_window=1024, contexts=[4096, 8192, 32768, 131072], decode_tokens=32, throughput_context=32768,
            budget_gib=16.0, gen_tokens=128, max_batch_cap=512, regimes=[[2048, 128, 0], [128, 2048, 0]],
            train_seq=8192, device="cuda", dtype="bfloat16", threads=8, preset="gpu",
        )  # fmt: skip

    def smoke(self) -> BenchSettings:
        """The same sections at tiny sizes (seconds on a CPU): what CI runs of a preset."""
        return replace(
            self, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=256,
            sliding_window=16, contexts=[64, 128], decode_tokens=2, throughput_context=128, budget_gib=0.001,
            gen_tokens=4, max_batch_cap=4, decode_heavy_prompt=8, decode_heavy_new_tokens=8, decode_heavy_batch=2,
            regimes=[[16, 8, 0], [8, 16, 0]] if self.regimes else [], train_seq=64 if self.train_seq else 0,
            train_batch=2, device="cpu", threads=1, preset=f"{self.preset}-smoke",
        )  # fmt: skip

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def check_models(models: list[str]) -> None:
    """Fail on any name that is not one of `MODELS`."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"`models` must be drawn from {MODELS}, got {unknown}")


def build_config(name: str, settings: BenchSettings, context: int):
    """The model config for `name` at the benchmark width/depth/heads (`hf_yoco.training.tiny_config`).

    `settings` is a `BenchSettings` or any object with its model-size fields (`hidden_size`, `num_layers`,
    `num_heads`, `num_kv_heads`, `intermediate_size`, `vocab_size`, `sliding_window`, `block_length`).
    """
    from .training import tiny_config

    if name not in MODEL_KWARGS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return tiny_config(
        **MODEL_KWARGS[name],
        vocab_size=settings.vocab_size,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        num_kv_heads=settings.num_kv_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=max(context * 2, 4096),
        sliding_window=settings.sliding_window,
        block_length=settings.block_length,
    )


def cache_bytes(cache) -> int:
    """Bytes of the tensors a cache holds."""
    if hasattr(cache, "memory_bytes"):
        return int(cache.memory_bytes()["total"])
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def arithmetic_cache_bytes(name: str, settings: BenchSettings, tokens: int, batch: int = 1) -> int:
    """What the cache must hold for `tokens` tokens (K/V in `settings.dtype`, retention states in fp32), from the
    architecture alone."""
    head_dim = settings.hidden_size // settings.num_heads
    kv_row = 2 * settings.num_kv_heads * head_dim * settings.torch_dtype.itemsize  # K and V of one position
    half = settings.num_layers // 2
    if name == "llama":
        return batch * settings.num_layers * tokens * kv_row
    if name == "yoco-swa":
        return batch * (tokens + half * (min(tokens, settings.sliding_window) - 1)) * kv_row
    if name == "yoco-gret":
        return batch * (tokens * kv_row + half * settings.num_heads * head_dim * head_dim * 4)
    if name == "block-transformer":
        blocks = tokens // settings.block_length
        return batch * half * blocks * kv_row  # + a constant local window, pending tokens and counters
    raise ValueError(name)


def _rss_peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux
    except OSError:
        pass


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


class _Meter:
    """Wall time and peak memory growth of a block of work on `device` (CUDA: synchronised, the allocator's peak;
    CPU: the peak RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> _Meter:
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = _rss_kib("VmRSS") * 1024
            _rss_peak_reset()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self._start
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else _rss_kib("VmHWM") * 1024
        self.peak_mib = max(peak - self._base, 0) / 2**20


def _worker_model(name: str, settings: BenchSettings, context: int):
    """Worker set-up: `settings.threads` torch threads, seed 0, and the model for `name` (random weights, eval),
    created directly on `settings.device` in `settings.dtype`."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = AutoModelForCausalLM.from_config(build_config(name, settings, context), dtype=settings.torch_dtype)
    return model.eval()


def static_cache(model, max_cache_len: int):
    """The model's static cache (for `--compile`): `YocoStaticCache`, `BlockTransformerStaticCache` or `StaticCache`."""
    from transformers import StaticCache

    from . import BlockTransformerStaticCache, YocoStaticCache

    model_type = model.config.model_type
    if model_type == "hf_yoco":
        return YocoStaticCache(config=model.config, max_cache_len=max_cache_len)
    if model_type == "hf_yoco_block_transformer":
        return BlockTransformerStaticCache(model.config, max_cache_len=max_cache_len)
    return StaticCache(config=model.config, max_cache_len=max_cache_len)


def compiled_step(model, settings: BenchSettings):
    """`model.forward` compiled for decode steps: fullgraph, static shapes, CUDA graphs on a GPU."""
    mode = "reduce-overhead" if settings.device.startswith("cuda") else "default"
    return torch.compile(model.forward, fullgraph=True, dynamic=False, mode=mode)


def _mark_static(cache) -> None:
    """Re-mark a static cache's tensors as fixed addresses after a batch operation replaced them."""
    from .models.modeling_common import cache_tensors

    for tensor in cache_tensors(cache):
        torch._dynamo.mark_static_address(tensor)


def _repeat_batch(cache, repeats: int) -> None:
    """`cache.batch_repeat_interleave`, also for transformers' `StaticCache` (whose layers have no batch operations)."""
    from transformers import StaticCache

    if type(cache) is not StaticCache:
        cache.batch_repeat_interleave(repeats)
        return
    for layer in cache.layers:
        if isinstance(getattr(layer, "keys", None), torch.Tensor):
            layer.keys = layer.keys.repeat_interleave(repeats, dim=0)
            layer.values = layer.values.repeat_interleave(repeats, dim=0)


def _decode(step, cache, token: torch.Tensor, steps: int, meter: _Meter) -> tuple[float, torch.Tensor]:
    """Greedy decode `steps` tokens from `token` through `cache` with `step` (forward or compiled); seconds/step."""
    meter.sync()
    start = time.perf_counter()
    for _ in range(steps):
        out = step(input_ids=token, **cache_kwarg(cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    meter.sync()
    return (time.perf_counter() - start) / steps, token


def measure_point(name: str, settings: BenchSettings, context: int) -> dict:
    """Worker body: prefill, cache size, batch-1 decode and (at the throughput context) max-batch decode."""
    model = _worker_model(name, settings, context)
    device = torch.device(settings.device)
    meter = _Meter(device)
    input_ids = torch.randint(3, settings.vocab_size, (1, context), device=device)
    result = {"model": name, "context": context, "parameters": model.num_parameters()}
    warmup = 2 if settings.compile else 0  # compiled steps: the first calls compile / record the CUDA graph
    with torch.inference_mode():
        cache = static_cache(model, context + warmup + settings.decode_tokens + 1) if settings.compile else None
        kwargs = cache_kwarg(cache) if cache is not None else {}
        with meter:
            out = model(input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        result["prefill_s"], result["prefill_peak_mib"] = meter.seconds, meter.peak_mib
        cache = output_cache(out)
        result["cache_bytes"] = cache_bytes(cache)
        result["cache_bytes_arithmetic"] = arithmetic_cache_bytes(name, settings, context)
        token = out.logits[:, -1:].argmax(-1)
        del out
        step = compiled_step(model, settings) if settings.compile else model
        if warmup:
            _, token = _decode(step, cache, token, warmup, meter)
        step_s, token = _decode(step, cache, token, settings.decode_tokens, meter)
        result["decode_tok_s"] = 1 / step_s
        if context == settings.throughput_context:
            per_sequence = cache_bytes(cache)
            batch = int(settings.budget_gib * 2**30 // max(per_sequence, 1))
            batch = max(1, min(batch, settings.max_batch_cap))
            result["max_batch"] = batch
            result["max_batch_capped"] = batch == settings.max_batch_cap
            if settings.compile:  # the step was compiled for batch 1: compile again for this batch
                cache = static_cache(model, context + 2 * warmup + settings.decode_tokens + 1)
                token = (
                    model(input_ids, use_cache=True, logits_to_keep=1, **cache_kwarg(cache)).logits[:, -1:].argmax(-1)
                )
            _repeat_batch(cache, batch)
            if settings.compile:
                _mark_static(cache)
                step = compiled_step(model, settings)
            tokens = token.repeat(batch, 1)
            if warmup:
                _, tokens = _decode(step, cache, tokens, warmup, meter)
            step_s, _ = _decode(step, cache, tokens, max(2, settings.decode_tokens // 2), meter)
            result["max_batch_decode_tok_s"] = batch / step_s
            total_s = batch * result["prefill_s"] + settings.gen_tokens * step_s
            result["max_batch_e2e_tok_s"] = batch * settings.gen_tokens / total_s
    return result


def _generate_kwargs(settings: BenchSettings, new_tokens: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True)  # fmt: skip
    if not settings.compile:
        return {**kwargs, "disable_compile": True}
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead")
    if not settings.device.startswith("cuda"):
        config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {**kwargs, "cache_implementation": "static", "compile_config": config}


def measure_regime(name: str, settings: BenchSettings, prompt: int, new_tokens: int, batch: int) -> dict:
    """`generate()` throughput for a prompt / generation length at a batch (0: as many as fit `budget_gib`)."""
    fitted = batch == 0
    if fitted:
        per_sequence = arithmetic_cache_bytes(name, settings, prompt + new_tokens)
        batch = max(1, min(int(settings.budget_gib * 2**30 // per_sequence), settings.max_batch_cap))
    model = _worker_model(name, settings, prompt + new_tokens)
    device = torch.device(settings.device)
    ids = torch.randint(3, settings.vocab_size, (batch, prompt), device=device)
    kwargs = _generate_kwargs(settings, new_tokens)
    with torch.inference_mode():
        if settings.compile:  # compile (and record the CUDA graph) outside the timing
            model.generate(ids, **{**kwargs, "max_new_tokens": 3, "min_new_tokens": 3})
        with _Meter(device) as meter:
            out = model.generate(ids, **kwargs)
    generated = out.sequences[:, prompt:].numel()
    return {
        "model": name, "prompt": prompt, "new_tokens": new_tokens, "batch": batch, "batch_fitted": fitted,
        "batch_capped": fitted and batch == settings.max_batch_cap, "seconds": meter.seconds,
        "tok_s": generated / meter.seconds, "peak_mib": meter.peak_mib, "cache_bytes": cache_bytes(output_cache(out)),
    }  # fmt: skip


def measure_decode_heavy(name: str, settings: BenchSettings) -> dict:
    """Short prompt, long `generate()` at a fixed batch: the Block Transformer's favourable regime (CPU presets)."""
    result = measure_regime(
        name, settings, settings.decode_heavy_prompt, settings.decode_heavy_new_tokens, settings.decode_heavy_batch
    )
    return {key: result[key] for key in ("model", "batch", "prompt", "new_tokens", "seconds", "tok_s", "cache_bytes")}


def measure_train(name: str, settings: BenchSettings) -> dict:
    """Forward + backward tokens/s at `train_seq` tokens per sequence, with `train_batch` sequences or (0, CUDA) the
    largest power of two that fits."""
    model = _worker_model(name, settings, settings.train_seq).train()
    device = torch.device(settings.device)
    meter = _Meter(device)

    def step(batch: int) -> None:
        ids = torch.randint(3, settings.vocab_size, (batch, settings.train_seq), device=device)
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    batch = settings.train_batch or 1
    if settings.train_batch == 0 and meter.cuda:
        while batch * 2 <= settings.max_batch_cap:
            try:
                step(batch * 2)
            except torch.cuda.OutOfMemoryError:
                break
            batch *= 2
        torch.cuda.empty_cache()
    step(batch)  # warm-up
    steps = 3
    with meter:
        for _ in range(steps):
            step(batch)
    tokens = steps * batch * settings.train_seq
    return {"model": name, "batch": batch, "seq": settings.train_seq, "tok_s": tokens / meter.seconds,
            "peak_mib": meter.peak_mib}  # fmt: skip


def _run_worker(kind: str, name: str, settings: BenchSettings, timeout: float = 3600, **job) -> dict:
    payload = json.dumps({"kind": kind, "name": name, "settings": asdict(settings), **job})
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_yoco.bench", "--worker", payload],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"model": name, **job, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info(device: str = "cpu") -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30, 1)
    try:
        import transformers

        info["transformers"] = transformers.__version__
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (OSError, ValueError):
        pass
    return info


def run_benchmark(settings: BenchSettings, output_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Run every (model, context) point, the regimes (or the decode-heavy point) and the training point; write
    JSON / markdown / PNG if `output_dir`."""
    from tqdm.auto import tqdm

    check_models(settings.models)
    results = {"settings": asdict(settings), "machine": machine_info(settings.device), "points": [],
               "decode_heavy": [], "regimes": [], "train": []}  # fmt: skip
    jobs = [("point", m, {"context": c}) for c in settings.contexts for m in settings.models]
    regime_models = [m for m in ("llama", "block-transformer") if m in settings.models]
    if settings.regimes:
        jobs += [("regime", m, {"prompt": p, "new_tokens": n, "batch": b}) for p, n, b in settings.regimes
                 for m in regime_models]  # fmt: skip
    else:
        jobs += [("decode_heavy", m, {}) for m in regime_models]
    if settings.train_seq:
        jobs += [("train", m, {}) for m in settings.models]
    key = {"point": "points", "regime": "regimes", "decode_heavy": "decode_heavy", "train": "train"}
    for kind, name, job in tqdm(jobs, desc="bench", disable=not progress):
        results[key[kind]].append(_run_worker(kind, name, settings, **job))
    results["ratios"] = ratios(results)
    if output_dir is not None:
        write_reports(results, Path(output_dir))
    return results


def ratios(results: dict) -> list[dict]:
    """Per context and model: Llama / model for cache, prefill time, peak memory; model / Llama for speeds."""
    by_key = {(p["model"], p["context"]): p for p in results["points"] if "error" not in p}
    settings = BenchSettings(**results["settings"])
    rows = []
    for (name, context), point in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        llama = by_key.get(("llama", context))
        if llama is None or name == "llama":
            continue
        limit = arithmetic_cache_bytes("llama", settings, context) / arithmetic_cache_bytes(name, settings, context)
        row = {
            "model": name,
            "context": context,
            "cache_ratio": llama["cache_bytes"] / point["cache_bytes"],
            "cache_ratio_limit": limit,
            "prefill_speedup": llama["prefill_s"] / point["prefill_s"],
            "prefill_memory_ratio": point["prefill_peak_mib"] / max(llama["prefill_peak_mib"], 1e-9),
            "decode_speedup": point["decode_tok_s"] / llama["decode_tok_s"],
        }
        if "max_batch_decode_tok_s" in point and "max_batch_decode_tok_s" in llama:
            row["max_batch_decode_speedup"] = point["max_batch_decode_tok_s"] / llama["max_batch_decode_tok_s"]
            row["max_batch_e2e_speedup"] = point["max_batch_e2e_tok_s"] / llama["max_batch_e2e_tok_s"]
        rows.append(row)
    heavy = {r["model"]: r for r in results["decode_heavy"] if "error" not in r}
    if "llama" in heavy and "block-transformer" in heavy:
        rows.append(
            {
                "model": "block-transformer",
                "context": "decode-heavy",
                "decode_heavy_speedup": heavy["block-transformer"]["tok_s"] / heavy["llama"]["tok_s"],
            }
        )
    regimes = {(r["model"], r["prompt"], r["new_tokens"]): r for r in results.get("regimes", []) if "error" not in r}
    for (name, prompt, new_tokens), regime in regimes.items():
        llama = regimes.get(("llama", prompt, new_tokens))
        if name != "llama" and llama is not None:
            rows.append({"model": name, "context": f"regime {prompt}/{new_tokens}",
                         "regime_speedup": regime["tok_s"] / llama["tok_s"]})  # fmt: skip
    train = {r["model"]: r for r in results.get("train", []) if "error" not in r}
    for name, point in train.items():
        if name != "llama" and "llama" in train:
            rows.append({"model": name, "context": f"train {point['seq']}",
                         "train_speedup": point["tok_s"] / train["llama"]["tok_s"]})  # fmt: skip
    return rows


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(results: dict) -> str:
    lines = ["# hf-yoco bench", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()), ""]
    s = results["settings"]
    lines += [
        f"Models: d={s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} query / {s['num_kv_heads']} kv "
        f"heads, FFN {s['intermediate_size']}, vocab {s['vocab_size']}, window {s['sliding_window']}, "
        f"{s.get('dtype', 'float32')} on {s.get('device', 'cpu')}, {s['threads']} threads"
        + (", decode through static caches with a compiled step (`--compile`)." if s.get("compile") else ", eager."),
        "",
        "| model | context | prefill s | prefill peak MiB | cache MiB | decode tok/s (bs 1) | max batch | "
        "decode tok/s (max batch) | e2e tok/s (max batch) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in results["points"]:
        if "error" in p:
            lines.append(f"| {p['model']} | {p['context']} | error: {p['error']} |||||||")
            continue
        lines.append(
            f"| {p['model']} | {p['context']} | {_fmt(p['prefill_s'])} | {_fmt(p['prefill_peak_mib'], 0)} | "
            f"{_fmt(p['cache_bytes'] / 2**20)} | {_fmt(p['decode_tok_s'])} | {_fmt(p.get('max_batch'))} | "
            f"{_fmt(p.get('max_batch_decode_tok_s'))} | {_fmt(p.get('max_batch_e2e_tok_s'))} |"
        )
    lines += ["", "Ratios against the same-size Llama (higher is better, except peak memory):", ""]
    lines += [
        "| model | context | cache (limit) | prefill speed-up | prefill peak memory | decode bs1 | max-batch decode "
        "| max-batch e2e |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["ratios"]:
        if "cache_ratio" not in r:
            continue
        lines.append(
            f"| {r['model']} | {r['context']} | {_fmt(r['cache_ratio'], 1)}x ({_fmt(r['cache_ratio_limit'], 1)}x) | "
            f"{_fmt(r['prefill_speedup'])}x | {_fmt(r['prefill_memory_ratio'])}x | {_fmt(r['decode_speedup'])}x | "
            f"{_fmt(r.get('max_batch_decode_speedup'))}x | {_fmt(r.get('max_batch_e2e_speedup'))}x |"
        )
    if results["decode_heavy"]:
        lines += ["", "Decode-heavy (short prompt, long generation, same batch):", ""]
        lines += ["| model | batch | prompt | new tokens | tok/s | cache MiB |", "|---|---|---|---|---|---|"]
        for r in results["decode_heavy"]:
            if "error" in r:
                lines.append(f"| {r['model']} | error: {r['error']} |||||")
                continue
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {_fmt(r['tok_s'])} | "
                f"{_fmt(r['cache_bytes'] / 2**20)} |"
            )
        for r in results["ratios"]:
            if r["context"] == "decode-heavy":
                lines.append(f"\nBlock Transformer decode-heavy speed-up: {_fmt(r['decode_heavy_speedup'])}x")
    speedups = {(r["model"], r["context"]): r for r in results["ratios"]}
    if results.get("regimes"):
        lines += ["", "Regimes (`generate()`, batch as large as fits the cache budget unless set; speed-up vs Llama):",
                  "", "| model | prompt | new tokens | batch | tok/s | peak MiB | speed-up |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["regimes"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r.get('prompt')} | {r.get('new_tokens')} | error: {r['error']} ||||")
                continue
            ratio = speedups.get((r["model"], f"regime {r['prompt']}/{r['new_tokens']}"), {}).get("regime_speedup")
            capped = " (cap)" if r.get("batch_capped") else ""
            lines.append(f"| {r['model']} | {r['prompt']} | {r['new_tokens']} | {r['batch']}{capped} | "
                         f"{_fmt(r['tok_s'])} | {_fmt(r['peak_mib'], 0)} | {_fmt(ratio)}x |")  # fmt: skip
    if results.get("train"):
        lines += ["", "Training step (forward + backward; speed-up vs Llama):", "",
                  "| model | seq | batch | tok/s | peak MiB | speed-up |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["train"]:
            if "error" in r:
                lines.append(f"| {r['model']} | error: {r['error']} |||||")
                continue
            ratio = speedups.get((r["model"], f"train {r['seq']}"), {}).get("train_speedup")
            lines.append(f"| {r['model']} | {r['seq']} | {r['batch']} | {_fmt(r['tok_s'])} | "
                         f"{_fmt(r['peak_mib'], 0)} | {_fmt(ratio)}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_reports(results: dict, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(markdown_report(results))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    points = [p for p in results["points"] if "error" not in p]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in results["settings"]["models"]:
        mine = sorted((p for p in points if p["model"] == name), key=lambda p: p["context"])
        if not mine:
            continue
        contexts = [p["context"] for p in mine]
        axes[0].plot(contexts, [p["cache_bytes"] / 2**20 for p in mine], marker="o", label=name)
        axes[1].plot(contexts, [p["prefill_s"] for p in mine], marker="o", label=name)
        axes[2].plot(contexts, [p["prefill_peak_mib"] for p in mine], marker="o", label=name)
    for axis, title in zip(axes, ("cache (MiB)", "prefill time (s, logits_to_keep=1)", "prefill peak RSS (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(output_dir / "bench.png", dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------- CLI


PRESETS = {"cpu": BenchSettings, "quick": BenchSettings.quick, "gpu": BenchSettings.gpu}
DTYPES = ("float32", "bfloat16", "float16")


def default_output_dir(settings: BenchSettings) -> Path:
    """`benchmarks/results/<gpu name>/` for a GPU run (e.g. `nvidia-h100-80gb-hbm3`), else `.../latest/` (or
    `.../<preset>/` for a smoke run)."""
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(settings.device))
        return Path("benchmarks/results") / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path("benchmarks/results") / (settings.preset if settings.preset.endswith("smoke") else "latest")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help="cpu (default), quick (~1 minute on CPU) or gpu (the paper's scale; the default with "
                             "--device cuda)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="= --preset quick")
    parser.add_argument("--smoke", action="store_true", help="the preset's every section at tiny sizes on CPU (CI)")
    parser.add_argument("--device", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--dtype", choices=DTYPES, help="weights and activations (default: the preset's)")
    parser.add_argument("--compile", action="store_true",
                        help="decode through static caches with the step compiled (torch.compile, CUDA graphs)")  # fmt: skip
    parser.add_argument("--contexts", type=positive_int, nargs="+", help="context lengths to sweep")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to compare (default: all)")
    parser.add_argument("--throughput-context", type=positive_int, help="context of the max-batch throughput point")
    parser.add_argument("--budget-gib", type=positive_float, help="cache memory budget of the max-batch point")
    parser.add_argument("--threads", type=positive_int, help="torch threads per worker")
    parser.add_argument("--output-dir", help="where JSON / markdown / PNG go (default: see `default_output_dir`)")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    """The preset (`--preset`, `--quick`, or gpu for a CUDA `--device`), the overrides, `--smoke`; checks the device."""
    if args.quick and args.preset not in (None, "quick"):
        usage_error(f"--quick and --preset {args.preset} disagree; pass one of them")
    device = args.device
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        usage_error(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    preset = "quick" if args.quick else args.preset or ("gpu" if device and device.startswith("cuda") else "cpu")
    settings = PRESETS[preset]()
    if args.smoke:
        settings = settings.smoke()
    elif device is not None:
        settings.device = device
    if settings.device.startswith("cuda"):
        if not torch.cuda.is_available():
            usage_error(f"--device {settings.device}: no CUDA GPU is visible here (run `--preset {preset} --smoke` "
                        "to check the preset on CPU)")  # fmt: skip
        index = torch.device(settings.device).index or 0
        if index >= torch.cuda.device_count():
            usage_error(f"--device {settings.device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    for attr in ("contexts", "models", "throughput_context", "budget_gib", "threads", "dtype"):
        if getattr(args, attr) is not None:
            setattr(settings, attr, getattr(args, attr))
    settings.compile = settings.compile or args.compile
    return settings


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    output_dir = Path(args.output_dir) if args.output_dir else default_output_dir(settings)
    if output_dir.exists() and not output_dir.is_dir():
        usage_error(f"--output-dir {output_dir} is a file; choose a folder")
    results = run_benchmark(settings, output_dir)
    print(markdown_report(results))
    print(f"wrote {output_dir}/results.json, results.md, bench.png")
    failed = [f"{p['model']}: {p['error']}" for key in ("points", "regimes", "decode_heavy", "train")
              for p in results.get(key, []) if "error" in p]  # fmt: skip
    if failed:
        print("error: some measurements failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def _worker_main(payload: str) -> None:
    job = json.loads(payload)
    settings = BenchSettings(**job["settings"])
    kind, name = job["kind"], job["name"]
    if kind == "point":
        result = measure_point(name, settings, job["context"])
    elif kind == "regime":
        result = measure_regime(name, settings, job["prompt"], job["new_tokens"], job["batch"])
    elif kind == "train":
        result = measure_train(name, settings)
    else:
        result = measure_decode_heavy(name, settings)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        parser = argparse.ArgumentParser(prog="python -m hf_yoco.bench", description=__doc__)
        add_arguments(parser)
        sys.exit(run(parser.parse_args()))
