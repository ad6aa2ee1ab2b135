"""PyTorch YOCO: "You Only Cache Once: Decoder-Decoder Architectures for Language Models" (arXiv:2405.05254).

Notable features:
- Decoder-decoder: the first `num_self_decoder_layers` layers (half by default) are a *self-decoder* with a
  constant-size state per layer (sliding-window attention, W keys including the current token, or gated retention, a
  gated linear recurrence); the rest is a *cross-decoder* whose layers only own `q_proj`/`o_proj`/MLP.
- The global K/V is computed **once** from the self-decoder output (`global_kv`: RMSNorm -> k_proj/v_proj -> RoPE(K))
  and shared by every cross-decoder layer, so the KV cache is O(N) instead of O(N * L).
- Prefill early exit: with `logits_to_keep=k` (generate passes 1) the cross-decoder runs on the last k positions only.
- Chunked prefill: at inference, at most `config.self_decoder_chunk_size` prompt tokens go through the self-decoder at a
  time (state carried by the cache), bounding activation memory; the result equals one-shot prefill.
- Gated retention in three equivalent forms: parallel (short sequences), chunkwise (long sequences), recurrent (decode).
- `YocoCache` is a `DynamicCache` built from `config.layer_types` / `config.kv_sharing_modes`: per self layer a
  sliding-window KV or a recurrent state, one "store" layer holding the global K/V, "dummy" layers for the rest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    StaticCache,
    StaticLayer,
)
from transformers.generation import GenerationMixin
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
    create_sliding_window_causal_mask,
    packed_sequence_mask_function,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_yoco import YocoConfig
from .modeling_common import (
    CACHE_NAME,
    BatchMapCacheMixin,
    GatedMLP,
    HfYocoModelMixin,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    apply_rotary_pos_emb,
    attention_forward,
    cache_kwarg,
    cache_tensors,
    cache_update,
    causal_lm_head_and_loss,
    check_labels,
    check_model_inputs,
    find_packed_sequences,
    is_paged_cache,
    kernel_op,
    output_cache,
    pick_cache,
    storage_bytes,
    tensor_bytes,
)

# --------------------------------------------------------------------------------------------------------------------
# Gated retention (pure PyTorch). Layout follows flash-linear-attention: q/k/v `[B, T, H, D]`, log-decay `g` `[B, T, H]`,
# state `[B, H, K, V]`. Keys are expected pre-scaled by K**-0.5. With G_t = sum_{s<=t} g_s:
#     S_t = exp(g_t) * S_{t-1} + k_t^T v_t,      o_t = q_t S_t = sum_{s<=t} exp(G_t - G_s) (q_t . k_s) v_s
# All three forms compute in fp32 and return the output in v's dtype and the state in fp32.
# --------------------------------------------------------------------------------------------------------------------


def _decay_matrix(g_cum: torch.Tensor) -> torch.Tensor:
    """exp(G_i - G_j) for j <= i, 0 above the diagonal: `[..., T]` -> `[..., T, T]`."""
    length = g_cum.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=g_cum.device).tril()
    return (g_cum[..., :, None] - g_cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()


def parallel_gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Parallel form: `O = ((Q K^T) * D) V` with `D_ij = exp(G_i - G_j) [j <= i]`, plus the initial state's share."""
    dtype = v.dtype
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # [B, H, T, D]
    g_cum = g.transpose(1, 2).float().cumsum(-1)  # [B, H, T]
    out = ((q @ k.transpose(-1, -2)) * _decay_matrix(g_cum)) @ v  # [B, H, T, V]
    if initial_state is not None:
        out = out + (q * g_cum[..., None].exp()) @ initial_state.float()
    final_state = None
    if output_final_state:
        g_last = g_cum[..., -1:]  # [B, H, 1]
        final_state = (k * (g_last - g_cum)[..., None].exp()).transpose(-1, -2) @ v  # [B, H, K, V]
        if initial_state is not None:
            final_state = final_state + g_last[..., None].exp() * initial_state.float()
    return out.transpose(1, 2).to(dtype), final_state


def chunk_gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise form: parallel inside chunks of `chunk_size`, a recurrence over chunk states between them.

    The last partial chunk is zero-padded with k = v = 0 and g = 0, which leaves outputs and state unchanged.
    """
    dtype = v.dtype
    batch, length, heads, _ = q.shape
    pad = (-length) % chunk_size
    q, k, v = (F.pad(x.transpose(1, 2).float(), (0, 0, 0, pad)) for x in (q, k, v))  # [B, H, T', D]
    g = F.pad(g.transpose(1, 2).float(), (0, pad))  # [B, H, T']
    num_chunks = (length + pad) // chunk_size
    q, k, v = (x.reshape(batch, heads, num_chunks, chunk_size, -1) for x in (q, k, v))  # [B, H, N, C, D]
    g_cum = g.reshape(batch, heads, num_chunks, chunk_size).cumsum(-1)  # [B, H, N, C], within each chunk

    out = ((q @ k.transpose(-1, -2)) * _decay_matrix(g_cum)) @ v  # intra-chunk, [B, H, N, C, V]
    g_last = g_cum[..., -1]  # [B, H, N]
    chunk_kv = (k * (g_last[..., None] - g_cum).exp()[..., None]).transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = g_last.exp()[..., None, None]  # [B, H, N, 1, 1]

    state = q.new_zeros(batch, heads, q.shape[-1], v.shape[-1]) if initial_state is None else initial_state.float()
    states = []
    for n in range(num_chunks):
        states.append(state)  # state entering chunk n
        state = chunk_decay[:, :, n] * state + chunk_kv[:, :, n]
    out = out + (q * g_cum.exp()[..., None]) @ torch.stack(states, dim=2)  # inter-chunk
    out = out.reshape(batch, heads, num_chunks * chunk_size, -1)[:, :, :length]  # [B, H, T, V]
    return out.transpose(1, 2).to(dtype), state if output_final_state else None


def recurrent_gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent form, one token at a time (decode): `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`."""
    dtype = v.dtype
    batch, length, heads, key_dim = q.shape
    q, k, v, g = q.float(), k.float(), v.float(), g.float()
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(length):
        state = g[:, t, :, None, None].exp() * state + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outputs.append((q[:, t, :, None, :] @ state).squeeze(-2))  # [B, H, V]
    out = torch.stack(outputs, dim=1)  # [B, T, H, V]
    return out.to(dtype), state if output_final_state else None


def varlen_gated_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    cu_seqlens: torch.Tensor,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Packed sequences: q/k `[1, N, H, K]`, v `[1, N, H, V]`, g `[1, N, H]` holding the sequences delimited by
    `cu_seqlens` (`[S + 1]`), each from a zero state. Unpacks to a right-padded `[S, T_max, ...]` batch (padding
    k = v = 0, g = 0 leaves every state unchanged), runs the chunkwise form and packs the outputs back."""
    lengths = cu_seqlens.diff()  # [S]
    max_length = int(lengths.max())
    valid = torch.arange(max_length, device=q.device)[None, :] < lengths[:, None]  # [S, T_max]

    def unpack(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros(len(lengths), max_length, *x.shape[2:])
        padded[valid] = x[0]
        return padded

    out, _ = chunk_gated_retention(unpack(q), unpack(k), unpack(v), unpack(g), chunk_size)
    return out[valid][None]  # [1, N, H, V]


def packed_cu_seqlens(packed_sequences: torch.Tensor) -> torch.Tensor:
    """`cu_seqlens` (`[S + 1]`, start offsets and total over the flattened `B * T` tokens) of packed sequences given
    as a sequence index per token (`[B, T]`, from `find_packed_sequence_indices`)."""
    starts = F.pad(packed_sequences.diff(dim=-1) != 0, (1, 0), value=True)  # [B, T]; a sequence never spans two rows
    total = torch.tensor([starts.numel()], device=starts.device)
    return torch.cat([starts.flatten().nonzero().flatten(), total])


SLIDING_WINDOW_MIN_CHUNK = 512  # smallest self-decoder chunk used for block-sparse sliding-window prefill
AUTO_CHUNK = 2048  # self_decoder_chunk_size="auto": the chunk on CPU, and the unit of the GPU's memory-sized chunk

# --------------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------------


class YocoGlobalKVLayer(DynamicLayer):
    """The "store" layer holding the global K/V. Appends in place into a buffer with `growth` spare positions, so a
    decode step writes one row instead of copying the whole cache (`DynamicLayer` concatenates, O(N) per step).

    `keys` / `values` are views `[B, H_kv, N, D]` of the buffers; anything that replaces them (crop, reorder, batch
    ops, offloading) is adopted as the new buffer at the next update.
    """

    def __init__(self, growth: int = 256, **kwargs) -> None:
        super().__init__()
        self.growth = growth
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            # Autograd may have saved earlier views of the buffer: concatenate (no in-place writes) instead.
            self._key_buffer = self._value_buffer = None
            return super().update(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        if self._key_buffer is None or self.keys.numel() and self.keys.data_ptr() != self._key_buffer.data_ptr():
            # First update, or `keys` was replaced by a layer operation: adopt it (or start from nothing).
            self._key_buffer, self._value_buffer = (self.keys, self.values) if length else (None, None)
        needed = length + key_states.shape[-2]
        if self._key_buffer is None or needed > self._key_buffer.shape[-2]:
            shape = (*key_states.shape[:-2], needed + (self.growth if length else 0), key_states.shape[-1])
            key_buffer, value_buffer = key_states.new_empty(shape), value_states.new_empty(shape)
            if length:
                key_buffer[..., :length, :] = self.keys
                value_buffer[..., :length, :] = self.values
            self._key_buffer, self._value_buffer = key_buffer, value_buffer
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys, self.values = self._key_buffer[..., :needed, :], self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()

    def reserved_bytes(self) -> int:
        """Bytes allocated for the global K/V, spare positions included."""
        return tensor_bytes(self._key_buffer, self._value_buffer) if self._key_buffer is not None else 0


def advance_retention_state(
    state: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    """The retention state after `k`, `v`, `g` (`[B, T, H, K]`, `[B, T, H, V]`, `[B, T, H]`) from `state`
    (`[B, H, K, V]`, None = zeros), in fp32: `S_T = exp(G_T) S_0 + sum_s exp(G_T - G_s) k_s^T v_s`."""
    k, v, g = k.float().transpose(1, 2), v.float().transpose(1, 2), g.float().transpose(1, 2)  # [B, H, T, .]
    g_cum = g.cumsum(-1)  # [B, H, T]
    g_last = g_cum[..., -1:]  # [B, H, 1]
    advanced = (k * (g_last - g_cum).exp()[..., None]).transpose(-1, -2) @ v  # [B, H, K, V]
    if state is not None:
        advanced = advanced + g_last[..., None].exp() * state.float()
    return advanced


class YocoRetentionLayer(LinearAttentionLayer):
    """Cache layer of one gated-retention self-decoder layer: the recurrent state `[B, H, K, V]` (fp32), and, once
    `activate_past_recording()` was called (assisted / prompt-lookup decoding), what `crop` needs to roll it back.

    While recording it keeps the inputs (k, v, log-decay) of the last `rollback_tokens` tokens and the state before
    them (one state plus `rollback_tokens` tokens of inputs, however long the run: bounded memory). `crop(-n)`
    replays the kept inputs but the last `n` from that earlier state, which gives the state a prefill of the kept tokens
    reaches (the same sums, in another order).
    """

    rollback_tokens = 256

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rollback: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def activate_past_recording(self, **kwargs) -> None:
        """Start recording for `crop` (transformers >= 5.25 passes `recurrent_states_to_keep`, for its per-step state
        history; this layer keeps its own bounded `rollback` instead)."""
        self.record_past = True

    def update_recurrent_state(self, recurrent_states: torch.Tensor, state_idx: int = 0, **kwargs) -> torch.Tensor:
        """Store the state in place (static address, as transformers does), without transformers' per-step history:
        while recording, that would keep one `[B, H, K, V]` state per token until the next `crop`."""
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx].copy_(recurrent_states)
        return self.recurrent_states[state_idx]

    def record_update(
        self, state_before: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor
    ) -> None:
        """Remember the inputs of an update (called by the layer with the state it started from), if recording."""
        if not self.record_past:
            return
        k, v, g = k.detach(), v.detach(), g.detach()
        if self.rollback is not None:
            start, old_k, old_v, old_g = self.rollback
            k, v, g = torch.cat([old_k, k], 1), torch.cat([old_v, v], 1), torch.cat([old_g, g], 1)
        else:
            start = None if state_before is None else state_before.detach()
        overflow = k.shape[1] - self.rollback_tokens
        if overflow > 0:  # slide the window: the oldest tokens' contribution moves into its start state
            start = advance_retention_state(start, k[:, :overflow], v[:, :overflow], g[:, :overflow])
            k, v, g = k[:, overflow:], v[:, overflow:], g[:, overflow:]
        self.rollback = (start, k, v, g)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"`crop` takes a negative number of tokens to remove (or 0), got {tokens_to_remove}.")
        remove = -tokens_to_remove
        if remove == 0:
            return
        kept = 0 if self.rollback is None else self.rollback[1].shape[1]
        if not self.record_past or remove > kept:
            raise ValueError(
                f"cannot roll the gated-retention state back by {remove} token(s): "
                + ("call `cache.activate_past_recording()` before the tokens to undo are fed" if not self.record_past
                   else f"only the last {kept} token(s) are recorded (`YocoRetentionLayer.rollback_tokens`)")
            )  # fmt: skip
        start, k, v, g = self.rollback
        keep = kept - remove
        state = advance_retention_state(start, k[:, :keep], v[:, :keep], g[:, :keep]) if keep else start
        if state is None:
            state = torch.zeros_like(self.recurrent_states[0])
        self.recurrent_states[0] = state.to(self.recurrent_states[0].dtype)
        self.rollback = None if keep == 0 and start is None else (start, k[:, :keep], v[:, :keep], g[:, :keep])
        if isinstance(getattr(self, "cumulative_length_linear", None), torch.Tensor):  # transformers >= 5.25's count
            self.cumulative_length_linear.sub_(remove)

    def rollback_bytes(self) -> int:
        return 0 if self.rollback is None else tensor_bytes(*self.rollback)

    def _map_rollback(self, fn) -> None:
        """Apply a batch operation (`YocoCache` reorder / repeat / select) to the recorded tensors too."""
        if self.rollback is not None:
            self.rollback = tuple(None if t is None else fn(t) for t in self.rollback)

    def reset(self) -> None:
        super().reset()
        self.rollback = None


class YocoSlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer, compacted after a multi-token update (a prefill chunk): the W - 1 keys it
    keeps are then a view of the whole chunk's K/V, so the chunk (W - 1 + C rows) would stay allocated; a copy frees
    it. Decode steps keep transformers' behaviour (one spare row).

    With `sink_tokens` = S > 0 (`config.attention_sink_tokens`) it also keeps each row's attention sinks, its first S
    non-padding keys/values (`sink_keys` / `sink_values` `[B, H_kv, S, D]`, absolute positions `sink_positions`
    `[B, S]`, -1 = not seen yet), recorded by `update_sinks` and put before the window by `prepend_sinks` once the
    window no longer starts at position 0."""

    def __init__(self, sliding_window: int, sink_tokens: int = 0, **kwargs) -> None:
        super().__init__(sliding_window=sliding_window, **kwargs)
        self.sink_tokens = sink_tokens
        self.sink_keys = self.sink_values = self.sink_positions = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        if not self.record_past and key_states.shape[-2] > 1:
            self.keys, self.values = self.keys.clone(), self.values.clone()
        return out

    def update_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor, sink_flags: torch.Tensor) -> None:
        """Record the sinks among the next `update`'s tokens (call it first). `sink_flags` `[B, T]`: which of them are
        sinks (at most S per row over the whole sequence, in order)."""
        batch, heads, length, dim = key_states.shape
        sinks = self.sink_tokens
        if self.sink_positions is None:
            self.sink_keys = key_states.new_zeros(batch, heads, sinks, dim)
            self.sink_values = value_states.new_zeros(batch, heads, sinks, value_states.shape[-1])
            self.sink_positions = torch.full((batch, sinks), -1, dtype=torch.long, device=key_states.device)
        filled = (self.sink_positions >= 0).sum(-1, keepdim=True)  # [B, 1]
        rank = filled + sink_flags.long().cumsum(-1) - 1  # [B, T]: the sink slot of each flagged token
        slots = torch.where(sink_flags & (rank < sinks), rank, sinks)  # slot S: a scratch row, dropped below
        positions = torch.arange(length, device=key_states.device) + self.cumulative_length  # [T]
        index = slots[:, None, :, None]  # [B, 1, T, 1]

        def scatter(buffer: torch.Tensor, new: torch.Tensor) -> torch.Tensor:  # out of place: safe under autograd
            padded = torch.cat([buffer, buffer[..., :1, :]], dim=-2)  # [B, H, S + 1, D]
            return padded.scatter(-2, index.expand(-1, new.shape[1], -1, new.shape[-1]), new)[..., :sinks, :]

        self.sink_keys, self.sink_values = scatter(self.sink_keys, key_states), scatter(self.sink_values, value_states)
        padded = torch.cat([self.sink_positions, self.sink_positions[:, :1]], dim=-1)
        self.sink_positions = padded.scatter(-1, slots, positions.expand(batch, -1))[:, :sinks]

    def prepend_sinks(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[sinks | window]` keys and values, as the mask has them (`YocoModel._sink_window_mask`: the S sink
        columns first)."""
        return torch.cat([self.sink_keys, key_states], dim=-2), torch.cat([self.sink_values, value_states], dim=-2)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.sink_positions is not None:  # sinks at removed positions are forgotten (they come again)
            self.sink_positions = self.sink_positions.masked_fill(self.sink_positions >= self.cumulative_length, -1)

    def reset(self) -> None:
        super().reset()
        self.sink_keys = self.sink_values = self.sink_positions = None


class YocoCacheMixin(BatchMapCacheMixin):
    """What both YOCO caches share: the token count, and batch operations (beam reorder, repeat, select) with the
    recurrent states and rollback included (transformers' linear-attention layers have no batch operations)."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the cache holds. Every layer has seen the same tokens and the global K/V layer counts them, whatever
        the self-decoder: transformers >= 5.25 counts a linear-attention layer by its conv-state updates, which gated
        retention never makes, and would report 0."""
        return super().get_seq_length(self.global_kv_layer_idx)

    def _map_batch(self, fn) -> None:
        """Apply `fn` to the batch dimension of every tensor the layers hold (K/V, recurrent states, rollback)."""
        for layer in self.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                for i, initialized in layer.is_recurrent_states_initialized.items():
                    if initialized:
                        layer.recurrent_states[i] = fn(layer.recurrent_states[i])
                if isinstance(layer, YocoRetentionLayer):
                    layer._map_rollback(fn)
            elif isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.numel():
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)
                if getattr(layer, "sink_positions", None) is not None:
                    layer.sink_keys, layer.sink_values = fn(layer.sink_keys), fn(layer.sink_values)
                    layer.sink_positions = fn(layer.sink_positions)
                if isinstance(layer, YocoGlobalKVLayer):  # the views were replaced: the next update re-adopts them
                    layer._key_buffer = layer._value_buffer = None


class YocoCache(YocoCacheMixin, DynamicCache):
    """Cache of a YOCO model: one constant-size state per self-decoder layer plus **one** global K/V.

    Layers (built by transformers from `config.layer_types` / `config.kv_sharing_modes`):
    - self-decoder layers: `DynamicSlidingWindowLayer` (the last W-1 keys/values) for sliding-window attention,
      or `LinearAttentionLayer` (recurrent state `[B, H, K, V]`, fp32) for gated retention;
    - layer `S = num_self_decoder_layers` ("store"): `YocoGlobalKVLayer` (a `DynamicLayer` that appends in place)
      holding the global K/V `[B, H_kv, N, D]`;
    - layers `S+1 .. L-1` ("reuse"): `DummyLayer`, nothing stored.

    `generate()` creates it by itself; pass one as `cache` (or `past_key_values`) to reuse or inspect it
    (`memory_bytes()`).
    """

    def __init__(self, config: YocoConfig, offloading: bool = False, offload_only_non_sliding: bool = False) -> None:
        super().__init__(config=config, offloading=offloading, offload_only_non_sliding=offload_only_non_sliding)
        self.self_decoder_type = config.self_decoder_type
        self.num_self_decoder_layers = config.num_self_decoder_layers
        self.global_kv_layer_idx = self.num_self_decoder_layers
        self.layers[self.global_kv_layer_idx] = YocoGlobalKVLayer()
        for i in range(self.num_self_decoder_layers):
            if self.self_decoder_type == "gated_retention":
                self.layers[i] = YocoRetentionLayer()
            else:
                self.layers[i] = YocoSlidingWindowLayer(config.sliding_window, config.attention_sink_tokens)

    @property
    def global_key_values(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The shared global K/V, each `[B, H_kv, N, D]` (None before the first forward)."""
        layer = self.layers[self.global_kv_layer_idx]
        return layer.keys, layer.values

    def memory_bytes(self) -> dict[str, int]:
        """Logical bytes of the cache tensors: `self_decoder` (windows / recurrent states), `global_kv`, `rollback`
        (only while recording for assisted decoding), `total`; `global_kv_reserved`, the global K/V buffer actually
        allocated (spare positions for in-place appends); and `held`, the bytes of every storage the cache keeps
        alive (views of larger tensors, spare capacity and bookkeeping included): what the cache really costs."""
        return _memory_bytes(self)


class YocoRingWindowLayer(StaticLayer):
    """Static sliding-window layer for `torch.compile`: a ring buffer of W slots `[B, H_kv, W, D]`, position `p` in slot
    `p % W`, with the position each slot holds (`positions`, `[W]`, -1 = empty). A decode step writes one slot in
    place and attends over the W slots (the mask comes from `positions`: `YocoModel` builds it with
    `attention_key_positions`), so shapes, addresses and control flow never change; a multi-token update (prefill)
    attends over the ring plus the new keys, then keeps the last W of them. Key order differs from the dynamic
    layer's, so results agree up to float rounding. Not croppable: a slot, once overwritten, is gone."""

    is_sliding = True
    is_croppable = False

    def __init__(self, sliding_window: int, **kwargs) -> None:
        super().__init__(max_cache_len=sliding_window)
        self.sliding_window = sliding_window
        self.positions = torch.full((sliding_window,), -1, dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.positions = self.positions.to(key_states.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.positions)
        super().lazy_initialization(key_states, value_states)

    def _new_positions(self, length: int) -> torch.Tensor:
        return torch.arange(length, device=self.positions.device) + self.cumulative_length.to(self.positions.device)

    def attention_key_positions(self, query_length: int) -> torch.Tensor:
        """Absolute position of each key the next `update` of `query_length` tokens returns (`[W]` for one token,
        `[W + T]` for more), -1 for empty slots."""
        new = self._new_positions(query_length)
        if query_length == 1:
            slots = torch.arange(self.sliding_window, device=new.device)
            return torch.where(slots == new % self.sliding_window, new, self.positions)
        return torch.cat([self.positions, new])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = key_states.shape[-2]
        new = self._new_positions(length)
        kept = min(length, self.sliding_window)  # the last W new tokens stay in the ring
        slots = new[-kept:] % self.sliding_window
        returned = (self.keys, self.values)
        if length > 1:  # the ring as it was, then the new keys (copies: the ring is overwritten below)
            returned = (torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2))
        self.keys.index_copy_(2, slots, key_states[..., -kept:, :])
        self.values.index_copy_(2, slots, value_states[..., -kept:, :])
        self.positions.index_copy_(0, slots, new[-kept:])
        self.cumulative_length.add_(length)
        return returned

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sliding_window + (query_length if query_length > 1 else 0), 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "a static YOCO cache cannot be cropped (its sliding windows are ring buffers); use the dynamic YocoCache "
            "for assisted or prompt-lookup decoding"
        )

    def reset(self) -> None:
        super().reset()
        self.positions.fill_(-1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # positions are shared by every row


class YocoStaticCache(YocoCacheMixin, StaticCache):
    """Fixed-capacity cache of a YOCO model for `torch.compile` / CUDA graphs (`generate(...,
    cache_implementation="static")` builds it): the global K/V preallocated for `max_cache_len` positions
    (transformers' `StaticLayer`), sliding windows as ring buffers (`YocoRingWindowLayer`), retention states updated
    in place (`LinearAttentionLayer`); the reuse layers store nothing. Every decode step then has the same shapes
    and tensor addresses, so the compiled step is replayed as one graph."""

    def __init__(self, config: YocoConfig, max_cache_len: int, offloading: bool = False, **kwargs) -> None:
        if config.attention_sink_tokens:
            raise ValueError(
                "the static YOCO cache does not keep attention sinks (`attention_sink_tokens` = "
                f"{config.attention_sink_tokens}); use the dynamic YocoCache (the default of generate())"
            )
        super().__init__(config=config, max_cache_len=max_cache_len, offloading=offloading, **kwargs)
        self.max_cache_len = max_cache_len
        self.num_self_decoder_layers = config.num_self_decoder_layers
        self.global_kv_layer_idx = self.num_self_decoder_layers
        if config.self_decoder_type == "sliding_window":
            for i in range(self.num_self_decoder_layers):
                self.layers[i] = YocoRingWindowLayer(config.sliding_window)

    @property
    def global_key_values(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The global K/V buffers `[B, H_kv, max_cache_len, D]` (positions past `get_seq_length()` are unused)."""
        layer = self.layers[self.global_kv_layer_idx]
        return (layer.keys, layer.values) if layer.is_initialized else (None, None)

    def memory_bytes(self) -> dict[str, int]:
        """As `YocoCache.memory_bytes`; `global_kv` counts the filled positions, `global_kv_reserved` the whole
        preallocated buffer."""
        return _memory_bytes(self)


def yoco_cache_bytes(config: YocoConfig, tokens: int, batch: int = 1, kv_bytes: int = 4) -> dict[str, int]:
    """Bytes a `YocoCache` holds after `tokens` tokens of `batch` sequences: `global_kv` (one K/V for all tokens),
    `self_decoder` (per layer: the last W-1 keys/values and the S attention sinks, or the fp32 retention state) and
    `total`. `kv_bytes`: bytes per K/V element (4 for fp32, 2 for bf16)."""
    row = 2 * config.num_key_value_heads * config.head_dim * kv_bytes  # keys + values of one token in one layer
    layers = config.num_self_decoder_layers
    if config.self_decoder_type == "sliding_window":
        rows = min(tokens, config.sliding_window - 1) + (config.attention_sink_tokens if tokens else 0)
        self_decoder = layers * rows * row
    else:
        heads = config.num_retention_heads or config.num_attention_heads
        self_decoder = layers * heads * config.retention_head_dim**2 * 4 if tokens else 0
    global_kv = tokens * row
    return {"global_kv": batch * global_kv, "self_decoder": batch * self_decoder,
            "total": batch * (global_kv + self_decoder)}  # fmt: skip


def _static_capacity(cache: Cache | None, config: YocoConfig) -> int | None:
    """Positions a static cache's global K/V can hold (None for a dynamic cache)."""
    if cache is None or len(cache.layers) <= config.num_self_decoder_layers:
        return None
    store = cache.layers[config.num_self_decoder_layers]  # the "store" layer of a cache built from `config`
    return store.max_cache_len if isinstance(store, StaticLayer) else None


def _memory_bytes(cache: YocoCache | YocoStaticCache) -> dict[str, int]:
    self_decoder = 0
    for layer in cache.layers[: cache.num_self_decoder_layers]:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            self_decoder += tensor_bytes(*layer.recurrent_states.values(), *layer.conv_states.values())
        elif getattr(layer, "is_initialized", False):
            self_decoder += tensor_bytes(layer.keys, layer.values)
            if getattr(layer, "sink_positions", None) is not None:
                self_decoder += tensor_bytes(layer.sink_keys, layer.sink_values)
    layer = cache.layers[cache.global_kv_layer_idx]
    keys, values = cache.global_key_values
    if isinstance(layer, StaticLayer):  # preallocated: the filled positions are what the cache logically holds
        filled = int(layer.cumulative_length) if layer.is_initialized else 0
        reserved = tensor_bytes(keys, values)
        global_kv = tensor_bytes(keys[..., :filled, :], values[..., :filled, :]) if keys is not None else 0
    else:
        global_kv = tensor_bytes(keys, values)
        reserved = layer.reserved_bytes() if isinstance(layer, YocoGlobalKVLayer) else global_kv
    rollback = sum(layer.rollback_bytes() for layer in cache.layers if isinstance(layer, YocoRetentionLayer))
    return {
        "self_decoder": self_decoder,
        "global_kv": global_kv,
        "rollback": rollback,  # what `crop` needs while recording (assisted decoding), else 0
        "total": self_decoder + global_kv + rollback,
        "global_kv_reserved": max(reserved, global_kv),  # allocated: spare positions / the static buffer included
        "held": storage_bytes(*cache_tensors(cache)),
    }


def _get_recurrent_state(cache: Cache | None, layer_idx: int) -> torch.Tensor | None:
    """The retention state of `layer_idx` in any transformers cache built from a YocoConfig (None if empty)."""
    if cache is None:
        return None
    layer = cache.layers[layer_idx]
    return layer.recurrent_states[0] if layer.is_recurrent_states_initialized[0] else None


def _set_recurrent_state(cache: Cache, layer_idx: int, state: torch.Tensor, tokens: int) -> None:
    """Store the retention state of `layer_idx` after `tokens` more tokens. transformers copies it in place (static
    addresses for CUDA graphs); under autograd that would overwrite a tensor the backward still needs, so a state with
    grad replaces the old one. transformers >= 5.25 counts a linear-attention layer's tokens in
    `cumulative_length_linear` (read by `get_seq_length()` of caches whose first layer is one, e.g. a plain
    `DynamicCache(config=...)`), advanced only by conv-state updates, which retention has none of: advance it here."""
    layer = cache.layers[layer_idx]
    if state.requires_grad and layer.is_recurrent_states_initialized[0]:
        layer.recurrent_states[0] = state
    else:
        cache.update_recurrent_state(state, layer_idx)
    if isinstance(getattr(layer, "cumulative_length_linear", None), torch.Tensor):
        layer.cumulative_length_linear.add_(tokens)


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


class YocoScaledEmbedding(nn.Embedding):
    """Token embedding, multiplied by `embed_scale` (sqrt(hidden_size) with official numerics, else 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = super().forward(input_ids)
        return embeds if self.embed_scale == 1.0 else embeds * self.embed_scale


class YocoSlidingWindowAttention(nn.Module):
    """Self-decoder mixer: causal GQA attention over the last `sliding_window` keys (current token included), plus the
    sequence's first `attention_sink_tokens` keys (attention sinks) when configured."""

    def __init__(self, config: YocoConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = config.sliding_window
        self.sink_tokens = config.attention_sink_tokens
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        sink_flags: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`sink_flags` (`[B, T]` bool, with attention sinks and a cache): which of the tokens are sinks."""
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # [B, H, T, D]
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # [B, H_kv, T, D]
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin, self.config.official_numerics)
        if cache is not None:  # cached last W-1 keys + the new ones
            window_started = False
            if self.sink_tokens:  # a YocoCache (the model refuses others with sinks; the paged cache has no layers)
                layer = cache.layers[self.layer_idx]
                window_started = layer.get_mask_sizes(length)[1] > 0  # the sinks may have left the window
                layer.update_sinks(key, value, sink_flags)
            key, value = cache_update(cache, key, value, self.layer_idx, kwargs)
            if window_started:  # [B, H_kv, S + K, D]: the sinks, then the window (the mask has S columns first)
                key, value = layer.prepend_sinks(key, value)
        attn_output, attn_weights = attention_forward(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            sliding_window=self.sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, length, -1).contiguous()  # [B, T, H * D]
        return self.o_proj(attn_output), attn_weights


class YocoGatedRetention(nn.Module):
    """Self-decoder mixer: gated retention (gRet).

    `log(gamma) = logsigmoid(x W_gamma) / gate_logit_normalizer` per head and token; keys scaled by d**-0.5;
    `o = retention(q, k, v, log gamma)`, per-head RMSNorm without weight, then `o_proj(silu(g_proj(x)) * o)`.
    Padded positions get k = v = 0 **and** no decay, so left padding never reaches the state.
    """

    def __init__(self, config: YocoConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_retention_heads or config.num_attention_heads
        self.head_dim = config.retention_head_dim
        self.chunk_size = config.retention_chunk_size
        self.gate_logit_normalizer = config.gate_logit_normalizer
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.g_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.gt_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, elementwise_affine=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """`cu_seqlens` (`[S + 1]`, packed sequences over the flattened `B * T` tokens): each sequence starts from a
        zero state (no cache)."""
        if is_paged_cache(cache):
            return self._paged_forward(hidden_states, position_embeddings, cache, kwargs), None
        batch, length, _ = hidden_states.shape
        query, key, value, log_decay = self._project(hidden_states, position_embeddings, attention_mask)

        state = _get_recurrent_state(cache, self.layer_idx)
        want_state = cache is not None
        if cu_seqlens is not None:  # packed sequences, each from a zero state: [1, B * T, ...]
            query, key, value, log_decay = (
                x.reshape(1, batch * length, *x.shape[2:]) for x in (query, key, value, log_decay)
            )
        state_before = state
        out, state = self._retention(query, key, value, log_decay, state, want_state, cu_seqlens)
        if want_state:
            if isinstance(cache.layers[self.layer_idx], YocoRetentionLayer):  # assisted decoding may roll it back
                cache.layers[self.layer_idx].record_update(state_before, key, value, log_decay)
            _set_recurrent_state(cache, self.layer_idx, state, length)
        return self._output(hidden_states, out.view(batch, length, self.num_heads, -1)), None

    def _project(self, hidden_states, position_embeddings, attention_mask=None):
        """q, k (RoPE, scaled by d**-0.5), v `[B, T, H, D]` and the log-decay `[B, T, H]` (fp32); a 2D padding mask
        zeroes k, v and the decay of padded positions."""
        shape = (*hidden_states.shape[:2], self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)  # [B, T, H, D]
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin, self.config.official_numerics, unsqueeze_dim=2)
        key = key * self.head_dim**-0.5
        log_decay = F.logsigmoid(self.gt_proj(hidden_states).float()) / self.gate_logit_normalizer  # [B, T, H]
        if attention_mask is not None:  # 2D padding mask [B, T]: no input and no decay on padded positions
            keep = attention_mask.to(log_decay.dtype)[..., None]  # [B, T, 1]
            key, value = key * keep[..., None].to(key.dtype), value * keep[..., None].to(value.dtype)
            log_decay = log_decay * keep
        return query, key, value, log_decay

    def _output(self, hidden_states: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Per-head norm of the retention output `[B, T, H, D]`, the output gate and `o_proj` -> `[B, T, d]`."""
        out = self.norm(out).reshape(*hidden_states.shape[:2], -1)  # [B, T, H * D]
        out = F.silu(self.g_proj(hidden_states)) * out
        return self.o_proj(out)

    def _paged_forward(self, hidden_states, position_embeddings, cache, engine_kwargs: dict) -> torch.Tensor:
        """Continuous batching: the new tokens of every request packed in one row `[1, N, d]`. Each request goes on
        from its own state, kept in a slot of the engine's paged cache (`hf_yoco.continuous_batching`'s
        `RetentionStateAllocator`; its slot is the request's write index, a fresh request starts from zeros).
        Requests are unpacked to `[R, T_max]` rows right-padded with zero k / v and zero decay (the state passes
        padding unchanged), run through `_retention` together, and packed back."""
        allocator = cache.layer_to_allocator[self.layer_idx]
        cu_q = engine_kwargs["cu_seq_lens_q"].long()
        lengths = cu_q.diff()  # [R'] (engine padding adds requests of length 0)
        seen = engine_kwargs["cu_seq_lens_k"][allocator.layer_type].long().diff()  # past + new tokens
        real = lengths > 0
        starts, lengths, seen = cu_q[:-1][real], lengths[real], seen[real]
        slots = engine_kwargs["write_index"][allocator.index][starts]  # [R]
        states = allocator.states(self.layer_idx)  # [slots, H, K, V] fp32, a view of the paged cache
        fresh = (seen == lengths)[:, None, None, None]
        state = torch.where(fresh, 0.0, states[slots])

        query, key, value, log_decay = self._project(hidden_states, position_embeddings)  # [1, N, ...]
        total, max_length = int(lengths.sum()), int(lengths.max())
        valid = torch.arange(max_length, device=lengths.device)[None] < lengths[:, None]  # [R, T_max]

        def unpack(x: torch.Tensor) -> torch.Tensor:  # [1, N, ...] -> [R, T_max, ...]
            rows = x.new_zeros(len(lengths), max_length, *x.shape[2:])
            rows[valid] = x[0, :total]
            return rows

        out, state = self._retention(*(unpack(x) for x in (query, key, value, log_decay)), state, True, None)
        states[slots] = state.to(states.dtype)
        packed = out.new_zeros(1, hidden_states.shape[1], *out.shape[2:])  # [1, N, H, D]
        packed[0, :total] = out[valid]
        return self._output(hidden_states, packed)

    def _retention(self, query, key, value, log_decay, state, want_state, cu_seqlens):
        """Triton when `kernel_backend` selects it and the kernel covers the call, else the PyTorch form that fits
        the length: recurrent (decode), parallel (up to one chunk), chunkwise, or varlen (packed)."""
        triton_retention = kernel_op(self.config, query, "gated_retention")
        if triton_retention is not None:
            result = triton_retention(query, key, value, log_decay, state, want_state, cu_seqlens)
            if result is not None:
                return result
        if cu_seqlens is not None:
            return varlen_gated_retention(query, key, value, log_decay, cu_seqlens, self.chunk_size), None
        if query.shape[1] == 1:
            return recurrent_gated_retention(query, key, value, log_decay, state, want_state)
        if query.shape[1] <= self.chunk_size:
            return parallel_gated_retention(query, key, value, log_decay, state, want_state)
        return chunk_gated_retention(query, key, value, log_decay, self.chunk_size, state, want_state)


class YocoGlobalKV(nn.Module):
    """Builds the single global K/V from the self-decoder output: RMSNorm -> k_proj / v_proj -> RoPE(K)."""

    def __init__(self, config: YocoConfig) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
        layer_idx: int = 0,
        engine_kwargs: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`engine_kwargs`: continuous batching's arguments, rewritten in place by the paged cache for the
        cross-decoder's attention calls."""
        batch, length, _ = hidden_states.shape
        hidden_states = self.norm(hidden_states)
        shape = (batch, length, -1, self.head_dim)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # [B, H_kv, T, D]
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        key = apply_rotary(key, cos, sin, self.config.official_numerics)  # RoPE once, before caching
        if cache is not None:
            key, value = cache_update(cache, key, value, layer_idx, engine_kwargs or {})  # -> all N positions so far
        return key, value


class YocoCrossAttention(nn.Module):
    """Cross-decoder mixer: per-layer queries attending causally to the shared global K/V (GQA)."""

    def __init__(self, config: YocoConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        global_key_values: tuple[torch.Tensor, torch.Tensor],
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        cos, sin = position_embeddings
        query = apply_rotary(query, cos, sin, self.config.official_numerics)
        key, value = global_key_values
        attn_output, attn_weights = attention_forward(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, length, -1).contiguous()  # [B, T, H * D]
        return self.o_proj(attn_output), attn_weights


class YocoDecoderLayer(GradientCheckpointingLayer):
    """Pre-RMSNorm block; the mixer is `self_attn` (self-decoder half) or `cross_attn` (cross-decoder half)."""

    def __init__(self, config: YocoConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_cross_layer = layer_idx >= config.num_self_decoder_layers
        if self.is_cross_layer:
            self.cross_attn = YocoCrossAttention(config, layer_idx)
        elif config.self_decoder_type == "sliding_window":
            self.self_attn = YocoSlidingWindowAttention(config, layer_idx)
        else:
            self.self_attn = YocoGatedRetention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        global_key_values: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The model passes the cache as `cache_kwarg(cache)`, the name under which the installed transformers'
        `GradientCheckpointingLayer` drops it under gradient checkpointing; both names are accepted."""
        cache = pick_cache(cache, past_key_values)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.is_cross_layer:
            hidden_states, _ = self.cross_attn(
                hidden_states, global_key_values, position_embeddings, attention_mask, **kwargs
            )
        else:
            hidden_states, _ = self.self_attn(
                hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs
            )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class YocoPreTrainedModel(HfYocoModelMixin, PreTrainedModel):
    config_class = YocoConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["YocoDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _can_compile_fullgraph = True  # with YocoStaticCache (generate's cache_implementation="static")
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": YocoDecoderLayer,
        "attentions": [
            OutputRecorder(YocoSlidingWindowAttention, index=1),
            OutputRecorder(YocoCrossAttention, index=1),
        ],
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        from transformers import initialization as init

        if isinstance(module, RotaryEmbedding):
            inv_freq = module.reset_inv_freq()
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        else:
            super()._init_weights(module)


class YocoModel(YocoPreTrainedModel):
    """The YOCO decoder-decoder backbone (embeddings, self-decoder, global K/V, cross-decoder, final norm)."""

    def __init__(self, config: YocoConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.num_self_decoder_layers = config.num_self_decoder_layers
        embed_scale = math.sqrt(config.hidden_size) if config.official_numerics else 1.0
        self.embed_tokens = YocoScaledEmbedding(config.vocab_size, config.hidden_size, self.padding_idx, embed_scale)
        self.layers = nn.ModuleList([YocoDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.global_kv = YocoGlobalKV(config)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        rope_style = "yoco" if config.official_numerics else "default"
        interleaved = config.official_numerics
        # RoPE for the cross-decoder, the global K and sliding-window attention (head_dim) ...
        self.rotary_emb = RotaryEmbedding(config, config.head_dim, interleaved=interleaved, style=rope_style)
        # ... and for gated retention, whose head size is hidden_size // num_retention_heads.
        self.retention_rotary_emb = None
        if config.self_decoder_type == "gated_retention":
            self.retention_rotary_emb = RotaryEmbedding(
                config, config.retention_head_dim, interleaved=interleaved, style=rope_style
            )
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _packed_sequences(
        self,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        batch_size: int,
    ) -> torch.Tensor | None:
        """Sequence index per token `[B, T]` when the inputs are packed sequences (`find_packed_sequences`), else
        None; refuses packed inputs with a cache or an attention implementation without block-diagonal masks."""
        packed = find_packed_sequences(position_ids, attention_mask, batch_size)
        if packed is None:
            return None
        if cache is not None:
            raise ValueError(
                "Packed sequences (`position_ids` restarting inside a row) cannot be combined with a cache: "
                "each packed sequence would need its own cache. Pass `attention_mask` (padding) for cached inference."
            )
        if self.config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                "Packed sequences need `attn_implementation` 'sdpa' or 'eager' (block-diagonal masks), got "
                f"{self.config._attn_implementation!r}."
            )
        return packed

    def _prefill_chunk_size(self, reference: torch.Tensor, length: int) -> int | None:
        """Self-decoder tokens per prefill chunk (`config.self_decoder_chunk_size`, "auto" resolved for the device)."""
        chunk = self.config.self_decoder_chunk_size
        if chunk is None:
            return None
        if chunk == "auto":
            chunk = AUTO_CHUNK
            if reference.is_cuda and length > chunk:  # the biggest multiple of 2048 whose activations fit 1/4 free
                free_bytes, _ = torch.cuda.mem_get_info(reference.device)
                per_token = reference.shape[0] * self.config.intermediate_size * 4 * self.dtype.itemsize
                chunk = max(AUTO_CHUNK, free_bytes // 4 // per_token // AUTO_CHUNK * AUTO_CHUNK)
        if (
            self.config.self_decoder_type == "sliding_window"
            and kernel_op(self.config, reference, "attention") is None
        ):
            # Block-sparse window attention on the PyTorch path: a chunk of C queries only meets C + W - 1 keys, so
            # chunks of about one window skip the (T x T) dense mask and compute; the floor keeps per-chunk
            # overhead small for tiny W.
            chunk = min(chunk, max(self.config.sliding_window, SLIDING_WINDOW_MIN_CHUNK))
        return chunk

    def _check_cache(self, cache: Cache, batch_size: int) -> None:
        """The cache must have this config's layout (a `YocoCache(config=model.config)`, or a transformers cache built
        from this config) and, once filled, the batch size of the inputs."""
        if not isinstance(cache, Cache):
            raise ValueError(f"`cache` must be a YocoCache, got {type(cache).__name__}")
        half = self.num_self_decoder_layers
        if self.config.self_decoder_type == "gated_retention":
            self_layers_fit = all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in cache.layers[:half])
        elif self.config.attention_sink_tokens:
            self_layers_fit = all(
                getattr(layer, "sink_tokens", None) == self.config.attention_sink_tokens
                for layer in cache.layers[:half]
            )
        else:
            self_layers_fit = all(getattr(layer, "is_sliding", False) for layer in cache.layers[:half])
        if len(cache.layers) != self.config.num_hidden_layers or not self_layers_fit:
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            raise ValueError(
                f"`cache` was built for another model ({len(cache.layers)} layers: {kinds}); this YOCO model "
                f"({self.config.num_hidden_layers} layers, {self.config.self_decoder_type}) needs "
                "YocoCache(config=model.config)"
            )
        store = cache.layers[half]
        keys = store.keys if getattr(store, "is_initialized", False) else None  # shapes only: no host sync
        if keys is not None and keys.numel() and keys.shape[0] != batch_size:
            raise ValueError(
                f"`cache` holds {keys.shape[0]} sequences but the inputs have {batch_size} (use "
                "`cache.batch_repeat_interleave` / `batch_select_indices` to change its batch)"
            )

    def _self_decoder_mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        position_ids: torch.Tensor,
        cache_positions: torch.Tensor,
        sink_flags: torch.Tensor | None = None,
        packed_sequences: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """4D sliding-window mask (SWA) or the 2D padding mask of the current tokens (gated retention).
        `cache_positions` (`[T]`): the absolute index of each current token (its column in `attention_mask`);
        `sink_flags` (`[B, N]`, with attention sinks): which of the positions up to the current ones are sinks;
        `packed_sequences`: the sequence index per token of packed inputs."""
        if self.config.self_decoder_type == "sliding_window":
            ring = cache.layers[0] if cache is not None else None
            if isinstance(ring, YocoRingWindowLayer):
                return self._ring_window_mask(inputs_embeds, attention_mask, ring, cache_positions)
            if self.config.attention_sink_tokens:
                return self._sink_window_mask(
                    inputs_embeds, attention_mask, cache, sink_flags, cache_positions, packed_sequences
                )
            return create_sliding_window_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                **cache_kwarg(cache),
            )
        # 2D padding mask of the current tokens. (Not `create_recurrent_attention_mask`: it drops the mask for
        # single-token inputs, but a 1-token prefill chunk can be padding.) An all-ones mask is kept rather than
        # tested (`.all()` would be a host sync every step; generate passes None for unpadded batches anyway).
        if attention_mask is None or attention_mask.ndim != 2:
            return None
        return attention_mask.index_select(1, cache_positions)

    def _sink_flags(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        packed_sequences: torch.Tensor | None,
        batch_size: int,
        total_length: int,
        device: torch.device,
    ) -> torch.Tensor:
        """`[B, total_length]` bool: the attention sinks among the absolute positions 0..total_length-1, i.e. the first
        `attention_sink_tokens` non-padding tokens of each row (of each packed sequence)."""
        sinks = self.config.attention_sink_tokens
        if attention_mask is not None and attention_mask.ndim == 2:
            valid = attention_mask[:, :total_length].to(device=device, dtype=torch.bool)
            return valid & (valid.cumsum(-1) <= sinks)
        if packed_sequences is not None:  # no cache: the positions are the keys'
            return (position_ids < sinks).expand(batch_size, -1)
        return (torch.arange(total_length, device=device) < sinks).expand(batch_size, -1)

    def _sink_window_mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        sink_flags: torch.Tensor,
        cache_positions: torch.Tensor,
        packed_sequences: torch.Tensor | None,
    ) -> torch.Tensor:
        """Sliding-window mask with attention sinks: the query at absolute position q sees key p when `p <= q` and
        (`q - W < p` or p is a sink), and p is not padding. Once the cached window no longer starts at position 0,
        the S sink columns come first (the layers put the cached sinks before the window: `prepend_sinks`), each
        visible when its sink has left the window."""
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                "`attention_sink_tokens` needs a 2D (padding) `attention_mask`; a custom 4D mask was given"
            )
        batch, length = inputs_embeds.shape[:2]
        kv_length, kv_offset = cache.get_mask_sizes(length, 0) if cache is not None else (length, 0)
        window = self.config.sliding_window

        def visible(batch_idx, head_idx, q_idx, kv_idx):
            in_window = (q_idx - kv_idx < window) | sink_flags[batch_idx, kv_idx]
            return (kv_idx <= q_idx) & in_window

        if packed_sequences is not None:
            visible = and_masks(visible, packed_sequence_mask_function(packed_sequences))
        padding = None if attention_mask is None else attention_mask.to(torch.bool)
        mask = self._explicit_mask(
            inputs_embeds, visible, cache_positions[0], kv_length, kv_offset, padding,
            needs="`attention_sink_tokens`",
        )  # fmt: skip  # [B, 1, T, K]
        if kv_offset == 0:
            return mask
        positions = cache.layers[0].sink_positions  # [B, S], before this forward (its new sinks are in the window)
        if positions is None:
            positions = torch.full((batch, self.config.attention_sink_tokens), -1, device=mask.device)
        sink_visible = ((positions >= 0) & (positions < kv_offset))[:, None, None, :]  # [B, 1, 1, S]
        sink_visible = sink_visible.expand(mask.shape[0], 1, mask.shape[2], -1)
        if mask.dtype != torch.bool:  # eager: additive float mask
            sink_visible = torch.zeros_like(sink_visible, dtype=mask.dtype).masked_fill(
                ~sink_visible, torch.finfo(mask.dtype).min
            )
        return torch.cat([sink_visible, mask], dim=-1)  # [B, 1, T, S + K]

    def _ring_window_mask(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        ring: YocoRingWindowLayer,
        cache_positions: torch.Tensor,
    ) -> torch.Tensor | None:
        """Sliding-window mask over a static cache's ring buffer: key j (at absolute position `p_j`, -1 = empty) is
        visible to the query at position q when `q - W < p_j <= q` and `p_j` is not padding."""
        key_positions = ring.attention_key_positions(inputs_embeds.shape[1])  # [K]
        window = self.config.sliding_window
        padding = None if attention_mask is None else attention_mask.to(device=key_positions.device, dtype=torch.bool)

        def visible(batch_idx, head_idx, q_idx, kv_idx):
            position = key_positions[kv_idx]
            allowed = (position >= 0) & (position <= q_idx) & (position > q_idx - window)
            if padding is not None:
                allowed = allowed & padding[batch_idx, position.clamp(min=0)]
            return allowed

        return self._explicit_mask(
            inputs_embeds, visible, cache_positions[0], key_positions.shape[0], 0, None,
            needs="a static cache with sliding-window attention (a ring buffer)",
        )  # fmt: skip

    def _explicit_mask(
        self,
        inputs_embeds: torch.Tensor,
        mask_function,
        q_offset: int | torch.Tensor,
        kv_length: int,
        kv_offset: int,
        padding: torch.Tensor | None,
        needs: str,
    ) -> torch.Tensor:
        """A 4D self-decoder mask from `mask_function` (absolute positions) through transformers' sdpa / eager mask
        interface, never skipped for `is_causal`; other attention implementations are refused, naming `needs`."""
        implementation = self.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"{needs} needs attn_implementation 'sdpa' or 'eager' (an explicit mask; hf_yoco's Triton kernels run "
                f"on the 'sdpa' path), got {implementation!r}"
            )
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=inputs_embeds.shape[0],
            q_length=inputs_embeds.shape[1],
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=padding,
            allow_is_causal_skip=False,
            dtype=inputs_embeds.dtype,
            config=self.config,
            use_vmap=False,
            device=inputs_embeds.device,
        )

    def _cross_attention_mask(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        q_offset: int,
        kv_length: int,
        kv_offset: int,
        cache: Cache | None,
        packed_sequences: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Causal mask of the kept query rows (absolute positions `q_offset..`) over the global K/V, with padding;
        with `packed_sequences` (`[B, T]` sequence index per token), block-diagonal per sequence."""
        if attention_mask is not None and attention_mask.ndim == 4:  # a custom 4D mask: keep its last rows
            return attention_mask[:, :, -hidden_states.shape[1] :, :]
        implementation = self.config._attn_implementation
        if implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            return None
        if attention_mask is not None:
            attention_mask = attention_mask.to(device=hidden_states.device, dtype=torch.bool)
        q_length = hidden_states.shape[1]
        mask_function = causal_mask_function
        if packed_sequences is not None:
            mask_function = and_masks(causal_mask_function, packed_sequence_mask_function(packed_sequences))
        return ALL_MASK_ATTENTION_FUNCTIONS[implementation](
            batch_size=hidden_states.shape[0],
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=packed_sequences is None
            and not (getattr(cache, "is_compileable", False) and q_length == 1),
            dtype=hidden_states.dtype,
            config=self.config,
            use_vmap=False,
            device=hidden_states.device,
        )

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        cache (`YocoCache` or any transformers `Cache` built from this config, *optional*):
            The cache to continue from and update; `past_key_values` is accepted as its older name (`cache` wins
            if both are given). Returned under the name the installed transformers uses (`cache` from 5.24 on).
        logits_to_keep (`int`, defaults to 0):
            If > 0, the cross-decoder runs only on the last `logits_to_keep` positions (prefill early exit) and the
            returned `last_hidden_state` has that length. 0 runs it on every position. Ignored (all positions) when
            hidden states or attentions are requested.

        Packed (padding-free) sequences, as from `DataCollatorWithFlattening`: `position_ids` that restart inside a row,
        with no `attention_mask` and no cache. Each sequence then sees only itself (window, retention
        state and cross-attention all restart) and no cache is returned.
        """
        cache = pick_cache(cache, past_key_values)
        if is_paged_cache(cache):
            return self._paged_forward(input_ids, inputs_embeds, position_ids, attention_mask, cache, logits_to_keep,
                                       kwargs)  # fmt: skip
        if cache is not None:
            self._check_cache(cache, (input_ids if inputs_embeds is None else inputs_embeds).shape[0])
        # Counted by the global K/V layer of any cache built from this config (the first layer may be linear).
        past_seen = cache.get_seq_length(self.config.num_self_decoder_layers) if cache is not None else 0
        if isinstance(past_seen, torch.Tensor):  # a static cache's live counter (moves as the layers update)
            past_seen = past_seen.clone()
        check_model_inputs(
            self.config, input_ids, inputs_embeds, attention_mask, position_ids, past_seen,
            static_length=_static_capacity(cache, self.config),
        )  # fmt: skip
        batch_size = (input_ids if inputs_embeds is None else inputs_embeds).shape[0]
        packed_sequences = self._packed_sequences(position_ids, attention_mask, cache, batch_size)
        if packed_sequences is not None:
            use_cache = False
        if use_cache and cache is None:
            cache = YocoCache(config=self.config)
        returned_cache = cache
        reference = input_ids if inputs_embeds is None else inputs_embeds
        length, device = reference.shape[1], reference.device
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + past_seen).unsqueeze(0)

        outputs_requested = any(
            kwargs.get(f"output_{name}", getattr(self.config, f"output_{name}", False))
            for name in ("hidden_states", "attentions")
        )
        keep = length if outputs_requested or logits_to_keep <= 0 else min(logits_to_keep, length)
        chunk = self._prefill_chunk_size(reference, length)
        chunked = (
            chunk is not None
            and length > chunk
            and not self.training
            and not outputs_requested
            and packed_sequences is None
            and (attention_mask is None or attention_mask.ndim == 2)
        )
        if chunked and cache is None:  # carries the self-decoder state between chunks; not returned
            cache = YocoCache(config=self.config)

        # Global K/V sizes, read before this forward updates the "store" layer.
        store_idx = self.num_self_decoder_layers
        if cache is not None:
            kv_length, kv_offset = cache.get_mask_sizes(length, store_idx)
            q_offset = cache.get_query_offset(store_idx)
            if isinstance(q_offset, torch.Tensor):  # a static layer's live counter: the global K/V update moves it
                q_offset = q_offset.clone()
        else:
            kv_length, kv_offset, q_offset = length, 0, 0

        # Self-decoder + global K/V, in chunks of at most `self_decoder_chunk_size` tokens at inference.
        self_rotary = self.retention_rotary_emb or self.rotary_emb
        self_kwargs = dict(kwargs)
        if packed_sequences is not None and self.config.self_decoder_type == "gated_retention":
            # Retention restarts its state at each packed sequence (the sliding-window mask is block-diagonal).
            self_kwargs["cu_seqlens"] = packed_cu_seqlens(packed_sequences)
        kept_states = []
        for start in range(0, length, chunk if chunked else length):
            end = min(start + chunk, length) if chunked else length
            # Embeddings too are computed chunk by chunk, so a long prompt never holds [B, T, d] at once.
            hidden_states = (
                self.embed_tokens(input_ids[:, start:end]) if inputs_embeds is None else inputs_embeds[:, start:end]
            )
            chunk_position_ids = position_ids[:, start:end]
            chunk_mask = attention_mask
            if chunked and attention_mask is not None:
                chunk_mask = attention_mask[:, : past_seen + end]
            chunk_cache_positions = torch.arange(start, end, device=device) + past_seen  # [T_chunk]
            sink_flags = None
            if self.config.attention_sink_tokens:
                sink_flags = self._sink_flags(
                    chunk_mask, chunk_position_ids, packed_sequences, batch_size, past_seen + end, device
                )  # [B, past + end]
                if cache is not None:
                    self_kwargs["sink_flags"] = sink_flags[:, past_seen + start :]
            self_mask = self._self_decoder_mask(
                hidden_states, chunk_mask, cache, chunk_position_ids, chunk_cache_positions, sink_flags,
                packed_sequences,
            )  # fmt: skip
            self_position_embeddings = self_rotary(hidden_states, chunk_position_ids)
            for layer in self.layers[: self.num_self_decoder_layers]:
                hidden_states = layer(
                    hidden_states,
                    self_position_embeddings,
                    attention_mask=self_mask,
                    **cache_kwarg(cache),
                    **self_kwargs,
                )
            kv_position_embeddings = (
                self_position_embeddings
                if self.retention_rotary_emb is None
                else self.rotary_emb(hidden_states, chunk_position_ids)
            )
            global_key_values = self.global_kv(hidden_states, kv_position_embeddings, cache, store_idx)
            kept_states.append(hidden_states[:, max(length - keep - start, 0) :])
        hidden_states = torch.cat(kept_states, dim=1) if len(kept_states) > 1 else kept_states[0]  # [B, keep, d]

        # Cross-decoder on the last `keep` positions only.
        cross_position_ids = position_ids[:, -keep:]
        cross_mask = self._cross_attention_mask(
            hidden_states, attention_mask, q_offset + length - keep, kv_length, kv_offset, cache, packed_sequences
        )
        cross_position_embeddings = self.rotary_emb(hidden_states, cross_position_ids)
        for layer in self.layers[self.num_self_decoder_layers :]:
            hidden_states = layer(
                hidden_states,
                cross_position_embeddings,
                attention_mask=cross_mask,
                global_key_values=global_key_values,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **cache_kwarg(returned_cache))

    def cross_decoder_forward(
        self,
        self_decoder_states: torch.Tensor,
        query_indices: torch.LongTensor,
        positions: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """The cross-decoder alone, from the self-decoder's output of unpadded sequences.

        The cross-decoder reads nothing but the self-decoder's output, so that output can be computed once (a frozen
        self-decoder) and the cross-decoder trained on it at a few chosen positions (say, the answer of a long
        retrieval prompt) for a fraction of a full forward. `self_decoder_states` `[B, T, d]` are what the last
        self-decoder layer returns at the absolute `positions` `[B, T]` (increasing; default `0 .. T-1`, a whole
        sequence, no padding, no cache); a subset of a sequence's positions shows the cross-decoder only those keys.
        `query_indices` `[B, Q]` pick the states to decode. Returns the final-normed hidden states `[B, Q, d]`,
        equal to the full forward's there when the states cover the whole sequence.
        """
        if self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(
                "cross_decoder_forward needs attn_implementation 'eager' or 'sdpa' (an arbitrary query mask), got "
                f"{self.config._attn_implementation!r}"
            )
        batch, length, _ = self_decoder_states.shape
        if query_indices.ndim != 2 or query_indices.shape[0] != batch:
            raise ValueError(f"query_indices must be [batch={batch}, Q], got {tuple(query_indices.shape)}")
        # Checked where it costs no device sync; on an accelerator an index out of range faults in `gather` below.
        if query_indices.device.type == "cpu" and query_indices.numel():
            if not 0 <= int(query_indices.min()) <= int(query_indices.max()) < length:
                raise ValueError(f"query_indices must lie in [0, {length}) (the states' indices)")
        if positions is None:
            positions = torch.arange(length, device=self_decoder_states.device).expand(batch, -1)  # [B, T]
        elif positions.shape != (batch, length):
            raise ValueError(f"positions must be [batch={batch}, T={length}], got {tuple(positions.shape)}")
        global_key_values = self.global_kv(self_decoder_states, self.rotary_emb(self_decoder_states, positions))
        hidden_states = self_decoder_states.gather(
            1, query_indices.unsqueeze(-1).expand(-1, -1, self_decoder_states.shape[-1])
        )  # [B, Q, d]
        query_positions = positions.gather(1, query_indices)  # [B, Q]
        hidden = positions[:, None, :] > query_positions[:, :, None]  # [B, Q, T]: keys after each query
        mask = torch.zeros(hidden.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        mask = mask.masked_fill(hidden, torch.finfo(hidden_states.dtype).min)[:, None]  # [B, 1, Q, T]
        position_embeddings = self.rotary_emb(hidden_states, query_positions)
        for layer in self.layers[self.num_self_decoder_layers :]:
            hidden_states = layer(
                hidden_states, position_embeddings, attention_mask=mask, global_key_values=global_key_values
            )
        return self.norm(hidden_states)

    def _paged_forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | dict | None,
        cache,
        logits_to_keep: int | torch.Tensor,
        engine_kwargs: dict,
    ) -> BaseModelOutputWithPast:
        """One step of transformers' continuous-batching engine (`generate_batch`, `transformers serve`): the new
        tokens of every request packed in one row `[1, N]`, the engine's masks per layer type (sdpa / eager; None
        with flash, which reads `cu_seq_lens`), and its paged cache: sliding windows and the global K/V paged by the
        engine, retention states in per-request slots (`hf_yoco.continuous_batching`). Prefill early exit holds here
        too: the cross-decoder runs only on the rows whose logits are kept (`logits_to_keep`, the engine's
        `logits_indices`), when the masks allow selecting rows."""
        if self.config.attention_sink_tokens:
            raise ValueError(
                "continuous batching does not keep attention sinks (`attention_sink_tokens` = "
                f"{self.config.attention_sink_tokens}); use generate() for this model"
            )
        for name in ("use_cache", "logits_indices", "logits_processor_args"):  # engine inputs the layers don't take
            engine_kwargs.pop(name, None)
        masks = attention_mask if isinstance(attention_mask, dict) else {}
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [1, N, d]
        position_ids = position_ids.long()
        half = self.num_self_decoder_layers
        self_mask = masks.get("sliding_attention") if masks else attention_mask
        self_rotary = self.retention_rotary_emb or self.rotary_emb
        self_position_embeddings = self_rotary(hidden_states, position_ids)
        for layer in self.layers[:half]:  # each layer gets its own copy: the paged cache rewrites it
            hidden_states = layer(
                hidden_states, self_position_embeddings, attention_mask=self_mask, cache=cache, **engine_kwargs
            )
        kv_position_embeddings = (
            self_position_embeddings
            if self.retention_rotary_emb is None
            else self.rotary_emb(hidden_states, position_ids)
        )
        cross_kwargs = dict(engine_kwargs)
        global_key_values = self.global_kv(hidden_states, kv_position_embeddings, cache, half, cross_kwargs)
        cross_mask = masks.get("full_attention") if masks else attention_mask
        if isinstance(logits_to_keep, torch.Tensor) and cross_mask is not None:  # prefill early exit
            rows = logits_to_keep.long()
            hidden_states, position_ids, cross_mask = (
                hidden_states[:, rows],
                position_ids[:, rows],
                cross_mask[:, :, rows],
            )
            logits_to_keep = 0
        cross_position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers[half:]:
            hidden_states = layer(
                hidden_states,
                cross_position_embeddings,
                attention_mask=cross_mask,
                global_key_values=global_key_values,
                **cross_kwargs,
            )
        hidden_states = slice_logits_to_keep(self.norm(hidden_states), logits_to_keep)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states)


class YocoForCausalLM(YocoPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: YocoConfig) -> None:
        super().__init__(config)
        self.model = YocoModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """Let generate() build its default cache, then swap the plain `DynamicCache` for a `YocoCache`."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_NAME)
        if getattr(cache, "_is_user_defined", False):
            return
        if type(cache) is DynamicCache:
            yoco_cache = YocoCache(config=self.config, offloading=cache.offloading)
            if generation_config.is_assistant:
                yoco_cache.activate_past_recording()
            model_kwargs[CACHE_NAME] = yoco_cache
        elif type(cache) is StaticCache:  # cache_implementation="static": ring-buffer windows, same capacity
            model_kwargs[CACHE_NAME] = YocoStaticCache(
                config=self.config, max_cache_len=_static_capacity(cache, self.config), offloading=cache.offloading
            )

    def create_masks_for_generate(
        self,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor | None:
        """Keep the 2D mask (forward builds its masks per prefill chunk and per kept row); with a static cache, pad
        it with zeros to the cache's capacity so that every compiled decode step sees the same shape."""
        capacity = _static_capacity(pick_cache(cache, past_key_values), self.config)
        if capacity is not None and attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = F.pad(attention_mask, (0, capacity - attention_mask.shape[1]))
        return attention_mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        cache (`YocoCache`, *optional*):
            The cache to continue from; `past_key_values` is its older name (see `YocoModel.forward`).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the causal LM loss (shifted inside the loss; -100 is ignored). With labels, the
            cross-decoder runs on every position.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
            An int k keeps the logits of the last k positions, and the cross-decoder then only runs on those
            (prefill early exit); a 1D tensor keeps those sequence indices.
        skip_logits (`bool`, *optional*):
            True returns no logits (only the loss; needs `labels`). None skips them only when training with labels
            and a fused linear cross-entropy is installed (`hf_yoco.integrations.apply_liger_kernel_to_hf_yoco`).

        Example:

        ```python
        >>> import hf_yoco
        >>> from transformers import AutoModelForCausalLM
        >>> config = hf_yoco.YocoConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        ...                             num_attention_heads=4, num_key_value_heads=2)
        >>> model = AutoModelForCausalLM.from_config(config)
        >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
        ```
        """
        check_labels(labels, input_ids if input_ids is not None else inputs_embeds)
        paged = is_paged_cache(pick_cache(cache, past_key_values))  # continuous batching: the model keeps the rows
        cross_positions = logits_to_keep if paged or (labels is None and isinstance(logits_to_keep, int)) else 0
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=cross_positions,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if not paged:
            hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        loss, logits = causal_lm_head_and_loss(self, hidden_states, labels, skip_logits, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_kwarg(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "YocoCache",
    "YocoStaticCache",
    "YocoForCausalLM",
    "YocoModel",
    "YocoPreTrainedModel",
    "chunk_gated_retention",
    "parallel_gated_retention",
    "recurrent_gated_retention",
]
