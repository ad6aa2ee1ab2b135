"""Compile every hf_yoco Triton kernel ahead of time for real NVIDIA GPUs, on a machine without one.

    python -m hf_yoco.kernels.aot                    # sm_80, sm_89, sm_90; bf16, fp16, fp32; all autotune configs
    python -m hf_yoco.kernels.aot --archs 90 --dtypes bfloat16 --json aot.json

The public entry points (forward and backward) run on small CPU tensors with every kernel launch intercepted
instead of executed. Each launch is bound and specialized exactly as triton's runtime does on a GPU of the target
architecture (argument types, constexprs, divisibility / alignment attributes), then compiled to PTX and a cubin for
every config its autotuner may pick. The Triton interpreter never does this: it accepts kernels that the compiler
rejects. Every launch is also checked against CUDA's grid limits, and each config's shared memory against the GPUs of
that architecture (the autotuner skips configs that do not fit, so a launch fails only when none fits).

Needs triton (with its bundled ptxas) and `TRITON_INTERPRET` unset; never needs a GPU. Exit status 1 if anything
fails. `tests/kernels/test_aot_compile.py` runs it in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import torch

ARCHS = (80, 89, 90)
DTYPES = ("bfloat16", "float16", "float32")
# The GPUs each compiled architecture is checked against: (name, largest dynamic shared memory of one block, opt-in).
# sm_86 / sm_89 GPUs (A10, RTX 30 / 40, L4) have 99 KB and compile like sm_80 (mma.sync, cp.async): their builds take
# the same shared memory as sm_80's (all 139 bf16 configs identical, measured with `--archs 80 89`), so an sm_80 build
# is checked against them too.
GPUS = {
    80: [("A100", 166912), ("A10 / L4 / RTX 30-40 (sm_86, sm_89)", 101376)],
    89: [("L4 / RTX 40", 101376)],
    90: [("H100", 232448)],
}
MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA grid limits (x, y, z)
KERNEL_MODULES = (
    "hf_yoco.kernels.gated_retention.chunk",
    "hf_yoco.kernels.gated_retention.fused_recurrent",
    "hf_yoco.kernels.sliding_window_attention.chunk",
    "hf_yoco.kernels.shared_kv_attention.decode",
)
# Constexprs that only size the problem (head counts and dims, batch, queries): the code a kernel compiles to depends
# on its tiles (BD, BK, BV, BT, BM, BN, BR, BS), flags and dtypes, and on these values only through constants (mask
# bounds, strides). Launches equal up to them compile once; the window only matters as on / off.
SIZE_CONSTEXPRS = frozenset({"B", "T", "H", "HKV", "D", "K", "V"})


def all_kernels() -> dict[str, list[str]]:
    """Every Triton kernel of hf_yoco (`KERNEL_MODULES`) -> the names of the configs its autotuner may pick."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    kernels = {}
    for module_name in KERNEL_MODULES:
        for value in vars(importlib.import_module(module_name)).values():
            if isinstance(value, Autotuner):
                kernels[_jit_function(value).fn.__name__] = [_config_name(c) for c in value.configs]
            elif isinstance(value, JITFunction):
                kernels[value.fn.__name__] = [_config_name(None)]
    return kernels


def coverage_problems(results: list[dict], dtypes, archs) -> list[str]:
    """Kernels x configs x dtypes x architectures that no compilation covered."""
    compiled = {(r["kernel"], r["case"].rsplit(" ", 1)[1], r["arch"], r["config"]) for r in results if r["ok"]}
    return [
        f"{kernel} [{config}; {dtype}; sm_{arch}] was not compiled (no case launches it)"
        for kernel, configs in all_kernels().items()
        for config in configs
        for dtype in dtypes
        for arch in archs
        if (kernel, dtype, arch, config) not in compiled
    ]


@dataclasses.dataclass
class Launch:
    """One intercepted kernel launch: the kernel, its bound arguments and its candidate configs."""

    case: str
    module: str
    name: str
    args: tuple
    kwargs: dict
    configs: list  # triton.Config, or [None] for a kernel launched without autotuning
    grid: tuple


@dataclasses.dataclass
class Job:
    """One compilation: a launch specialized for one architecture and one config."""

    case: str
    kernel: str
    config: str
    arch: int
    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def _jit_function(kernel):
    """The `JITFunction` under autotuner / heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def intercept_launches(record: Callable[[Launch], None], case: str) -> Iterator[None]:
    """Replace kernel execution (`JITFunction.run`, `Autotuner.run`) by `record`; outputs stay uninitialized."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jit_run, autotuner_run = JITFunction.run, Autotuner.run

    def evaluate_grid(grid, kwargs: dict, fn, args) -> tuple:
        if callable(grid):
            meta = {**dict(zip(fn.arg_names, args)), **kwargs}
            grid = grid(meta)
        return tuple(int(g) for g in grid)

    def record_jit(self, *args, grid, warmup, **kwargs):
        record(
            Launch(
                case,
                self.fn.__module__,
                self.fn.__name__,
                args,
                kwargs,
                [None],
                evaluate_grid(grid, kwargs, self, args),
            )
        )

    def record_autotuner(self, *args, grid, warmup=False, **kwargs):
        fn = _jit_function(self)
        first = {**kwargs, **self.configs[0].all_kwargs()}
        launch_grid = evaluate_grid(grid, first, fn, args)
        record(Launch(case, fn.fn.__module__, fn.fn.__name__, args, kwargs, list(self.configs), launch_grid))

    JITFunction.run, Autotuner.run = record_jit, record_autotuner
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, autotuner_run


def _leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.requires_grad_() for t in tensors]


def _backward(*outputs: torch.Tensor | None) -> None:
    """Backward through the entry point's autograd function with an upstream gradient for every output."""
    outputs = [o for o in outputs if o is not None]
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


def _gated_retention(dtype, entry: str, batch, length, heads, dim, with_state, lengths=None, backward=True):
    def run() -> None:
        from hf_yoco.kernels.gated_retention.chunk import chunk_gated_retention
        from hf_yoco.kernels.gated_retention.fused_recurrent import fused_recurrent_gated_retention

        fn = chunk_gated_retention if entry == "chunk" else fused_recurrent_gated_retention
        cu_seqlens = None
        if lengths is not None:
            cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        num_seqs = batch if lengths is None else len(lengths)
        q, k, v = (torch.zeros(batch, length, heads, dim, dtype=dtype) for _ in range(3))
        g = torch.zeros(batch, length, heads)
        h0 = torch.zeros(num_seqs, heads, dim, dim) if with_state else None
        if backward:
            q, k, v, g, h0 = _leaves(q, k, v, g, h0)
        o, ht = fn(q, k, v, g, scale=1.0, initial_state=h0, output_final_state=with_state, cu_seqlens=cu_seqlens)
        if backward:
            _backward(o, ht)

    return run


def _attention(dtype, batch, length, kv_length, heads, kv_heads, dim, window, backward=True, sinks=0):
    def run() -> None:
        from hf_yoco.kernels.sliding_window_attention.chunk import sliding_window_attention

        q = torch.zeros(batch, length, heads, dim, dtype=dtype)
        k, v = (torch.zeros(batch, kv_length, kv_heads, dim, dtype=dtype) for _ in range(2))
        if backward:
            q, k, v = _leaves(q, k, v)
        o = sliding_window_attention(q, k, v, window_size=window, scale=dim**-0.5, sinks=sinks)
        if backward:
            _backward(o)

    return run


def _decode(dtype, batch, length, kv_length, heads, kv_heads, dim, num_splits=None):
    def run() -> None:
        from hf_yoco.kernels.shared_kv_attention.decode import shared_kv_attention

        q = torch.zeros(batch, length, heads, dim, dtype=dtype)
        k, v = (torch.zeros(batch, kv_length, kv_heads, dim, dtype=dtype) for _ in range(2))
        shared_kv_attention(q, k, v, scale=dim**-0.5, num_splits=num_splits)

    return run


def matrix_cases(dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """One call per kernel (forward and backward), compiled for every dtype: together they launch every kernel."""
    return {
        "gret-chunk-h0-ht": _gated_retention(dtype, "chunk", 2, 100, 4, 128, True),
        "gret-recurrent-decode": _gated_retention(dtype, "recurrent", 3, 1, 4, 80, True, backward=False),
        "swa-gqa4-window": _attention(dtype, 2, 200, 200, 8, 2, 128, 64),
        "decode-gqa8": _decode(dtype, 2, 1, 300, 16, 2, 128),
    }


def shape_cases(dtype: torch.dtype) -> dict[str, Callable[[], None]]:
    """Awkward shapes, compiled for the first dtype: head dims 16..128 (80 and 96 pad to 128), GQA ratios 1..8,
    lengths below / not a multiple of every tile, no state, packed sequences, no window, and batch x heads beyond
    the 65535 programs of a grid's y axis (a Block Transformer prefill runs one local sequence per block)."""
    return {
        "gret-chunk-varlen-no-state": _gated_retention(dtype, "chunk", 1, 108, 2, 64, False, lengths=[5, 70, 33]),
        "gret-recurrent-train-head32": _gated_retention(dtype, "recurrent", 2, 9, 2, 32, True),
        "gret-decode-large-batch": _gated_retention(dtype, "recurrent", 4100, 1, 16, 16, True, backward=False),
        "swa-gqa8-causal-T<S": _attention(dtype, 1, 37, 130, 8, 1, 64, 0),
        "swa-mha-head80-window>T": _attention(dtype, 1, 50, 50, 4, 4, 80, 1024),
        "swa-gqa2-head96": _attention(dtype, 1, 70, 90, 4, 2, 96, 33),
        "swa-gqa4-window-sinks": _attention(dtype, 1, 200, 200, 8, 2, 64, 64, sinks=4),
        "swa-many-local-sequences": _attention(dtype, 8200, 5, 5, 8, 2, 64, 0),
        "decode-T3-head80-mha": _decode(dtype, 1, 3, 77, 4, 4, 80, num_splits=2),
        "decode-large-batch": _decode(dtype, 4200, 1, 16, 32, 16, 16),
    }


def record_launches(dtypes: tuple[str, ...]) -> list[Launch]:
    """Run the matrix cases for every dtype and the shape cases for the first one, recording their launches."""
    launches: list[Launch] = []
    for i, dtype_name in enumerate(dtypes):
        cases = matrix_cases(getattr(torch, dtype_name))
        if i == 0:
            cases.update(shape_cases(getattr(torch, dtype_name)))
        for case, run in cases.items():
            with intercept_launches(launches.append, f"{case} {dtype_name}"):
                run()
    return launches


def _config_name(config) -> str:
    if config is None:
        return "default"
    tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles + ' ' if tiles else ''}w{config.num_warps}s{config.num_stages}"


def plan_jobs(launches: list[Launch], archs: tuple[int, ...]) -> tuple[list[Job], list[str]]:
    """Specialize every launch for every architecture and config (as the runtime would); dedupe; check grids."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    problems, jobs, seen = [], [], set()
    for launch in launches:
        for axis, (size, limit) in enumerate(zip(launch.grid, MAX_GRID)):
            if size > limit:
                problems.append(
                    f"{launch.case}: {launch.name} grid {launch.grid} exceeds CUDA's {limit} on axis {axis}"
                )
        fn = _jit_function(getattr(importlib.import_module(launch.module), launch.name))
        for arch in archs:
            backend = make_backend(GPUTarget("cuda", arch, 32))
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            for config in launch.configs:
                kwargs = {**launch.kwargs, **(config.all_kwargs() if config is not None else {})}
                bound, specialization, options = binder(*launch.args, **kwargs)
                options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
                key = (launch.name, arch, repr(signature), _structure(fn, constexprs), repr(attrs), repr(options))
                if key in seen:
                    continue
                seen.add(key)
                jobs.append(
                    Job(launch.case, launch.name, _config_name(config), arch, launch.module, launch.name, signature,
                        constexprs, attrs, dataclasses.asdict(options))
                )  # fmt: skip
    return jobs, problems


def _structure(fn, constexprs: dict) -> str:
    """The constexprs that shape the compiled code (see `SIZE_CONSTEXPRS`)."""
    names = [param.name for param in fn.params]
    kept = {}
    for path, value in constexprs.items():
        name = names[path[0]]
        if name in SIZE_CONSTEXPRS:
            continue
        kept[name] = value > 0 if name in ("WINDOW", "SINKS") else value
    return repr(sorted(kept.items()))


def compile_job(job: Job) -> dict:
    """Compile one job (PTX + cubin); returns its summary, with the error instead when it fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(getattr(importlib.import_module(job.module), job.name))
    result = {"case": job.case, "kernel": job.kernel, "config": job.config, "arch": job.arch}
    start = time.perf_counter()
    try:
        source = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        if not compiled.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        result.update(ok=True, shared=compiled.metadata.shared)
    except Exception as error:  # reported, not raised: one broken config must not hide the others
        result.update(ok=False, error=f"{type(error).__name__}: {error}".strip()[:2000])
    result["seconds"] = time.perf_counter() - start
    return result


def _init_worker() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def shared_memory_problems(results: list[dict]) -> list[str]:
    """Launches (case x kernel) for which no compiled config fits the shared memory of a GPU of its architecture
    (the autotuner skips configs that do not fit; a launch fails only when none does)."""
    smallest: dict[tuple, int] = {}
    for r in results:
        if r["ok"]:
            key = (r["case"], r["kernel"], r["arch"])
            smallest[key] = min(smallest.get(key, r["shared"]), r["shared"])
    return [
        f"{case}: {kernel} needs {shared} bytes of shared memory in its smallest config; {gpu} has {limit}"
        for (case, kernel, arch), shared in smallest.items()
        for gpu, limit in GPUS[arch]
        if shared > limit
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    parser.add_argument("--json", help="write every compilation's result to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile kernels")
    unknown = sorted(set(args.archs) - set(GPUS))
    if unknown:
        parser.error(f"--archs: unknown architectures {unknown}; known: {sorted(GPUS)}")

    start = time.perf_counter()
    launches = record_launches(tuple(args.dtypes))
    jobs, problems = plan_jobs(launches, tuple(args.archs))
    print(
        f"{len(launches)} launches -> {len(jobs)} compilations (archs {args.archs}, dtypes {args.dtypes})", flush=True
    )
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, initializer=_init_worker) as pool:
            results = list(pool.map(compile_job, jobs, chunksize=4))
    else:
        results = [compile_job(job) for job in jobs]
    failures = [r for r in results if not r["ok"]]
    problems += shared_memory_problems(results)
    problems += coverage_problems(results, args.dtypes, args.archs)

    per_kernel: dict[str, list[int]] = {}
    for r in results:
        per_kernel.setdefault(r["kernel"], [0, 0])[0 if r["ok"] else 1] += 1
    width = max(map(len, per_kernel))
    print(f"{'kernel':{width}}  compiled  failed")
    for kernel, (ok, bad) in sorted(per_kernel.items()):
        print(f"{kernel:{width}}  {ok:8d}  {bad:6d}")
    for r in failures[:20]:
        print(f"FAILED {r['kernel']} [{r['case']}; {r['config']}; sm_{r['arch']}]: {r['error'][:600]}")
    for problem in problems:
        print(f"PROBLEM {problem}")
    if args.json:
        with open(args.json, "w") as f:
            summary = {"archs": args.archs, "dtypes": args.dtypes, "kernels": all_kernels()}
            json.dump({**summary, "results": results, "problems": problems}, f, indent=1)
    print(f"{len(results) - len(failures)}/{len(results)} compiled, {len(problems)} problems, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    return 1 if failures or problems else 0


if __name__ == "__main__":
    sys.exit(main())
