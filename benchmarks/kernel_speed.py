"""Micro-benchmark: hf_yoco's Triton kernels and Liger-Kernel's fused ops vs hf_yoco's PyTorch code (and SDPA).

On a CUDA GPU, one command (results land in `benchmarks/results/<gpu-slug>/kernels.{json,md}`, e.g.
`nvidia-h100-80gb-hbm3`, and the tables are printed too):

    python benchmarks/kernel_speed.py                 # bf16, B=4, H=8, H_kv=2, D=128, W=1024, T in 512..8192
    python benchmarks/kernel_speed.py --dtype float16 --lengths 1024 4096 --no-liger

CPU check that the script and every kernel still run (tiny shapes, fp32, Triton interpreter, `time.perf_counter`
timings that mean nothing; results go to `benchmarks/results/cpu-smoke/` unless `--out` is given):

    python benchmarks/kernel_speed.py --smoke

`TRITON_INTERPRET=1` must be set before triton is first imported (`import hf_yoco` imports it through
liger-kernel); with `--smoke` and no CUDA the script sets it itself before importing anything that imports triton.
bf16 `tl.dot` is wrong in the interpreter, hence fp32 for `--smoke`.

Sections (milliseconds, forward and forward+backward; GPU timings are the median of `triton.testing.do_bench`):
  - gated retention: Triton chunk kernel / PyTorch chunkwise form of `modeling_yoco` / causal SDPA (the softmax
    attention it replaces) / on CUDA with flash-linear-attention installed, fla's `chunk_simple_gla` (the anchor).
  - sliding-window attention (GQA): Triton / `naive_sliding_window_attention` / SDPA given the window mask / on CUDA,
    PyTorch's compiled `flex_attention` with a sliding-window `BlockMask` (the anchor).
  - shared-KV decode (T=1 over S keys, GQA; forward only): Triton split-K / `naive_shared_kv_attention` / SDPA with
    grouped queries (`modeling_common.sdpa_grouped_query_decode`, hf_yoco's PyTorch decode path).
  - Liger-Kernel (when installed), tokens = B*T rows: RMSNorm, SwiGLU (`silu(a) * b`), RoPE and LM head +
    cross-entropy, Liger's functional API vs hf_yoco's PyTorch code; the LM-head rows also report the peak CUDA
    memory (`torch.cuda.max_memory_allocated`), which is what the fused linear cross-entropy saves. Liger's fused
    linear cross-entropy computes its gradients inside the forward (whenever the inputs require grad, as a model's
    weights do in eval too), so its "fwd" costs about its "fwd+bwd".

`kernels.json` has one row per (section, T, implementation, mode): `ms`, `peak_mib` / `inputs_mib` (CUDA; every
row) and `error` ("OOM", or the exception of a failed cell; the exit status is 1 when a cell failed otherwise).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(
    batch=4, heads=8, kv_heads=2, head_dim=128, window=1024, lengths=[512, 1024, 2048, 4096, 8192],
    hidden=2048, intermediate=5632, vocab=32000, dtype="bfloat16",
)  # fmt: skip
SMOKE = dict(
    batch=1, heads=2, kv_heads=1, head_dim=16, window=32, lengths=[64, 128],
    hidden=64, intermediate=128, vocab=256, dtype="float32",
)  # fmt: skip
MODES = ("fwd", "fwd+bwd")
Fn = Callable[[], Any]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command line; shape flags left unset take the full (GPU) defaults, or the tiny ones with `--smoke`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, help=f"default {FULL['batch']} (smoke {SMOKE['batch']})")
    parser.add_argument("--heads", type=int, help=f"default {FULL['heads']} (smoke {SMOKE['heads']})")
    parser.add_argument("--kv-heads", type=int, help=f"default {FULL['kv_heads']} (smoke {SMOKE['kv_heads']})")
    parser.add_argument("--head-dim", type=int, help=f"default {FULL['head_dim']} (smoke {SMOKE['head_dim']})")
    parser.add_argument("--window", type=int, help=f"default {FULL['window']} (smoke {SMOKE['window']})")
    parser.add_argument("--lengths", type=int, nargs="+", help=f"default {FULL['lengths']} (smoke {SMOKE['lengths']})")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="default bfloat16 (smoke float32)")
    parser.add_argument("--hidden", type=int, help=f"Liger rows: hidden size, default {FULL['hidden']}")
    parser.add_argument("--intermediate", type=int, help=f"Liger SwiGLU width, default {FULL['intermediate']}")
    parser.add_argument("--vocab", type=int, help=f"Liger LM head vocabulary, default {FULL['vocab']}")
    parser.add_argument("--no-liger", action="store_true", help="skip the Liger-Kernel section")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes in fp32; on CPU through the Triton interpreter"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed calls per cell with the CPU timer (default 3)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<device-slug>/)")
    args = parser.parse_args(argv)
    for name, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.heads % args.kv_heads:
        parser.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    return args


def prepare_device(smoke: bool) -> torch.device:
    """CUDA when present; else (`--smoke` only) CPU with `TRITON_INTERPRET=1`, set before anything imports triton."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        raise SystemExit(
            "benchmarks/kernel_speed.py times Triton kernels and needs a CUDA GPU. Use --smoke to run tiny shapes on CPU "
            "through the Triton interpreter (a check that everything runs; its timings mean nothing)."
        )
    if os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            raise SystemExit("--smoke on CPU: triton was imported before TRITON_INTERPRET=1 could be set; export it.")
        os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    """GPU name, or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slugify(name: str) -> str:
    """ "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def git_commit() -> str | None:
    """HEAD of the repository (with "-dirty" when tracked files have changes), or None outside git."""
    try:
        return git("rev-parse", "--short=12", "HEAD") + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class Bench:
    """Times a callable (forward, or forward+backward of its output(s)); on CUDA also records the peak memory."""

    def __init__(self, device: torch.device, reps: int) -> None:
        self.device, self.reps = device, reps

    @staticmethod
    def _step(fn: Fn, backward: bool, leaves: Sequence[torch.Tensor]) -> Fn:
        def forward() -> None:
            with torch.no_grad():
                fn()

        def forward_backward() -> None:
            for leaf in leaves:
                leaf.grad = None
            out = fn()
            outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

        return forward_backward if backward else forward

    def _time_ms(self, step: Fn) -> float:
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(step, return_mode="median"))
        step()  # warm-up (compiles / traces once)
        times = []
        for _ in range(self.reps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def _memory_mib(self, step: Fn) -> tuple[float | None, float | None]:
        """(peak allocated during one step, allocated before it: the inputs), in MiB; None off CUDA."""
        if self.device.type != "cuda":
            return None, None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, before / 2**20

    def __call__(self, fn: Fn, backward: bool, leaves: Sequence[torch.Tensor]) -> dict[str, Any]:
        """`{"ms", "peak_mib", "inputs_mib", "error"}`; an OOM or a failure is recorded (ms None), not raised."""
        step = self._step(fn, backward, leaves)
        result: dict[str, Any] = {"ms": None, "peak_mib": None, "inputs_mib": None, "error": None}
        try:
            result["ms"] = self._time_ms(step)
            result["peak_mib"], result["inputs_mib"] = self._memory_mib(step)
        except torch.cuda.OutOfMemoryError:
            result["error"] = "OOM"
        except Exception as error:  # keep the other cells of a long GPU run
            result["error"] = f"{type(error).__name__}: {error}"
        for leaf in leaves:
            leaf.grad = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return result


class Runner:
    """Builds the inputs of every section, times them and collects the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.dtype = getattr(torch, args.dtype)
        self.bench = Bench(device, args.reps)
        self.rows: list[dict[str, Any]] = []

    def leaf(self, *shape: int, dtype: torch.dtype | None = None, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(*shape, device=self.device, dtype=torch.float32) * scale
        return x.to(dtype or self.dtype).requires_grad_()

    def record(self, section: str, length: int, impls: dict[str, Fn], leaves: Sequence[torch.Tensor], modes=MODES):
        """Time every implementation in every mode for one length and append the rows."""
        for impl, fn in impls.items():
            for mode in modes:
                result = self.bench(fn, mode == "fwd+bwd", leaves)
                tokens = self.args.batch * length
                self.rows.append(dict(section=section, T=length, tokens=tokens, impl=impl, mode=mode, **result))
                if result["error"] and result["error"] != "OOM":
                    print(f"  ! {section} T={length} {impl} {mode}: {result['error']}", file=sys.stderr)

    # -- hf_yoco's Triton kernels ------------------------------------------------------------------------------------
    def gated_retention(self, length: int) -> None:
        from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention
        from hf_yoco.models.modeling_yoco import chunk_gated_retention as torch_chunk_gated_retention

        B, H, D = self.args.batch, self.args.heads, self.args.head_dim
        q, k, v = (self.leaf(B, length, H, D) for _ in range(3))
        g = (F.logsigmoid(torch.randn(B, length, H, device=self.device)) / 16).requires_grad_()
        qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        impls = {
            "triton": lambda: chunk_gated_retention(q, k, v, g)[0],
            "torch_chunk": lambda: torch_chunk_gated_retention(q, k * D**-0.5, v, g, 64)[0],
            "sdpa_causal": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
        }
        if self.device.type == "cuda" and importlib.util.find_spec("fla") is not None:  # anchor: fla's simple GLA
            from fla.ops.simple_gla import chunk_simple_gla

            impls["fla_chunk_simple_gla"] = lambda: chunk_simple_gla(q, k, v, g, scale=D**-0.5)[0]
        self.record("gated_retention", length, impls, [q, k, v, g, qs, ks, vs])

    def sliding_window_attention(self, length: int) -> None:
        from hf_yoco.kernels.sliding_window_attention.chunk import sliding_window_attention
        from hf_yoco.kernels.sliding_window_attention.naive import naive_sliding_window_attention
        from hf_yoco.kernels.utils import causal_band

        B, H, HKV, D, W = self.args.batch, self.args.heads, self.args.kv_heads, self.args.head_dim, self.args.window
        q, k, v = self.leaf(B, length, H, D), self.leaf(B, length, HKV, D), self.leaf(B, length, HKV, D)
        mask = causal_band(length, length, W, self.device)
        qs = q.detach().transpose(1, 2).requires_grad_()
        ks, vs = (x.detach().transpose(1, 2).repeat_interleave(H // HKV, 1).requires_grad_() for x in (k, v))
        impls = {
            "triton": lambda: sliding_window_attention(q, k, v, window_size=W),
            "naive": lambda: naive_sliding_window_attention(q, k, v, window_size=W),
            "sdpa_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask),
        }
        if self.device.type == "cuda":  # anchor: PyTorch's compiled flex attention with a sliding-window BlockMask
            impls["flex_block_mask"] = self.flex_sliding_window(q, k, v, W)
        self.record("sliding_window_attention", length, impls, [q, k, v, qs, ks, vs])

    def flex_sliding_window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> Fn:
        """`flex_attention` (compiled) over a sliding-window `BlockMask`, GQA, in the kernels' `[B, T, H, D]` layout."""
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        length = q.shape[1]

        def in_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

        block_mask = create_block_mask(in_window, None, None, length, length, device=self.device)
        flex = torch.compile(flex_attention, dynamic=False)
        qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))  # views: the gradient reaches q, k, v
        return lambda: flex(qs, ks, vs, block_mask=block_mask, enable_gqa=True).transpose(1, 2)

    def shared_kv_decode(self, length: int) -> None:
        from hf_yoco.kernels.shared_kv_attention.decode import shared_kv_attention
        from hf_yoco.kernels.shared_kv_attention.naive import naive_shared_kv_attention
        from hf_yoco.models.modeling_common import sdpa_grouped_query_decode

        B, H, HKV, D = self.args.batch, self.args.heads, self.args.kv_heads, self.args.head_dim
        q = torch.randn(B, 1, H, D, device=self.device, dtype=self.dtype)
        k, v = (torch.randn(B, length, HKV, D, device=self.device, dtype=self.dtype) for _ in range(2))
        qs = q.transpose(1, 2).contiguous()
        ks, vs = (x.transpose(1, 2).contiguous() for x in (k, v))
        impls = {
            "triton": lambda: shared_kv_attention(q, k, v),
            "naive": lambda: naive_shared_kv_attention(q, k, v),
            "sdpa_grouped": lambda: sdpa_grouped_query_decode(qs, ks, vs, None, D**-0.5),
        }
        self.record("shared_kv_decode", length, impls, [], modes=("fwd",))

    # -- Liger-Kernel vs hf_yoco's PyTorch code ----------------------------------------------------------------------
    def liger_rms_norm(self, length: int) -> None:
        from liger_kernel.transformers.functional import liger_rms_norm

        from hf_yoco.models.modeling_common import RMSNorm

        norm = RMSNorm(self.args.hidden).to(self.device, self.dtype)
        x = self.leaf(self.args.batch * length, self.args.hidden)
        impls = {  # hf_yoco's integration calls Liger with the same arguments
            "liger": lambda: liger_rms_norm(x, norm.weight, norm.variance_epsilon, casting_mode="llama"),
            "torch": lambda: norm(x),
        }
        self.record("liger_rms_norm", length, impls, [x, norm.weight])

    def liger_swiglu(self, length: int) -> None:
        from liger_kernel.transformers.functional import liger_swiglu

        a, b = (self.leaf(self.args.batch * length, self.args.intermediate) for _ in range(2))
        impls = {"liger": lambda: liger_swiglu(a, b), "torch": lambda: F.silu(a) * b}  # GatedMLP: act(gate) * up
        self.record("liger_swiglu", length, impls, [a, b])

    def liger_rope(self, length: int) -> None:
        from liger_kernel.transformers.functional import liger_rope

        from hf_yoco.models.modeling_common import apply_rotary_pos_emb

        B, H, HKV, D = self.args.batch, self.args.heads, self.args.kv_heads, self.args.head_dim
        q, k = self.leaf(B, H, length, D), self.leaf(B, HKV, length, D)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, device=self.device, dtype=torch.float32) / D)
        freqs = torch.arange(length, device=self.device, dtype=torch.float32)[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[None]  # [1, T, D], RotaryEmbedding's halves layout
        cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        impls = {"liger": lambda: liger_rope(q, k, cos, sin), "torch": lambda: apply_rotary_pos_emb(q, k, cos, sin)}
        self.record("liger_rope", length, impls, [q, k])

    def liger_lm_head_ce(self, length: int) -> None:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        tokens, vocab = self.args.batch * length, self.args.vocab
        lm_head = torch.nn.Linear(self.args.hidden, vocab, bias=False).to(self.device, self.dtype)
        h = self.leaf(tokens, self.args.hidden)
        labels = torch.randint(0, vocab, (tokens,), device=self.device)
        impls = {  # transformers' ForCausalLMLoss (hf_yoco's loss) upcasts the logits to fp32 first
            "liger_flce": lambda: liger_fused_linear_cross_entropy(h, lm_head.weight, labels),
            "torch": lambda: F.cross_entropy(lm_head(h).float(), labels),
        }
        self.record("liger_lm_head_ce", length, impls, [h, lm_head.weight])


SECTION_TITLES = {
    "gated_retention": "Gated retention (B={batch}, H={heads}, D={head_dim}): fwd / fwd+bwd ms",
    "sliding_window_attention": "Sliding-window attention (W={window}, GQA {heads}/{kv_heads}, D={head_dim}) ms",
    "shared_kv_decode": "Shared-KV decode (1 query over T keys, GQA {heads}/{kv_heads}, D={head_dim}; forward) ms",
    "liger_rms_norm": "Liger RMSNorm ([B*T, {hidden}]) ms",
    "liger_swiglu": "Liger SwiGLU silu(a)*b ([B*T, {intermediate}]) ms",
    "liger_rope": "Liger RoPE (q [B, {heads}, T, {head_dim}], k [B, {kv_heads}, T, {head_dim}]) ms",
    "liger_lm_head_ce": "Liger LM head + cross-entropy ([B*T, {hidden}] x [{vocab}, {hidden}]) ms, peak MiB",
}


def fmt(value: float | None, error: str | None = None) -> str:
    if value is None:
        return error.split(":")[0] if error else "-"
    return f"{value:.3f}" if value < 1000 else f"{value:.0f}"


def markdown(results: dict[str, Any]) -> str:
    """One table per section: a row per length, a column per (implementation, mode) (+ peak memory for the LM head)."""
    shapes = results["shapes"]
    lines = [
        f"# Kernel micro-benchmark: {results['device']}",
        "",
        f"dtype {results['dtype']}; timer: {results['timer']}; torch {results['versions']['torch']}, triton "
        f"{results['versions']['triton']}, liger-kernel {results['versions']['liger_kernel']}; commit "
        f"{results['commit']}" + ("; **smoke run (tiny shapes; timings meaningless)**" if results["smoke"] else ""),
        "",
        "Shapes: " + ", ".join(f"{key}={value}" for key, value in shapes.items()),
    ]
    sections = list(dict.fromkeys(row["section"] for row in results["rows"]))
    for section in sections:
        rows = [row for row in results["rows"] if row["section"] == section]
        columns = list(dict.fromkeys((row["impl"], row["mode"]) for row in rows))
        memory, tokens = section == "liger_lm_head_ce", section.startswith("liger")
        header = ["T"] + ["tokens"] * tokens + [f"{impl} {mode}" for impl, mode in columns]
        header += [f"{impl} {mode} MiB" for impl, mode in columns] if memory else []
        lines += ["", "## " + SECTION_TITLES[section].format(**shapes), ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
        for length in dict.fromkeys(row["T"] for row in rows):
            cells = {(row["impl"], row["mode"]): row for row in rows if row["T"] == length}
            values = [str(length)] + [str(length * shapes["batch"])] * tokens
            values += [fmt(cells[c]["ms"], cells[c]["error"]) if c in cells else "-" for c in columns]
            values += [fmt(cells[c]["peak_mib"]) if c in cells else "-" for c in columns] if memory else []
            lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every section, write `<out>/kernels.json` and `<out>/kernels.md`, print the tables; returns the results."""
    args = parse_args(argv)
    device = prepare_device(args.smoke)  # before anything imports triton
    from hf_yoco.kernels.utils import patch_triton_interpreter_for_liger

    name = device_name(device)
    out = args.out or ROOT / "benchmarks" / "results" / (slugify(name) + ("-smoke" if args.smoke else ""))
    liger = not args.no_liger and importlib.util.find_spec("liger_kernel") is not None
    if not args.no_liger and not liger:
        print("liger-kernel is not installed: skipping the Liger section (pip install 'hf-yoco[liger]').")
    runner = Runner(args, device)
    shapes = {key: getattr(args, key) for key in ("batch", "heads", "kv_heads", "head_dim", "window", "lengths")}
    shapes |= {key: getattr(args, key) for key in ("hidden", "intermediate", "vocab")} if liger else {}
    timer = "triton.testing.do_bench median" if device.type == "cuda" else f"time.perf_counter median of {args.reps}"
    print(f"# {name}  dtype={args.dtype}  " + " ".join(f"{k}={v}" for k, v in shapes.items()), flush=True)

    torch.manual_seed(0)
    undo = patch_triton_interpreter_for_liger()  # no-op unless TRITON_INTERPRET=1 (smoke on CPU)
    try:
        sections = [runner.gated_retention, runner.sliding_window_attention, runner.shared_kv_decode]
        if liger:
            sections += [runner.liger_rms_norm, runner.liger_swiglu, runner.liger_rope, runner.liger_lm_head_ce]
        for section in sections:
            for length in args.lengths:
                section(length)
                print(f"  done {section.__name__} T={length}", flush=True)
    finally:
        undo()

    results = dict(
        device=name,
        device_slug=slugify(name),
        dtype=args.dtype,
        smoke=args.smoke,
        timer=timer,
        commit=git_commit(),
        versions={p.replace("-", "_"): version(p) for p in ("torch", "triton", "liger-kernel", "hf-yoco", "fla-core")},
        shapes=shapes,
        rows=runner.rows,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results)
    (out / "kernels.md").write_text(report)
    print("\n" + report + f"\nwrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return results


def failed(results: dict[str, Any]) -> bool:
    """True when a cell failed for another reason than running out of memory."""
    rows = results["rows"]
    return any(
        row["error"] not in (None, "OOM") or (row["ms"] is not None and not math.isfinite(row["ms"])) for row in rows
    )


if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
