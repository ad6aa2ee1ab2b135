"""Model-facing entry points that route to the Triton kernels (imported lazily, so this module never imports triton).

The model files reach these through a guarded import (`modeling_common.kernel_op` -> `dispatch`); each returns None
when the Triton kernel does not cover the call (custom or padded masks, non-causal attention, large heads), and the
caller then runs its PyTorch path. With `kernel_backend="auto"` a kernel that fails to compile or launch on the
user's GPU / Triton version is also answered with None, after one warning, and not tried again on that device.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch

from .utils import MAX_HEAD_DIM, causal_band, use_triton

__all__ = ["attention", "dispatch", "gated_retention", "use_triton"]

# (op name, device) -> why its Triton kernel failed there; with `kernel_backend="auto"` those ops stay on PyTorch.
FAILED_KERNELS: dict[tuple[str, str], str] = {}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, sm_{major}{minor})"
    return f"{device} (Triton interpreter)"


def dispatch(backend: str, name: str, tensor: torch.Tensor) -> Callable | None:
    """The Triton op `name` ("attention" or "gated_retention") for the tensors of one call, or None for PyTorch.

    `kernel_backend` "torch": None. "triton": the op itself, whose errors propagate. "auto": Triton on CUDA tensors,
    wrapped so that an error (a kernel that does not compile for this GPU or Triton release, out of resources, a
    failed launch) warns once, naming the op, the device and the reason, and returns None, so the caller runs its
    PyTorch path; the op then stays on PyTorch on that device for the rest of the process.
    """
    if not use_triton(backend, tensor):
        return None
    op = globals()[name]
    if backend != "auto":
        return op
    key = (name, str(tensor.device))
    if key in FAILED_KERNELS:
        return None

    def op_or_fallback(*args, **kwargs):
        try:
            return op(*args, **kwargs)
        except Exception as error:  # any failure of the optional kernels falls back (auto only)
            import triton

            FAILED_KERNELS[key] = reason = f"{type(error).__name__}: {error}".strip()
            warnings.warn(
                f"hf_yoco: the Triton kernel for `{name}` failed on {_device_name(tensor.device)} with triton "
                f"{triton.__version__} and torch {torch.__version__}; running PyTorch for `{name}` on this device from "
                f"now on (kernel_backend='auto'; use kernel_backend='triton' to raise instead). Reason: {reason[:1000]}",
                RuntimeWarning,
                stacklevel=2,
            )
            return None

    return op_or_fallback


FUSED_RECURRENT_MAX_LEN = 64  # gated retention: token-by-token kernel up to this length, chunkwise above
DECODE_MAX_QUERIES = 16  # attention: split-K decode kernel for at most this many queries (no grad)


def gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """YOCO's gRet (keys pre-scaled, so scale=1): q/k `[B, T, H, K]`, v `[B, T, H, V]`, g `[B, T, H]` -> o, state.

    `cu_seqlens` (`[S + 1]`, with `B = 1`): packed sequences, each from its own initial state (zero by default).
    Returns None for head dims above `MAX_HEAD_DIM` (PyTorch path).
    """
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return None
    if q.shape[1] <= FUSED_RECURRENT_MAX_LEN:
        from .gated_retention.fused_recurrent import fused_recurrent_gated_retention as fn
    else:
        from .gated_retention.chunk import chunk_gated_retention as fn
    return fn(
        q,
        k,
        v,
        g,
        scale=1.0,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
    )


# The last mask checked: (the tensor, weakly; its version counter, shape and the window; the answer). Every layer of
# one forward receives the same mask tensor, so layers 2..L reuse the first layer's answer.
_plain_mask_cache: tuple[weakref.ref, tuple, bool] | None = None


def _band_matches(mask: torch.Tensor, length: int, kv_length: int, window: int, sinks: int = 0) -> bool:
    """True when a 4D `[..., T, S]` mask (bool: True = keep; float: 0 = keep) keeps exactly the bottom-right causal
    (window) band and the sinks. Builds the `[T, S]` band and syncs with the host."""
    keep = mask if mask.dtype == torch.bool else mask == 0
    return bool((keep == causal_band(length, kv_length, window, mask.device, sinks)).all())


def _mask_is_plain(mask: torch.Tensor, length: int, kv_length: int, window: int, sinks: int = 0) -> bool:
    """True when a 4D mask (bool: True = keep; float: 0 = keep) is exactly the bottom-right causal(-window) band.

    The answer for the last mask is kept (`_plain_mask_cache`) and reused while the same tensor object comes back
    unmodified (same version counter and shape) with the same window; any other mask is checked again. Inference
    tensors have no version counter, and tracing has no host sync to save: both are always checked.
    """
    global _plain_mask_cache
    if mask.ndim != 4 or mask.shape[-2] != length or mask.shape[-1] != kv_length:
        return False
    if mask.is_inference() or torch.compiler.is_compiling():
        return _band_matches(mask, length, kv_length, window, sinks)
    key = (mask._version, mask.shape, window, sinks)
    cached = _plain_mask_cache
    if cached is not None and cached[0]() is mask and cached[1] == key:
        return cached[2]
    plain = _band_matches(mask, length, kv_length, window, sinks)
    _plain_mask_cache = (weakref.ref(mask), key, plain)
    return plain


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Causal (sliding-window) GQA attention in transformers' layout, or None when the kernels don't apply.

    query `[B, H, T, D]`, key/value `[B, H_kv, S, D]` -> `[B, T, H, D]`. Only the plain bottom-right causal band (with
    the window, and the module's `sink_tokens` first keys: a YOCO sliding-window layer's sinks, first in a sequence or
    put before a cached window) is covered; padded or custom masks, non-causal modules and head dims above
    `MAX_HEAD_DIM` return None (PyTorch path).
    """
    length, kv_length = query.shape[2], key.shape[2]
    window = int(sliding_window or 0)
    sinks = int(getattr(module, "sink_tokens", 0) or 0) if window else 0
    if not getattr(module, "is_causal", True) or kv_length < length or query.shape[-1] > MAX_HEAD_DIM:
        return None
    if attention_mask is None:
        if 1 < length < kv_length:  # transformers would read this as top-left causal: leave it to PyTorch
            return None
    elif not _mask_is_plain(attention_mask, length, kv_length, window, sinks):
        return None
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, T, H, D]
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not needs_grad and length <= DECODE_MAX_QUERIES and (not window or kv_length <= window + sinks):
        from .shared_kv_attention.decode import shared_kv_attention

        return shared_kv_attention(q, k, v, scale=scaling)
    from .sliding_window_attention.chunk import sliding_window_attention

    return sliding_window_attention(q, k, v, window_size=window, scale=scaling, sinks=sinks)
