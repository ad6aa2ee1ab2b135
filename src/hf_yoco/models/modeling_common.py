"""Building blocks shared by the hf_yoco models (YOCO and Block Transformer).

Everything here is plain PyTorch + transformers so that it travels with a checkpoint as Hub remote code: the model
files import it as a flat sibling (`from .modeling_common import ...`), the only form `save_pretrained` copies.

- `RMSNorm`: Llama-convention RMSNorm (normalize in fp32, cast back, then scale); `elementwise_affine=False` gives
  the weight-less per-head norm of gated retention.
- `GatedMLP`: SwiGLU feed-forward with Llama names (`gate_proj`, `up_proj`, `down_proj`).
- `RotaryEmbedding` / `apply_rotary` (one tensor) / `apply_rotary_pos_emb` (query and key): RoPE with transformers'
  `rope_parameters` (default, linear, yarn, llama3, ...; not the types that rescale at run time), partial rotary, and
  the official YOCO variant (`theta ** -linspace(0, 1, d/2)` frequencies, interleaved GPT-J pairs).
- `eager_attention_forward` / `attention_forward`: the attention glue that dispatches through transformers'
  attention interface (`config._attn_implementation`: eager, sdpa, flash_attention_2, ...).
- `find_packed_sequences`: packed-sequence detection from `position_ids` (YOCO masks them, the Block Transformer
  refuses them).
- `kernel_op`: the `config.kernel_backend` switch ("auto" | "torch" | "triton") to hf_yoco's Triton kernels, imported
  under a guard so the file still works without hf_yoco installed.
- `causal_lm_head_and_loss`: LM head + shifted cross-entropy of both models, with `skip_logits` and the hook for a
  fused linear cross-entropy (Liger, through `hf_yoco.integrations`) that never materialises the logits.
- `HfYocoModelMixin`: model-card `push_to_hub` and attention-implementation switching for both models.
- `CACHE_NAME` / `pick_cache` / `cache_kwarg` / `output_cache`: the one place that knows what the installed transformers
  release calls the cache (`past_key_values` up to 5.23, `cache` from 5.24).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.masking_utils import find_packed_sequence_indices
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

logger = logging.get_logger(__name__)
# True for the package's own copy of this file; False for the copy a checkpoint carries as Hub remote code.
IN_PACKAGE = __name__.startswith("hf_yoco.")

# ---------------------------------------------------------------------------------------------------------------------
# transformers compatibility: the name of the cache.
# transformers 5.24 renamed the cache argument of `forward` / `generate` / `prepare_inputs_for_generation` / the
# `create_*_mask` functions / `GradientCheckpointingLayer`, and the cache field of every model output, from
# `past_key_values` to `cache` (the old name is deprecated, removal announced for 5.40). The models accept both names
# from their callers and speak the installed release's name to transformers, only through the helpers below.
# ---------------------------------------------------------------------------------------------------------------------

# "cache" (transformers >= 5.24) or "past_key_values" (earlier 5.x): the name generate() passes the cache under, the
# name model outputs store it under, and the keyword transformers' mask functions and checkpointed layers read.
CACHE_NAME: str = (
    "cache" if "cache" in {field.name for field in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)


def pick_cache(cache: Any, past_key_values: Any) -> Any:
    """The cache a caller passed as `cache` or as `past_key_values`; `cache` wins when both are given and differ
    (as transformers' own renaming does), with a warning."""
    if past_key_values is None or past_key_values is cache:
        return cache
    if cache is not None:
        logger.warning_once("Both `cache` and `past_key_values` were passed; using `cache` and ignoring the other.")
        return cache
    return past_key_values


def cache_kwarg(cache: Any) -> dict[str, Any]:
    """`{CACHE_NAME: cache}`: the cache as a keyword for transformers' output classes, mask functions and
    `GradientCheckpointingLayer`s (which drop the cache under gradient checkpointing only under that name)."""
    return {CACHE_NAME: cache}


def output_cache(outputs: Any) -> Any:
    """The cache of a model output or a `generate(..., return_dict_in_generate=True)` output, whatever the installed
    release calls it (reading the other name warns from 5.24 on and fails before)."""
    if isinstance(outputs, Mapping):
        return outputs.get(CACHE_NAME)
    return getattr(outputs, CACHE_NAME, None)


def checks_values(reference: torch.Tensor, past_length: int) -> bool:
    """Whether `check_model_inputs` reads input values (a host sync on an accelerator): always on CPU, where it costs
    nothing; on accelerators at prefill only, so decode steps never wait for the device."""
    return reference.device.type == "cpu" or past_length == 0


def check_model_inputs(
    config,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    past_length: int | torch.Tensor = 0,
    static_length: int | None = None,
) -> None:
    """A clear `ValueError` for malformed model inputs, naming the argument and what it must be.

    Checks shapes and dtypes always; the values (ids within the vocabulary, a real token in every row of the padding
    mask) cost a host sync, so on a GPU they are checked at prefill only (decode steps feed the model's own tokens).
    With a static cache (`static_length`, its capacity; `past_length` may then be a tensor) a 2D mask may also span
    the whole capacity, as `generate` passes it to keep compiled shapes fixed.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
    if input_ids is not None:
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be [batch, seq_len], got shape {list(input_ids.shape)}")
        batch, length = input_ids.shape
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be [batch, seq_len, hidden_size={config.hidden_size}], got shape "
                f"{list(inputs_embeds.shape)}"
            )
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"`inputs_embeds` must be floating point, got dtype {inputs_embeds.dtype}")
        batch, length = inputs_embeds.shape[:2]
    if length == 0:
        raise ValueError("empty input: the sequence has no tokens (seq_len 0); pass at least one token")
    reference = input_ids if input_ids is not None else inputs_embeds
    compiling = torch.compiler.is_compiling()
    if isinstance(past_length, torch.Tensor) and not compiling:
        past_length = int(past_length)
    check_values = not compiling and checks_values(reference, past_length)
    if input_ids is not None and check_values:
        low, high = (int(v) for v in torch.aminmax(input_ids))
        if low < 0 or high >= config.vocab_size:
            raise ValueError(
                f"`input_ids` must be token ids in [0, {config.vocab_size}) (the config's vocab_size), got values "
                f"from {low} to {high}"
            )
    if attention_mask is not None:
        if attention_mask.ndim == 2:
            # (compiled with a tensor `past_length`: only what the shape alone tells)
            widths = [past_length + length] if isinstance(past_length, int) else [attention_mask.shape[1]]
            widths += [static_length] if static_length is not None else []
            if attention_mask.shape[0] != batch or attention_mask.shape[1] not in widths:
                expected = " or ".join(f"[{batch}, {w}]" for w in widths)
                raise ValueError(
                    "`attention_mask` must be [batch, cached + new tokens]"
                    + (" or [batch, static cache length]" if static_length is not None else "")
                    + f" = {expected}, got {list(attention_mask.shape)}"
                )
            if check_values and past_length == 0:
                empty = (attention_mask == 0).all(-1).nonzero().flatten().tolist()
                if empty:
                    raise ValueError(f"`attention_mask` rows {empty} mask every token: each row needs a real token")
        elif attention_mask.ndim != 4:
            raise ValueError(
                "`attention_mask` must be a 2D [batch, seq_len] padding mask (or a 4D attention mask), got shape "
                f"{list(attention_mask.shape)}"
            )
    if position_ids is not None and (
        position_ids.ndim != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch)
    ):
        raise ValueError(f"`position_ids` must be [batch or 1, seq_len={length}], got {list(position_ids.shape)}")


def check_labels(labels: torch.Tensor | None, inputs: torch.Tensor | None) -> None:
    """`labels` must have the `[batch, seq_len]` of the inputs (ids or embeddings)."""
    if labels is not None and inputs is not None and list(labels.shape) != list(inputs.shape[:2]):
        raise ValueError(f"`labels` must be [batch, seq_len] = {list(inputs.shape[:2])}, got {list(labels.shape)}")


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Logical bytes of the given tensors (None and non-tensors count 0); used by the caches' `memory_bytes()`."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def storage_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes of the distinct storages behind the given tensors: what they keep allocated (a view of a larger tensor
    keeps all of it; tensors sharing a storage count it once)."""
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def cache_tensors(obj, seen: set | None = None) -> list[torch.Tensor]:
    """Every tensor reachable from a cache object's attributes (layers, dicts, lists, tuples included)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for value in obj.values() for t in cache_tensors(value, seen)]
    if isinstance(obj, (list, tuple)):
        return [t for value in obj for t in cache_tensors(value, seen)]
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, nn.Module)):
        return cache_tensors(vars(obj), seen)
    return []


class RMSNorm(nn.Module):
    """Root-mean-square norm. Computes in fp32 and casts back before the (optional) weight, like `LlamaRMSNorm`."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(input_dtype)
        return hidden_states if self.weight is None else self.weight * hidden_states

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"{shape}, eps={self.variance_epsilon}"


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: `down_proj(act(gate_proj(x)) * up_proj(x))`."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


def compute_inv_freq(config, rotary_dim: int, style: str = "default") -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `rotary_dim` rotated channels, and the cos/sin scaling factor.

    `style="yoco"` is the official YOCO formula `theta ** -linspace(0, 1, rotary_dim // 2)` (its last frequency is
    exactly `1 / theta`); otherwise `config.rope_parameters["rope_type"]` picks a transformers RoPE function.
    """
    rope_parameters = config.rope_parameters
    base = rope_parameters["rope_theta"]
    if style == "yoco":
        exponent = torch.linspace(0, 1, rotary_dim // 2, dtype=torch.float)
        return 1.0 / (base**exponent), 1.0
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
        return 1.0 / (base**exponent), 1.0
    if rope_type in RUNTIME_ROPE_TYPES:
        raise ValueError(
            f"`rope_parameters['rope_type']` {rope_type!r} rescales the frequencies with the sequence length at run "
            f"time, which hf_yoco does not do; use one of {sorted(set(ROPE_INIT_FUNCTIONS) - RUNTIME_ROPE_TYPES)}."
        )
    return ROPE_INIT_FUNCTIONS[rope_type](_RotaryConfigView(config, rotary_dim), None)


# RoPE types whose frequencies change with the sequence length during the forward (transformers'
# `dynamic_rope_update`); hf_yoco computes the frequencies once.
RUNTIME_ROPE_TYPES = {"dynamic", "longrope"}


class _RotaryConfigView:
    """A config as transformers' RoPE functions must see it for `rotary_dim` rotated channels: they size their
    frequencies by `head_dim * rope_parameters['partial_rotary_factor']`, while YOCO's retention heads and the Block
    Transformer's partial rotary have other widths."""

    def __init__(self, config, rotary_dim: int) -> None:
        self._config = config
        self.head_dim = rotary_dim
        self.partial_rotary_factor = 1.0
        self.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 1.0}

    def standardize_rope_params(self) -> None:  # already standard: a copy of the config's own
        pass

    def __getattr__(self, name: str):
        return getattr(self._config, name)


class RotaryEmbedding(nn.Module):
    """Produces `(cos, sin)` of shape `[B, T, rotary_dim]` for the given position ids.

    Args:
        config: a config with `rope_parameters` (and `max_position_embeddings`).
        rotary_dim: number of rotated channels per head (head_dim, or less for partial rotary).
        interleaved: rotate GPT-J pairs `(x[2i], x[2i+1])` instead of halves `(x[i], x[i + d/2])`.
        style: "default" (transformers RoPE types) or "yoco" (official YOCO frequencies).
    """

    def __init__(self, config, rotary_dim: int, interleaved: bool = False, style: str = "default") -> None:
        super().__init__()
        self.config = config
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        self.style = style
        inv_freq, self.attention_scaling = compute_inv_freq(config, rotary_dim, style)
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    def reset_inv_freq(self) -> torch.Tensor:
        """Fresh inverse frequencies (used by `_init_weights` after meta-device construction)."""
        return compute_inv_freq(self.config, self.rotary_dim, self.style)[0]

    def _apply(self, fn, *args, **kwargs):
        """Keep the frequencies in fp32 when the model is cast (`model.to(torch.bfloat16)` casts buffers too): bf16
        frequencies put the rotation angle of position 1000 off by up to 2 radians."""
        fp32 = {name: buffer for name, buffer in self.named_buffers(recurse=False) if buffer.dtype == torch.float32}
        super()._apply(fn, *args, **kwargs)
        for name, buffer in fp32.items():
            cast = getattr(self, name)
            if cast.dtype != torch.float32:
                setattr(self, name, buffer.to(cast.device))
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [B, T, 1] * [R/2] -> [B, T, R/2]
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        if self.interleaved:
            emb = freqs.repeat_interleave(2, dim=-1)  # [B, T, R]: f0 f0 f1 f1 ...
        else:
            emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, R]: f0 f1 ... f0 f1 ...
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): GPT-J / interleaved pairs."""
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x_odd, x_even), dim=-1).flatten(-2)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False, unsqueeze_dim: int = 1
) -> torch.Tensor:
    """Rotate `x` with `cos`/`sin` of shape `[B, T, R]` (R <= D; the remaining channels pass through).

    `x` is `[B, H, T, D]` with `unsqueeze_dim=1` (attention layout) or `[B, T, H, D]` with `unsqueeze_dim=2`.
    """
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)  # [B, 1, T, R] or [B, T, 1, R]
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotate = rotate_every_two if interleaved else rotate_half
    x_rot = x_rot * cos + rotate(x_rot) * sin
    return x_rot if x_pass.shape[-1] == 0 else torch.cat((x_rot, x_pass), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    unsqueeze_dim: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query and key together (transformers' signature plus `interleaved`); see `apply_rotary` for shapes.

    The model files call this pair form through their module global, which is what Liger's fused RoPE replaces
    (`hf_yoco.integrations.apply_liger_kernel_to_hf_yoco`).
    """
    return apply_rotary(query, cos, sin, interleaved, unsqueeze_dim), apply_rotary(
        key, cos, sin, interleaved, unsqueeze_dim
    )


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, H_kv * n_rep, T, D] (GQA)."""
    if n_rep == 1:
        return hidden_states
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: `softmax(q k^T * scaling + mask) v`; returns `([B, T, H, D], [B, H, T, S])`."""
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    return attn_output.transpose(1, 2).contiguous(), attn_weights


class BatchMapCacheMixin:
    """transformers' batch operations of a cache (beam reorder, repeat, select) through one `_map_batch(fn)` that
    applies `fn` to the batch dimension of every tensor the cache holds (defined by each hf_yoco cache)."""

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep rows `beam_idx`."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])


def is_paged_cache(cache) -> bool:
    """Whether `cache` is transformers' continuous-batching `PagedAttentionCache` (`generate_batch`, `transformers
    serve`): the requests' new tokens come packed in one row, with the engine's `cu_seq_lens_q` and cache indices."""
    return hasattr(cache, "layer_to_allocator") and hasattr(cache, "cache_allocators")


def cache_update(
    cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int, kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update` for every cache kind; the paged cache of continuous batching also reads (and rewrites in place,
    for the attention call that follows) the engine's arguments in `kwargs`."""
    if is_paged_cache(cache):
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    return cache.update(key, value, layer_idx)


def find_packed_sequences(
    position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, batch_size: int
) -> torch.Tensor | None:
    """Sequence index per token `[B, T]` when `position_ids` restart inside a row (packed, padding-free sequences as
    from `DataCollatorWithFlattening`; transformers' rule: only without `attention_mask`), else None."""
    if attention_mask is not None or position_ids is None or position_ids.ndim != 2 or position_ids.shape[1] < 2:
        return None
    return find_packed_sequence_indices(position_ids.expand(batch_size, -1))  # sometimes [1, T] for the whole batch


def kernel_op(config, tensor: torch.Tensor, name: str) -> Callable | None:
    """The Triton op `name` of `hf_yoco.kernels.ops` when `config.kernel_backend` selects Triton for `tensor`, else None.

    "auto": Triton on CUDA tensors when triton is importable, PyTorch otherwise, and PyTorch (after one warning) for
    an op whose kernel failed to compile or launch on that device; "torch": never; "triton": always (CPU tensors need
    `TRITON_INTERPRET=1`, otherwise a clear error). The op returns None for calls its kernel does not cover.
    """
    backend = getattr(config, "kernel_backend", "auto")
    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
        return None  # decided without importing hf_yoco (remote code on CPU never touches it)
    if torch.compiler.is_compiling():
        return None  # compiled code (static-cache decode) runs the PyTorch forms, which inductor fuses
    try:  # optional Triton kernels; as Hub remote code without hf_yoco installed, everything stays on PyTorch
        from hf_yoco.kernels import ops
    except ImportError:
        if backend == "triton":
            raise ImportError("kernel_backend='triton' needs the hf_yoco package with triton installed.") from None
        return None
    return ops.dispatch(backend, name, tensor)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatch to the attention implementation chosen in `module.config._attn_implementation`.

    `module` needs `config`, `num_key_value_groups`, `is_causal` and `layer_idx` (transformers' contract).
    Shapes: query `[B, H, T, D]`, key/value `[B, H_kv, S, D]`; returns `[B, T, H, D]` and optional weights.
    With Triton selected (`kernel_op`), plain causal / sliding-window calls run hf_yoco's kernels (no weights).
    """
    triton_attention = None if dropout and module.training else kernel_op(module.config, query, "attention")
    if triton_attention is not None:
        output = triton_attention(module, query, key, value, attention_mask, scaling, kwargs.get("sliding_window"))
        if output is not None:
            return output, None
    if (
        module.config._attn_implementation == "sdpa"
        and query.shape[2] == 1
        and module.num_key_value_groups > 1
        and not (dropout and module.training)
        and (attention_mask is None or attention_mask.shape[-2] == 1)
    ):
        return sdpa_grouped_query_decode(query, key, value, attention_mask, scaling), None
    implementation = module.config._attn_implementation
    if implementation == "paged|eager":  # the same math; transformers <= 5.23's version also updates the cache,
        implementation = "eager"  # which our layers already did (`cache_update`)
    interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    return interface(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def sdpa_grouped_query_decode(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """One query token with GQA: the query heads sharing a K/V head become that head's query rows, so SDPA reads each
    K/V head once instead of once per query head (decode over a long cache is bound by reading K/V).

    query `[B, H, 1, D]`, key/value `[B, H_kv, S, D]`, mask `[B, 1, 1, S]` or None -> `[B, 1, H, D]`.
    """
    batch, heads, _, dim = query.shape
    grouped = query.view(batch, key.shape[1], heads // key.shape[1], dim)  # [B, H_kv, G, D]; head h = kv * G + g
    output = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return output.reshape(batch, heads, 1, dim).transpose(1, 2)  # [B, 1, H, D]


def causal_lm_head_and_loss(
    model: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor | None,
    skip_logits: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(loss, logits)` of a causal LM from its last hidden states; the loss is the shifted cross-entropy.

    `skip_logits` follows transformers' Liger convention: True returns no logits (Trainer sends it with
    `use_liger_kernel` for loss-only evaluation); None skips them when training with labels and a fused linear
    cross-entropy is installed on the model (`model._fused_linear_cross_entropy`, set by
    `hf_yoco.integrations.apply_liger_kernel_to_hf_yoco`), which computes the loss from the hidden states without
    materialising `[B, T, vocab]` logits. `kwargs` reach the loss (`num_items_in_batch`, `ignore_index`, ...).
    """
    fused_loss = getattr(model, "_fused_linear_cross_entropy", None)
    if skip_logits is None:
        skip_logits = fused_loss is not None and model.training and labels is not None
    if skip_logits and labels is None:
        raise ValueError("`skip_logits=True` needs `labels`: logits are only skipped when the loss is computed.")
    if skip_logits and fused_loss is not None:
        return fused_loss(model, hidden_states, labels, **kwargs), None
    logits = model.lm_head(hidden_states)
    loss = None
    if labels is not None:
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **kwargs)
    return loss, None if skip_logits else logits


# ---------------------------------------------------------------------------------------------------------------------
# GPT-NeoX-style block parts (Block Transformer's `layer_style="gpt_neox"`, for converting the official Pythia-based
# checkpoints). LayerNorm itself is `torch.nn.LayerNorm`.
# ---------------------------------------------------------------------------------------------------------------------


class DenseMLP(nn.Module):
    """Two-layer feed-forward `down_proj(act(up_proj(x)))` (GPT-NeoX `dense_h_to_4h` -> `dense_4h_to_h`)."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


def _read_config_json(folder: str | os.PathLike) -> dict:
    from hf_yoco.checkpoints import read_config

    return read_config(Path(folder))


# `from_pretrained` arguments that are about loading (not config overrides), though configs have a field of the name.
_LOADING_KWARGS = {"dtype", "torch_dtype", "attn_implementation", "device_map"}


class HfYocoModelMixin:
    """Behaviour shared by the hf_yoco `PreTrainedModel`s (put it first in the bases).

    As part of the hf_yoco package (as Hub remote code, transformers' own behaviour is kept, and hf_yoco is never
    imported, even where it is installed):
    - `save_pretrained` writes atomically: into a temporary folder that replaces the target only once complete
      (`hf_yoco.checkpoints.atomic_directory`), so an interrupted save leaves the previous folder intact.
    - `from_pretrained` of a local folder first checks its files (`hf_yoco.checkpoints.check_model_folder`): a
      truncated or corrupted safetensors, unknown `config.json` fields or a `config.json` that does not match the
      weights raise a clear error naming the file.
    - `push_to_hub` also uploads hf_yoco's model card (`hf_yoco.hub`).
    - The attention implementation can be switched after loading (`model.set_attn_implementation("eager")`): the
      layers dispatch through transformers' `AttentionInterface` in `attention_forward` above, which transformers'
      source-grep heuristic cannot see from the model file.
    """

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        if not IN_PACKAGE or not kwargs.get("is_main_process", True) or kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, *args, **kwargs)
        from hf_yoco.checkpoints import atomic_directory

        with atomic_directory(save_directory) as tmp:
            return super().save_pretrained(tmp, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *args, **kwargs):
        path = pretrained_model_name_or_path
        if IN_PACKAGE and path is not None and os.path.isdir(path) and not kwargs.get("subfolder"):
            from hf_yoco.checkpoints import check_model_folder

            config = kwargs.get("config")
            if config is None or isinstance(config, (str, os.PathLike)):
                fields = cls.config_class().to_dict().keys() - _LOADING_KWARGS
                overrides = {key: value for key, value in kwargs.items() if key in fields}
                config = cls.config_class.from_dict({**_read_config_json(path), **overrides})
            model_class = None if kwargs.get("ignore_mismatched_sizes") else cls
            check_model_folder(path, model_class, config)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        if not IN_PACKAGE:
            return super().push_to_hub(repo_id, **kwargs)
        from hf_yoco.hub import push_to_hub_with_card

        return push_to_hub_with_card(self, repo_id, **kwargs)
