"""Torch-only helpers shared by the kernels: backend resolution, input guards and the causal band. Never imports triton at import time."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

KERNEL_BACKENDS = ("auto", "torch", "triton")
# Largest head dim the kernels take: every tile config of the kernels fits the shared memory of an A100 / H100 /
# L4 up to 128 (checked by `python -m hf_yoco.kernels.aot`); `ops` sends larger heads to PyTorch.
MAX_HEAD_DIM = 128


def is_interpreter() -> bool:
    """True when the Triton interpreter is requested (`TRITON_INTERPRET=1`, which must be set before `import triton`)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def is_triton_available() -> bool:
    """True when the `triton` package can be imported (says nothing about a usable GPU driver)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must never break hf_yoco
        return False
    return True


def is_triton_usable(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on tensors of `device`: CUDA with triton, or CPU under the interpreter."""
    device = torch.device(device)
    if not is_triton_available():
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and is_interpreter()


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Resolve `kernel_backend` for the tensors of one call.

    - "torch": never.
    - "auto": Triton on CUDA tensors when triton is importable, PyTorch otherwise (CPU included). The kernels multiply
      fp32 operands in TF32, so fp32 tensors take them only when torch may too
      (`torch.set_float32_matmul_precision("high")`); at torch's default ("highest") fp32 stays on PyTorch.
    - "triton": always; on CPU tensors only under `TRITON_INTERPRET=1`, else a `RuntimeError` says why.
    """
    if backend == "torch":
        return False
    if backend == "auto":
        exact_fp32 = tensor.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
        return tensor.is_cuda and not exact_fp32 and is_triton_usable(tensor.device)
    if backend != "triton":
        raise ValueError(f"`kernel_backend` must be one of {KERNEL_BACKENDS}, got {backend!r}.")
    if not is_triton_available():
        raise RuntimeError("kernel_backend='triton' needs the `triton` package (pip install 'hf-yoco[triton]').")
    if not is_triton_usable(tensor.device):
        raise RuntimeError(
            f"kernel_backend='triton' cannot run on {tensor.device.type} tensors: use a CUDA device, or set "
            "TRITON_INTERPRET=1 before triton is first imported to run the kernels in the Triton interpreter (slow, "
            "for tests), or use kernel_backend='auto'/'torch'."
        )
    return True


def causal_band(
    length: int, kv_length: int, window: int | None, device: torch.device | str, sinks: int = 0
) -> torch.Tensor:
    """`[T, S]` bool, True where query i may see key j: `i + S - T - W < j <= i + S - T` (queries bottom-right aligned
    with the keys, as with a KV cache; `W = window` keys, itself included; None or 0 = full causal), or `j < sinks`
    (attention sinks, causally)."""
    i = torch.arange(length, device=device)[:, None] + kv_length - length
    j = torch.arange(kv_length, device=device)[None, :]
    return (j <= i) & ((j > i - window) | (j < sinks)) if window else j <= i


def input_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Make every tensor argument contiguous and run under the tensors' CUDA device."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        tensor = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if tensor is not None and tensor.is_cuda:
            with torch.cuda.device(tensor.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def attention_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check the attention kernels' inputs (q `[B, T, H, D]`, k/v `[B, S, H_kv, D]`, `S >= T`, `H_kv` divides `H`) and
    return them, in fp32 when they are bf16 under `TRITON_INTERPRET=1` (bf16 `tl.dot` is wrong in the interpreter)."""
    batch, length, heads, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dims above {MAX_HEAD_DIM} are not supported, got D={head_dim}")
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[2]:
        raise ValueError(f"expected q [B, T, H, D], k/v [B, S, H_kv, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if k.shape[1] < length:
        raise ValueError(f"need at least as many keys as queries (S >= T), got S={k.shape[1]}, T={length}")
    if is_interpreter() and q.dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    return q, k, v


def next_power_of_2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum) (`tl.dot` needs tile sides >= 16)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def autotune_configs(
    warps: tuple[int, ...] = (4, 8),
    stages: tuple[int, ...] = (2, 3),
    tiles: tuple[dict[str, int], ...] = ({},),
    interpreter_tile: dict[str, int] | None = None,
    small_tile: dict[str, int] | None = None,
) -> list[Any]:
    """Autotune candidates: every `tiles` meta-parameter set x `num_warps` x `num_stages` (the default, no tiles, is
    for kernels whose tiles the algorithm fixes), plus `small_tile` (default: the last of `tiles`) unpipelined
    (`num_stages=1`) with the fewest warps: the config that fits the 99 KB of shared memory of sm_86 / sm_89 GPUs
    with fp32 inputs and 128-wide heads (`python -m hf_yoco.kernels.aot` checks every kernel has one that fits).

    Under `TRITON_INTERPRET=1` one config, `interpreter_tile` (autotuning needs a GPU, and the interpreter ignores
    warps and stages). Imports triton (call it from the kernel modules only).
    """
    import triton

    if is_interpreter():
        return [triton.Config(dict(interpreter_tile or {}))]
    configs = [triton.Config(dict(tile), num_warps=w, num_stages=s) for tile in tiles for w in warps for s in stages]
    if 1 not in stages:
        configs.append(triton.Config(dict(small_tile or tiles[-1]), num_warps=warps[0], num_stages=1))
    return configs


def patch_triton_interpreter_for_liger() -> Callable[[], None]:
    """Let the Triton interpreter run Liger-Kernel's RMSNorm / SwiGLU as compiled Triton does; returns an undo.

    Tests and `benchmarks/kernel_speed.py --smoke` only: the models never call this. Compiled Triton passes Python-float
    kernel arguments as fp32 scalars and lowers `libdevice.rsqrt`; triton 3.9's interpreter passes plain floats (Liger
    calls `eps.to(tl.float32)`) and has no libdevice, so without these two patches Liger's RMSNorm and SwiGLU kernels
    fail in the interpreter only. Does nothing (and the undo is a no-op) unless `TRITON_INTERPRET=1`. Imports triton
    and liger-kernel when it patches.
    """
    if not is_interpreter():
        return lambda: None
    import numpy as np
    import triton.language as tl
    from liger_kernel.ops import rms_norm
    from triton.runtime import interpreter

    implicit_cvt, rsqrt = interpreter._implicit_cvt, rms_norm.rsqrt

    def float_as_fp32_scalar(arg: Any) -> Any:
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return implicit_cvt(arg)

    interpreter._implicit_cvt = float_as_fp32_scalar
    rms_norm.rsqrt = lambda x: tl.math.rsqrt(x)  # looked up while the interpreter patches tl

    def undo() -> None:
        interpreter._implicit_cvt, rms_norm.rsqrt = implicit_cvt, rsqrt

    return undo
