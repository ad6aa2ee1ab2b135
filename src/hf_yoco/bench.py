"""`hf-yoco bench`: memory and speed of YOCO-SWA, YOCO-gRet and the Block Transformer against a same-size Llama.

Every (model, context) point runs in a fresh subprocess so peak memory is its own: the worker builds the model
(random weights, fixed seed), prefills one sequence with `logits_to_keep=1`, and records

- `prefill_s` and `prefill_peak_mib`: wall time, and the peak RSS growth during prefill (Linux `VmHWM`, reset first);
- `cache_bytes`: bytes of the cache tensors after prefill (`memory_bytes()`, or the K/V tensors of a DynamicCache);
- `decode_tok_s`: greedy decode tokens/s at batch 1 after the prefill;
- at `--throughput-context`: `max_batch` whose cache fits `--budget-gib`, and `max_batch_decode_tok_s`, the decode
  tokens/s of that batch (the prefilled cache replicated with `batch_repeat_interleave`), plus
  `max_batch_e2e_tok_s`, which also charges the batch's prefill (batch x `prefill_s`) for `--gen-tokens` tokens.

A separate decode-heavy point measures the Block Transformer and Llama with a short prompt and a long generation at
the same batch. Results: `results.json`, `results.md` (tables with ratios vs Llama) and PNG plots in `--output-dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
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

    @classmethod
    def quick(cls) -> BenchSettings:
        """About a minute on a 2-core CPU: a small model and short contexts."""
        return cls(
            hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=4096,
            sliding_window=128, contexts=[1024, 2048], decode_tokens=8, throughput_context=2048, budget_gib=0.25,
            gen_tokens=32, max_batch_cap=64, decode_heavy_prompt=32, decode_heavy_new_tokens=32,
            decode_heavy_batch=16,
        )  # fmt: skip


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
    """What the cache must hold for `tokens` tokens (fp32), from the architecture alone."""
    head_dim = settings.hidden_size // settings.num_heads
    kv_row = 2 * settings.num_kv_heads * head_dim * 4  # K and V of one position, fp32
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


def _worker_model(name: str, settings: BenchSettings, context: int):
    """Worker set-up: `settings.threads` torch threads, seed 0, and the model for `name` (random weights, eval)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(build_config(name, settings, context)).eval()


def measure_point(name: str, settings: BenchSettings, context: int) -> dict:
    """Worker body: prefill, cache size, batch-1 decode and (at the throughput context) max-batch decode."""
    model = _worker_model(name, settings, context)
    input_ids = torch.randint(3, settings.vocab_size, (1, context))
    result = {"model": name, "context": context, "parameters": model.num_parameters()}
    with torch.inference_mode():
        baseline = _rss_kib("VmRSS")
        _rss_peak_reset()
        start = time.perf_counter()
        out = model(input_ids, use_cache=True, logits_to_keep=1)
        result["prefill_s"] = time.perf_counter() - start
        result["prefill_peak_mib"] = max(_rss_kib("VmHWM") - baseline, 0) / 1024
        cache = output_cache(out)
        result["cache_bytes"] = cache_bytes(cache)
        result["cache_bytes_arithmetic"] = arithmetic_cache_bytes(name, settings, context)
        token = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(settings.decode_tokens):
            out = model(token, **cache_kwarg(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        result["decode_tok_s"] = settings.decode_tokens / (time.perf_counter() - start)
        if context == settings.throughput_context:
            per_sequence = cache_bytes(cache)
            batch = int(settings.budget_gib * 2**30 // max(per_sequence, 1))
            batch = max(1, min(batch, settings.max_batch_cap))
            result["max_batch"] = batch
            result["max_batch_capped"] = batch == settings.max_batch_cap
            cache.batch_repeat_interleave(batch)
            tokens = token.repeat(batch, 1)
            steps = max(2, settings.decode_tokens // 2)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(tokens, **cache_kwarg(cache), use_cache=True)
                tokens = out.logits[:, -1:].argmax(-1)
            step_s = (time.perf_counter() - start) / steps
            result["max_batch_decode_tok_s"] = batch / step_s
            total_s = batch * result["prefill_s"] + settings.gen_tokens * step_s
            result["max_batch_e2e_tok_s"] = batch * settings.gen_tokens / total_s
    return result


def measure_decode_heavy(name: str, settings: BenchSettings) -> dict:
    """Short prompt, long `generate()` at a fixed batch: the Block Transformer's favourable regime."""
    model = _worker_model(name, settings, settings.decode_heavy_prompt + settings.decode_heavy_new_tokens)
    prompt = torch.randint(3, settings.vocab_size, (settings.decode_heavy_batch, settings.decode_heavy_prompt))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            prompt,
            max_new_tokens=settings.decode_heavy_new_tokens,
            min_new_tokens=settings.decode_heavy_new_tokens,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
        seconds = time.perf_counter() - start
    new_tokens = out.sequences[:, settings.decode_heavy_prompt :].numel()
    return {
        "model": name,
        "batch": settings.decode_heavy_batch,
        "prompt": settings.decode_heavy_prompt,
        "new_tokens": settings.decode_heavy_new_tokens,
        "seconds": seconds,
        "tok_s": new_tokens / seconds,
        "cache_bytes": cache_bytes(output_cache(out)),
    }


def _run_worker(kind: str, name: str, settings: BenchSettings, context: int = 0, timeout: float = 3600) -> dict:
    payload = json.dumps({"kind": kind, "name": name, "settings": asdict(settings), "context": context})
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads)}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_yoco.bench", "--worker", payload],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {"model": name, "context": context, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
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
    """Run every (model, context) point and the decode-heavy point; write JSON / markdown / PNG if `output_dir`."""
    from tqdm.auto import tqdm

    check_models(settings.models)
    points = [(m, c) for c in settings.contexts for m in settings.models]
    results = {"settings": asdict(settings), "machine": machine_info(), "points": [], "decode_heavy": []}
    for name, context in tqdm(points, desc="bench", disable=not progress):
        results["points"].append(_run_worker("point", name, settings, context))
    for name in tqdm([m for m in ("llama", "block-transformer") if m in settings.models], desc="decode-heavy",
                     disable=not progress):  # fmt: skip
        results["decode_heavy"].append(_run_worker("decode_heavy", name, settings))
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
        f"heads, FFN {s['intermediate_size']}, vocab {s['vocab_size']}, window {s['sliding_window']}, fp32, "
        f"{s['threads']} threads.",
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
        if r["context"] == "decode-heavy":
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small models and short contexts (~1 minute)")
    parser.add_argument("--contexts", type=positive_int, nargs="+", help="context lengths to sweep")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="models to compare (default: all)")
    parser.add_argument("--throughput-context", type=positive_int, help="context of the max-batch throughput point")
    parser.add_argument("--budget-gib", type=positive_float, help="cache memory budget of the max-batch point")
    parser.add_argument("--threads", type=positive_int, help="torch threads per worker")
    parser.add_argument("--output-dir", default="benchmarks/results/latest", help="where JSON / markdown / PNG go")


def run(args: argparse.Namespace) -> int:
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        usage_error(f"--output-dir {args.output_dir} is a file; choose a folder")
    settings = BenchSettings.quick() if args.quick else BenchSettings()
    for attr in ("contexts", "models", "throughput_context", "budget_gib", "threads"):
        if getattr(args, attr) is not None:
            setattr(settings, attr, getattr(args, attr))
    results = run_benchmark(settings, args.output_dir)
    print(markdown_report(results))
    print(f"wrote {args.output_dir}/results.json, results.md, bench.png")
    return 0


def _worker_main(payload: str) -> None:
    job = json.loads(payload)
    settings = BenchSettings(**job["settings"])
    if job["kind"] == "point":
        result = measure_point(job["name"], settings, job["context"])
    else:
        result = measure_decode_heavy(job["name"], settings)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        parser = argparse.ArgumentParser(prog="python -m hf_yoco.bench", description=__doc__)
        add_arguments(parser)
        sys.exit(run(parser.parse_args()))
