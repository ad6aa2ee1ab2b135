"""Block Transformer (Ho et al., 2024, arXiv:2406.02657) as a native transformers causal LM.

Notation: `L` = `block_length`, `k` = `num_prefix_tokens`, `D` = `hidden_size`, `S = k + L - 1` (token-decoder length).

- Embedder: `nn.Embedding(V, D / L)`; the `L` embeddings of a block are concatenated into one block vector `[D]`.
- Block decoder: causal self-attention over block vectors (rotary positions = block indices), final norm. Its output
  for block `i - 1` is the *context* of block `i`.
- First block: block 0 has no previous block, so its context is a learned vector `start_context` `[D]` (same space as
  the block decoder's normalised outputs). The official model never predicts block 0; with the start context every
  token gets a prediction and the causal-LM loss covers every token, while blocks >= 1 are computed exactly as in the
  official model (which matters for converted checkpoints).
- Expansion: `context_to_prefix = Linear(D, k * D)`, viewed as `k` prefix vectors (prefix j = channels
  `[j * D, (j + 1) * D)`, the official Conv1d layout).
- Token decoder: for block `i` it runs on `[prefix_1..prefix_k, x_{iL}, .., x_{iL+L-2}]` at rotary positions
  `0 .. S - 1`; the output at position `k - 1 + o` predicts token `o` of block `i`. The last token of a block is
  never a token-decoder input (it only enters through the block decoder).
- HF convention: `logits[:, t]` predicts token `t + 1`, for every `t` (also inside the first block and at the last
  input position, which uses the context of the last complete block).

Padding and block boundaries: blocks are anchored at each row's *first real token* (the first 1 in
`attention_mask`), so a left-padded row computes exactly what it computes alone. Internally each row is rotated left
by its number of pads; results are rotated back (outputs at pad positions are meaningless). Right padding (trailing
zeros) is treated as ordinary tokens, which cannot affect earlier positions. `position_ids` are accepted for API
compatibility but ignored: positions follow from the block structure (packed `position_ids`, restarting inside a row
without an `attention_mask`, raise a `ValueError`). With a filled cache, new tokens are all real
(the per-row state lives in the cache) and `attention_mask` is not read. (The official generation instead left-pads
prompts so they *end* on a block boundary; anchoring at the first real token keeps padded rows identical to
unpadded ones and makes prompts of any length follow the training computation.)

Backbone: `layer_style="llama"` (RMSNorm, SwiGLU) or `"gpt_neox"` (LayerNorm, GELU MLP; with
`use_parallel_residual`, `partial_rotary_factor=0.25` and biases it is numerically transformers' `GPTNeoXModel`,
whose per-head interleaved `query_key_value` splits into `q_proj/k_proj/v_proj`: what a converter of the official
Pythia-based checkpoints needs; `start_context` is not in those checkpoints and keeps its initialisation).

Cache (`BlockTransformerCache`): per block-decoder layer the K/V of the completed blocks (ragged per row, padded to
the longest row), per token-decoder layer the K/V of the current block's local sequence (`S` slots), the pending
token ids of the unfinished block, and the number of real tokens per row. Decoding one token either extends the
current block (one token-decoder step) or completes it (embed the block, one block-decoder step, new prefix, reset
the local state); in a left-padded batch both happen in the same step for different rows.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.initialization import copy_, normal_, zeros_
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple

from .configuration_block_transformer import BlockTransformerConfig
from .modeling_common import (
    CACHE_NAME,
    BatchMapCacheMixin,
    DenseMLP,
    GatedMLP,
    HfYocoModelMixin,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary_pos_emb,
    attention_forward,
    cache_kwarg,
    cache_tensors,
    causal_lm_head_and_loss,
    check_labels,
    check_model_inputs,
    find_packed_sequences,
    is_paged_cache,
    output_cache,
    pick_cache,
    storage_bytes,
    tensor_bytes,
)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `allowed` -> additive float mask (0 where allowed, the dtype's minimum elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[1, 1, length, length]` additive causal mask."""
    positions = torch.arange(length, device=device)
    return _additive_mask(positions[None, :] <= positions[:, None], dtype)[None, None]


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------


class BlockTransformerBlockCacheLayer(CacheLayerMixin):
    """K/V over completed blocks for one block-decoder layer: `[B, H_kv, N, head_dim]`, ragged per row.

    Row `b` holds `num_blocks[b]` valid entries (tracked by `BlockTransformerCache`); entries past it are stale and
    overwritten as the row completes blocks.
    """

    is_sliding = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill (`positions is None`): store the given K/V as they are. Step: `_write_step` (per layer kind)."""
        if positions is None:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            return key_states, value_states
        return self._write_step(key_states, value_states, positions, **kwargs)

    def _write_step(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        batch_size: int,
        num_keys: int,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one block per row of `rows` at `positions` (all `< num_keys`, a bound the caller knows without
        reading the device); returns `[len(rows), H_kv, num_keys, head_dim]` (entries past a row's own position must
        be masked by the caller)."""
        needed = num_keys
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
            shape = (int(batch_size), key_states.shape[1], 0, key_states.shape[-1])
            self.keys = key_states.new_zeros(shape)
            self.values = value_states.new_zeros(shape)
        if self.keys.shape[-2] < needed:  # grow along the block axis
            pad = (0, 0, 0, needed - self.keys.shape[-2])
            self.keys, self.values = nn.functional.pad(self.keys, pad), nn.functional.pad(self.values, pad)
        # keys[rows, :, positions] is [r, H_kv, head_dim]; the new block is key_states[:, :, 0]
        self.keys[rows, :, positions] = key_states[:, :, 0]
        self.values[rows, :, positions] = value_states[:, :, 0]
        return self.keys[rows, :, :needed], self.values[rows, :, :needed]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def _map(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)


class BlockTransformerLocalCacheLayer(BlockTransformerBlockCacheLayer):
    """K/V of the current block's local sequence for one token-decoder layer: `[B, H_kv, S, head_dim]`.

    Slot `j` holds local position `j` (prefix `0..k-1`, then the block's tokens). Row `b` has `k + m_b` valid slots
    (`m_b` pending tokens); later slots are stale and masked by the caller.
    """

    def _write_step(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        positions: torch.Tensor,
        write_mask: torch.Tensor,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write query slot `s` of row `b` at local position `positions[b, s]` wherever `write_mask[b, s]`; returns
        the full `[B, H_kv, S, head_dim]` buffers. Slots not written put back what their position holds (a
        read-modify-write instead of selecting the written slots, which would cost a host sync per layer)."""
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)  # [B, q]
        keep = ~write_mask[..., None, None]  # [B, q, 1, 1]
        # keys[rows, :, positions] is [B, q, H_kv, head_dim]; key_states is [B, H_kv, q, head_dim]
        for buffer, states in ((self.keys, key_states), (self.values, value_states)):
            buffer[rows, :, positions] = torch.where(keep, buffer[rows, :, positions], states.transpose(1, 2))
        return self.keys, self.values


class BlockTransformerCache(BatchMapCacheMixin, Cache):
    """Generation state of a Block Transformer.

    - `layers[:num_block_decoder_layers]`: block-decoder K/V over completed blocks (`BlockTransformerBlockCacheLayer`).
    - `layers[num_block_decoder_layers:]`: token-decoder K/V of the current block, at most
      `num_prefix_tokens + block_length - 1` positions (`BlockTransformerLocalCacheLayer`).
    - `pending_tokens` `[B, block_length - 1]`: ids of the unfinished block (the first `num_tokens % block_length`
      are valid); they are embedded into a block vector once the block is complete.
    - `num_tokens` `[B]`: real tokens per row (left padding excluded); `get_seq_length()` is the number of input
      columns processed (left padding included), which is what `generate()` slices `input_ids` with.

    `generate()` creates it by itself; pass one as `cache` (or `past_key_values`) to continue or to inspect it
    (`memory_bytes()`).

    Rollback (assisted and prompt-lookup decoding): after `activate_past_recording()` the cache also keeps the ids
    of every real token per row (`history`, `[B, N]`, 8 bytes a token). `crop(-n)` then goes back to any earlier
    position: completed blocks past it are dropped (their block-decoder K/V is masked and later overwritten), the
    pending tokens are restored from the history, and a row whose current block changed is marked `stale`: the next
    forward recomputes that one block's context and local token-decoder state before decoding on. Without
    recording, `crop` is exact inside the current block and raises across a block boundary.
    """

    is_compileable = False

    def __init__(self, config: BlockTransformerConfig) -> None:
        self.num_block_decoder_layers = config.num_block_decoder_layers
        self.block_length = config.block_length
        self.num_prefix_tokens = config.num_prefix_tokens
        layers = [BlockTransformerBlockCacheLayer() for _ in range(config.num_block_decoder_layers)]
        layers += [BlockTransformerLocalCacheLayer() for _ in range(config.num_token_decoder_layers)]
        super().__init__(layers=layers)
        self.pending_tokens: torch.Tensor | None = None
        self.num_tokens: torch.Tensor | None = None
        self._seen_tokens = 0
        self.max_tokens = 0  # an upper bound of `num_tokens` kept on the host (sizes block masks without a sync)
        self.record_past = False
        self.history: torch.Tensor | None = None  # [B, capacity] ids of the real tokens, while recording
        self.stale: torch.Tensor | None = None  # [B] rows whose local state must be rebuilt (after a crop)

    def activate_past_recording(self, **kwargs) -> None:
        """Keep what `crop` needs to go back across block boundaries (called by generate's assisted decoding;
        transformers >= 5.25 passes `recurrent_states_to_keep`, which a cache with no recurrent state has no use for)."""
        self.record_past = True

    def start(self, pending_tokens: torch.Tensor, num_tokens: torch.Tensor, length: int) -> None:
        """After a prefill of `length` input columns: the pending ids `[B, L-1]` and real tokens `[B]` per row."""
        self.pending_tokens, self.num_tokens, self._seen_tokens = pending_tokens, num_tokens, length
        self.max_tokens = int(num_tokens.max())

    def advance(self, new_ids: torch.Tensor) -> None:
        """After a decode step that fed `new_ids` `[B]`: pending ids of unfinished blocks, token counts."""
        if self.block_length > 1:  # a completing row keeps its (now stale) pending ids; no boolean indexing: no sync
            column = self.num_pending.clamp(max=self.block_length - 2)[:, None]  # [B, 1]
            keep = (self.num_pending != self.block_length - 1)[:, None]
            current = self.pending_tokens.gather(1, column)
            self.pending_tokens.scatter_(1, column, torch.where(keep, new_ids[:, None], current))
        self.num_tokens = self.num_tokens + 1
        self._seen_tokens += 1
        self.max_tokens += 1

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def record_tokens(self, ids: torch.Tensor, start: torch.Tensor) -> None:
        """While recording: write `ids` `[B, T]` (real tokens only) into the history at per-row offsets `start`."""
        if not self.record_past:
            return
        needed = int((start + ids.shape[1]).max())
        if self.history is None or self.history.shape[1] < needed:
            grown = ids.new_zeros(ids.shape[0], needed + 256)
            if self.history is not None:
                grown[:, : self.history.shape[1]] = self.history
            self.history = grown
        columns = start[:, None] + torch.arange(ids.shape[1], device=ids.device)[None]  # [B, T]
        self.history.scatter_(1, columns, ids)

    def fits(self, config: BlockTransformerConfig) -> bool:
        """Whether this cache has the layout a model of `config` needs."""
        return (
            (self.num_block_decoder_layers, len(self.layers), self.block_length, self.num_prefix_tokens)
            == (config.num_block_decoder_layers, config.num_block_decoder_layers + config.num_token_decoder_layers,
                config.block_length, config.num_prefix_tokens)
        )  # fmt: skip

    @property
    def block_layers(self) -> list[BlockTransformerBlockCacheLayer]:
        return self.layers[: self.num_block_decoder_layers]

    @property
    def local_layers(self) -> list[BlockTransformerLocalCacheLayer]:
        return self.layers[self.num_block_decoder_layers :]

    @property
    def is_initialized(self) -> bool:
        return self.num_tokens is not None

    @property
    def num_blocks(self) -> torch.Tensor:
        """Completed blocks per row, `[B]`."""
        return torch.div(self.num_tokens, self.block_length, rounding_mode="floor")

    @property
    def num_pending(self) -> torch.Tensor:
        """Tokens of the unfinished block per row, `[B]`."""
        return self.num_tokens % self.block_length

    @property
    def batch_size(self) -> int:
        return -1 if self.num_tokens is None else self.num_tokens.shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns processed so far (left padding included)."""
        return self._seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._seen_tokens + query_length, 0

    def memory_bytes(self) -> dict[str, int]:
        """Logical bytes: `block_decoder_kv`, `token_decoder_kv` (local), `pending_tokens`, `bookkeeping` (token
        counts, and the token history while recording), `total`; and `held`, the bytes of every storage the cache
        keeps alive (spare block slots and views included)."""
        block_kv = sum(tensor_bytes(layer.keys, layer.values) for layer in self.block_layers)
        local_kv = sum(tensor_bytes(layer.keys, layer.values) for layer in self.local_layers)
        pending = tensor_bytes(self.pending_tokens)
        bookkeeping = tensor_bytes(self.num_tokens, self.history, self.stale)
        return {
            "block_decoder_kv": block_kv,
            "token_decoder_kv": local_kv,
            "pending_tokens": pending,
            "bookkeeping": bookkeeping,
            "total": block_kv + local_kv + pending + bookkeeping,
            "held": storage_bytes(*cache_tensors(self)),
        }

    def _map_batch(self, fn) -> None:
        for layer in self.layers:
            layer._map(fn)
        if self.num_tokens is not None:
            self.pending_tokens, self.num_tokens = fn(self.pending_tokens), fn(self.num_tokens)
        self.history = None if self.history is None else fn(self.history)
        self.stale = None if self.stale is None else fn(self.stale)

    def reset(self) -> None:
        """Forget everything (the next forward is a fresh prefill)."""
        for layer in self.layers:
            layer.reset()
        self.pending_tokens = self.num_tokens = self.history = self.stale = None
        self._seen_tokens = self.max_tokens = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (negative, as `DynamicLayer.crop`).

        Inside each row's current block it only masks the local K/V slots past the new length again. Across a block
        boundary it needs the token history (`activate_past_recording()`): the row's pending tokens are restored and
        its local state is rebuilt by the next forward (see the class docstring).
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove (or 0), got {tokens_to_remove} "
                "(the legacy 'absolute length' form is not supported)."
            )
        remove = -tokens_to_remove
        if remove == 0 or self.num_tokens is None:
            return
        crosses = self.num_pending < remove  # [B]
        if bool(crosses.any()):
            if self.history is None:
                raise ValueError(
                    f"BlockTransformerCache can only crop tokens of the current, unfinished block without recording: "
                    f"removing {remove} token(s) would cross a block boundary for some row (pending tokens per row: "
                    f"{self.num_pending.tolist()}). Call `cache.activate_past_recording()` before the tokens to undo "
                    "are fed (generate's assisted decoding does), or re-run the prefix."
                )
            if bool((self.num_tokens < remove).any()):
                raise ValueError(f"cannot remove {remove} token(s): some row holds only {int(self.num_tokens.min())}")
        self.num_tokens = self.num_tokens - remove
        self._seen_tokens -= remove
        self.max_tokens -= remove
        if bool(crosses.any()):
            L = self.block_length
            block_start = self.num_blocks * L  # [B]
            columns = block_start[:, None] + torch.arange(L - 1, device=block_start.device)[None]  # [B, L-1]
            restored = self.history.gather(1, columns.clamp(max=self.history.shape[1] - 1))
            self.pending_tokens = torch.where(crosses[:, None], restored, self.pending_tokens)
            self.stale = crosses if self.stale is None else self.stale | crosses


class BlockTransformerStaticBlockLayer(BlockTransformerBlockCacheLayer):
    """Preallocated block-decoder K/V `[B, H_kv, capacity, head_dim]` for `torch.compile`: prefill copies its blocks in,
    a decode step writes one block per row at `positions` in place and returns the whole buffer (the caller masks
    positions past each row's own)."""

    is_compileable = True

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, batch_size: int) -> None:
        super().lazy_initialization(key_states, value_states)
        shape = (batch_size, key_states.shape[1], self.capacity, key_states.shape[-1])
        self.keys, self.values = key_states.new_zeros(shape), value_states.new_zeros(shape)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:  # prefill: blocks 0 .. n-1 of every row
            if self.keys is None:
                self._allocate(key_states, value_states, key_states.shape[0])
            count = key_states.shape[-2]
            if count > self.capacity:
                raise ValueError(f"the static cache holds {self.capacity} blocks; the prompt has {count}")
            self.keys[:, :, :count] = key_states
            self.values[:, :, :count] = value_states
            return key_states, value_states
        rows = torch.arange(key_states.shape[0], device=key_states.device)
        self.keys[rows, :, positions] = key_states[:, :, 0]  # [B, H_kv, head_dim] at each row's position
        self.values[rows, :, positions] = value_states[:, :, 0]
        return self.keys, self.values

    def get_max_length(self) -> int:
        return self.capacity


class BlockTransformerStaticLocalLayer(BlockTransformerStaticBlockLayer):
    """Preallocated token-decoder K/V `[B, H_kv, S + 1, head_dim]`: slot `j < S` holds local position `j`, slot `S`
    takes the writes a step discards (so every step writes the same number of slots, without branching)."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions is None:
            return super().update(key_states, value_states)
        scratch = self.capacity - 1
        target = torch.where(kwargs["write_mask"], positions, scratch)  # [B, q]
        rows = torch.arange(key_states.shape[0], device=key_states.device)[:, None].expand_as(target)
        # keys[rows, :, target] is [B, q, H_kv, head_dim]; key_states is [B, H_kv, q, head_dim]
        self.keys[rows, :, target] = key_states.transpose(1, 2)
        self.values[rows, :, target] = value_states.transpose(1, 2)
        return self.keys, self.values


class BlockTransformerStaticCache(BlockTransformerCache):
    """Fixed-shape generation state for `torch.compile` / CUDA graphs (`generate(..., cache_implementation="static")`
    builds it): block-decoder K/V preallocated for `max_cache_len // block_length + 1` blocks, the token decoder's
    local K/V in `S + 1` slots, and the counters and pending ids as tensors updated in place. Its decode step
    (`BlockTransformerModel._decode_step_static`) has no data-dependent control flow: the block decoder runs for
    every row each step (a row whose block is not complete writes a block slot it will overwrite once it is) and
    the token decoder always runs `num_prefix_tokens` query slots. That costs more FLOPs than the dynamic cache's step,
    which runs the block decoder only on completed blocks: use it where launch overhead dominates (small batches on
    a GPU). Not croppable: assisted decoding uses the dynamic cache."""

    is_compileable = True

    def __init__(self, config: BlockTransformerConfig, max_cache_len: int) -> None:
        super().__init__(config)
        self.max_cache_len = max_cache_len
        block_capacity = max_cache_len // config.block_length + 1  # + the slot of the block being formed
        self.layers = [
            BlockTransformerStaticBlockLayer(block_capacity) for _ in range(config.num_block_decoder_layers)
        ]
        self.layers += [
            BlockTransformerStaticLocalLayer(config.token_decoder_length + 1)
            for _ in range(config.num_token_decoder_layers)
        ]
        self.seen: torch.Tensor | None = None

    def start(self, pending_tokens: torch.Tensor, num_tokens: torch.Tensor, length: int) -> None:
        # One scratch column: a completing row writes its last token there instead of branching.
        pending = nn.functional.pad(pending_tokens, (0, 1))
        if self.num_tokens is None or self.num_tokens.shape != num_tokens.shape:
            self.pending_tokens, self.num_tokens = pending, num_tokens.clone()
            self.seen = torch.tensor(length, device=num_tokens.device)
            if not torch.compiler.is_compiling():
                for tensor in (self.pending_tokens, self.num_tokens, self.seen):
                    torch._dynamo.mark_static_address(tensor)
        else:
            self.pending_tokens.copy_(pending)
            self.num_tokens.copy_(num_tokens)
            self.seen.fill_(length)

    def advance(self, new_ids: torch.Tensor) -> None:
        rows = torch.arange(new_ids.shape[0], device=new_ids.device)
        self.pending_tokens[rows, self.num_pending] = new_ids  # a completing row writes the scratch column
        self.num_tokens.add_(1)
        self.seen.add_(1)

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor | int:
        return 0 if self.seen is None else self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_cache_len

    def activate_past_recording(self, **kwargs) -> None:
        raise ValueError("the static Block Transformer cache cannot roll back; assisted decoding uses the dynamic one")

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "the static Block Transformer cache cannot be cropped; use the dynamic BlockTransformerCache for "
            "assisted or prompt-lookup decoding"
        )

    def reset(self) -> None:
        super().reset()
        self.seen = None


# ---------------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------------


class BlockTransformerAttention(nn.Module):
    """Multi-head self-attention with (partial) RoPE and GQA; masks are always explicit additive tensors."""

    def __init__(self, config: BlockTransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        cache: BlockTransformerCache | None = None,
        cache_kwargs: dict | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        # [B, T, H * hd] -> [B, H, T, hd]
        query = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, **(cache_kwargs or {}))
        dropout = self.attention_dropout if self.training else 0.0
        output, _ = attention_forward(self, query, key, value, attention_mask, self.scaling, dropout)
        return self.o_proj(output.reshape(batch, length, -1))  # [B, T, H, hd] -> [B, T, D]


def _make_norm(config: BlockTransformerConfig) -> nn.Module:
    """LayerNorm (`layer_style="gpt_neox"`) or RMSNorm (`"llama"`) over `hidden_size`."""
    if config.layer_style == "gpt_neox":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, eps=config.norm_eps)


class BlockTransformerDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer: RMSNorm + SwiGLU (`layer_style="llama"`) or LayerNorm + GELU MLP (`"gpt_neox"`),
    sequential or parallel (GPT-NeoX) residual."""

    def __init__(self, config: BlockTransformerConfig, layer_idx: int) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.self_attn = BlockTransformerAttention(config, layer_idx)
        self.input_layernorm = _make_norm(config)
        self.post_attention_layernorm = _make_norm(config)
        mlp_class = DenseMLP if config.layer_style == "gpt_neox" else GatedMLP
        self.mlp = mlp_class(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        cache: BlockTransformerCache | None = None,
        cache_kwargs: dict | None = None,
        past_key_values: BlockTransformerCache | None = None,
    ) -> torch.Tensor:
        """The stack passes the cache as `cache_kwarg(cache)`, the name under which the installed transformers'
        `GradientCheckpointingLayer` drops it under gradient checkpointing; both names are accepted."""
        cache = pick_cache(cache, past_key_values)
        attn_output = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, cache_kwargs
        )
        if self.use_parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return hidden_states + attn_output + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BlockTransformerEmbedder(nn.Module):
    """Lookup embedder: `L` token embeddings of width `D / L`, concatenated into one block vector."""

    def __init__(self, config: BlockTransformerConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embedder_hidden_size)

    def forward(self, block_ids: torch.Tensor) -> torch.Tensor:
        """`[B, n, L]` token ids -> `[B, n, D]` block vectors (token j of a block -> channels `[j*D/L, (j+1)*D/L)`)."""
        embeds = self.embed_tokens(block_ids)  # [B, n, L, D/L]
        return embeds.flatten(-2)  # [B, n, D]


class BlockTransformerDecoderStack(nn.Module):
    """Shared body of both decoders: rotary embedding, layers, final norm."""

    def __init__(self, config: BlockTransformerConfig, num_layers: int, first_layer_idx: int) -> None:
        super().__init__()
        self.rotary_emb = RotaryEmbedding(config, config.rotary_dim)
        self.layers = nn.ModuleList(
            [BlockTransformerDecoderLayer(config, first_layer_idx + i) for i in range(num_layers)]
        )
        self.norm = _make_norm(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: BlockTransformerCache | None = None,
        cache_kwargs: dict | None = None,
    ) -> torch.Tensor:
        """`[N, T, D]` inputs at rotary `position_ids` (`[N, T]` or `[1, T]`) -> normalised `[N, T, D]`."""
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache_kwargs=cache_kwargs,
                **cache_kwarg(cache),
            )
        return self.norm(hidden_states)


class BlockTransformerBlockDecoder(BlockTransformerDecoderStack):
    """Global decoder: causal self-attention over block vectors; cache layers `0 .. num_block_decoder_layers - 1`."""

    def __init__(self, config: BlockTransformerConfig) -> None:
        super().__init__(config, config.num_block_decoder_layers, first_layer_idx=0)


class BlockTransformerTokenDecoder(BlockTransformerDecoderStack):
    """Local decoder: `[prefix vectors, tokens of the current block]`; owns the token embedding and the expansion."""

    def __init__(self, config: BlockTransformerConfig) -> None:
        super().__init__(config, config.num_token_decoder_layers, first_layer_idx=config.num_block_decoder_layers)
        self.num_prefix_tokens = config.num_prefix_tokens
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Expansion `Linear(D, k * D)` (the official kernel-1 Conv1d): prefix j = output channels [j*D, (j+1)*D).
        # A plain nn.Linear so that PEFT/LoRA can wrap it; `_init_weights` recognises it by this flag.
        self.context_to_prefix = nn.Linear(config.hidden_size, config.num_prefix_tokens * config.hidden_size)
        self.context_to_prefix.is_context_expansion = True

    def expand_context(self, context: torch.Tensor) -> torch.Tensor:
        """`[..., D]` block contexts -> `[..., k, D]` prefix vectors."""
        return self.context_to_prefix(context).unflatten(-1, (self.num_prefix_tokens, -1))


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class BlockTransformerPreTrainedModel(HfYocoModelMixin, PreTrainedModel):
    config_class = BlockTransformerConfig
    config: BlockTransformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlockTransformerDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False  # masks are explicit (ragged caches, local windows)
    _supports_flex_attn = False
    _can_compile_fullgraph = True  # with BlockTransformerStaticCache (generate's cache_implementation="static")

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, BlockTransformerModel):
            normal_(module.start_context, mean=0.0, std=1.0)  # the scale of normalised block-decoder outputs
        elif isinstance(module, RotaryEmbedding):
            inv_freq = module.reset_inv_freq()
            copy_(module.inv_freq, inv_freq)
            copy_(module.original_inv_freq, inv_freq)
        elif isinstance(module, nn.Linear):
            if getattr(module, "is_context_expansion", False):  # official expansion init: N(0, D^-0.5)
                std = self.config.hidden_size**-0.5
            normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                zeros_(module.bias)
        else:
            super()._init_weights(module)


class BlockTransformerModel(BlockTransformerPreTrainedModel):
    """Embedder + block decoder + token decoder. Returns, for every position `t`, the token decoder's final hidden
    state that predicts token `t + 1` (`last_hidden_state`, `[B, T, D]`)."""

    def __init__(self, config: BlockTransformerConfig) -> None:
        super().__init__(config)
        self.embedder = BlockTransformerEmbedder(config)
        self.block_decoder = BlockTransformerBlockDecoder(config)
        self.token_decoder = BlockTransformerTokenDecoder(config)
        # Context of block 0 (which has no previous block); see the module docstring.
        self.start_context = nn.Parameter(torch.zeros(config.hidden_size))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_decoder.embed_tokens = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: BlockTransformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: BlockTransformerCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`position_ids` are ignored (see the module docstring). `logits_to_keep` selects the returned positions
        like in `...ForCausalLM.forward`; `logits_to_keep=1` only runs the token decoder on each row's last block.
        `cache` (older name: `past_key_values`; `cache` wins if both are given) is continued and returned under the
        name the installed transformers uses."""
        cache = pick_cache(cache, past_key_values)
        if is_paged_cache(cache):
            return BaseModelOutputWithPast(
                last_hidden_state=self._paged_forward(input_ids, cache, logits_to_keep, kwargs)
            )
        if inputs_embeds is not None or input_ids is None:
            raise ValueError(
                "BlockTransformerModel needs `input_ids` (and does not accept `inputs_embeds`): the embedder and the "
                "token decoder embed the same ids with two different tables."
            )
        if cache is not None and not isinstance(cache, BlockTransformerCache):
            raise ValueError(f"`cache` must be a BlockTransformerCache, got {type(cache).__name__}.")
        if cache is not None and not cache.fits(self.config):
            raise ValueError(
                "`cache` was built for another Block Transformer (layers, block length or prefix differ); use "
                "BlockTransformerCache(model.config)"
            )
        check_model_inputs(
            self.config, input_ids, None, attention_mask, position_ids, cache.get_seq_length() if cache else 0
        )
        for name in ("output_hidden_states", "output_attentions"):  # refused rather than silently returning None
            if kwargs.get(name, getattr(self.config, name, False)):
                raise ValueError(
                    f"BlockTransformerModel does not return `{name.removeprefix('output_')}`: its block decoder and "
                    f"token decoder run at different granularities (blocks vs tokens within a block). Set `{name}` "
                    "to False; `last_hidden_state` (the token decoder's output) is returned, and forward hooks on "
                    "`block_decoder.layers` / `token_decoder.layers` give per-layer states."
                )
        if find_packed_sequences(position_ids, attention_mask, input_ids.shape[0]) is not None:  # never mixed silently
            raise ValueError(
                "BlockTransformer does not support packed sequences (`position_ids` restarting inside a row): "
                "blocks are anchored at each row's first token. Pad the sequences and pass `attention_mask`."
            )
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = BlockTransformerCache(self.config)

        if cache is not None and cache.is_initialized:
            hidden_states = self._decode(input_ids, cache)
            hidden_states = slice_logits_to_keep(hidden_states, logits_to_keep)
        else:
            hidden_states = self._prefill(input_ids, attention_mask, cache, logits_to_keep)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **cache_kwarg(cache))

    # -- full sequence (training, scoring, prefill) -------------------------------------------------------------------

    @staticmethod
    def _left_padding(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
        """Number of leading pad positions per row, `[B]`; checks the mask is `0..0 1..1 0..0` per row."""
        if attention_mask is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        if attention_mask.dim() != 2 or attention_mask.shape != (batch, length):
            raise ValueError(
                f"`attention_mask` must be a 2D [batch, seq_len] = [{batch}, {length}] padding mask, got shape "
                f"{tuple(attention_mask.shape)}."
            )
        mask = attention_mask.bool()
        real = mask.long().sum(-1)
        first = torch.where(mask.any(-1), mask.long().argmax(-1), torch.zeros_like(real))
        positions = torch.arange(length, device=device)
        span = (positions[None] >= first[:, None]) & (positions[None] < (first + real)[:, None])
        if not bool(torch.equal(span, mask)):
            raise ValueError(
                "BlockTransformer supports left and right padding only (`attention_mask` rows of the form 0..0 1..1 "
                "0..0); masks with holes (packed sequences) are not supported."
            )
        return first

    def _prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: BlockTransformerCache | None,
        logits_to_keep: int | torch.Tensor,
    ) -> torch.Tensor:
        config = self.config
        L, k, S = config.block_length, config.num_prefix_tokens, config.token_decoder_length
        batch, length = input_ids.shape
        device = input_ids.device
        dtype = self.start_context.dtype
        num_pads = self._left_padding(attention_mask, batch, length, device)  # [B]
        num_tokens = length - num_pads  # tokens from each row's first real token on

        # 1. Rotate every row left by its padding, so blocks start at the first real token: [B, T]
        positions = torch.arange(length, device=device)
        aligned_ids = input_ids.gather(1, (positions[None] + num_pads[:, None]) % length)

        # 2. Block decoder over the complete blocks (ragged per row; later blocks only see earlier ones)
        num_full = length // L
        block_ids = aligned_ids[:, : num_full * L].reshape(batch, num_full, L)  # [B, n, L]
        block_embeds = self.embedder(block_ids)  # [B, n, D]
        if num_full > 0:
            block_positions = torch.arange(num_full, device=device)[None]  # [1, n]
            block_states = self.block_decoder(
                block_embeds, block_positions, _causal_mask(num_full, dtype, device), cache=cache
            )  # [B, n, D]
        else:  # prompt shorter than one block: only the start context
            block_states = block_embeds
        start = self.start_context.to(block_states.dtype).expand(batch, 1, -1)
        contexts = torch.cat([start, block_states], dim=1)  # [B, n + 1, D]: contexts[:, i] is block i's context

        # 3. Token decoder on each row's current block: next-token state, plus the local cache
        last_only = isinstance(logits_to_keep, int) and logits_to_keep == 1
        if cache is not None or last_only:
            current_block = torch.div(num_tokens, L, rounding_mode="floor")  # [B]
            num_pending = num_tokens % L
            rows = torch.arange(batch, device=device)
            padded_ids = nn.functional.pad(aligned_ids, (0, L))
            token_index = current_block[:, None] * L + torch.arange(L - 1, device=device)[None]  # [B, L-1]
            pending_ids = padded_ids.gather(1, token_index)  # [B, L-1]
            prefix = self.token_decoder.expand_context(contexts[rows, current_block])  # [B, k, D]
            local_inputs = torch.cat([prefix, self.token_decoder.embed_tokens(pending_ids)], dim=1)  # [B, S, D]
            local_states = self.token_decoder(
                local_inputs,
                torch.arange(S, device=device)[None],
                _causal_mask(S, dtype, device),
                cache=cache,
            )  # [B, S, D]
            last_state = local_states[rows, k - 1 + num_pending][:, None]  # [B, 1, D]
            if cache is not None:
                cache.start(pending_ids, num_tokens, length)
                cache.record_tokens(aligned_ids, torch.zeros_like(num_tokens))  # real tokens first in each row
            if last_only:
                return last_state

        # 4. Token decoder on every block i = 0..n: [prefix(context_i), x_{iL} .. x_{iL+L-2}]
        num_local = num_full + 1
        padded_ids = nn.functional.pad(aligned_ids, (0, num_local * L - length))
        local_ids = padded_ids.view(batch, num_local, L)[:, :, : L - 1]  # [B, n+1, L-1] (last token: never an input)
        prefix = self.token_decoder.expand_context(contexts)  # [B, n+1, k, D]
        local_inputs = torch.cat([prefix, self.token_decoder.embed_tokens(local_ids)], dim=2)  # [B, n+1, S, D]
        local_states = self.token_decoder(
            local_inputs.flatten(0, 1), torch.arange(S, device=device)[None], _causal_mask(S, dtype, device)
        )  # [B * (n+1), S, D]
        # Output at k-1+o predicts token o of its block: [B, n+1, L, D] -> flat index = token index
        token_states = local_states.view(batch, num_local, S, -1)[:, :, k - 1 :].flatten(1, 2)
        hidden_states = token_states[:, 1 : length + 1]  # [B, T, D]: position t predicts token t + 1
        # Rotate back to the caller's (padded) layout
        hidden_states = hidden_states.gather(
            1, ((positions[None] - num_pads[:, None]) % length)[..., None].expand(-1, -1, hidden_states.shape[-1])
        )
        return slice_logits_to_keep(hidden_states, logits_to_keep)

    # -- continuous batching ------------------------------------------------------------------------------------------

    def _paged_forward(self, input_ids: torch.Tensor, cache, logits_to_keep, engine_kwargs: dict) -> torch.Tensor:
        """One step of transformers' continuous-batching engine (`generate_batch`, `transformers serve`): the new
        tokens of every request packed in one row `[1, N]`. The engine pages the block decoder's K/V (one entry per
        completed block) and gives each request a slot for its local token-decoder K/V and pending token ids
        (`hf_yoco.continuous_batching`). Each request's state is loaded into a `BlockTransformerCache`, run through
        the same code as `generate()` (fresh requests: one left-padded prefill; others: decode steps), and stored
        back; returns the states predicting the next tokens, `[1, N or kept, D]`."""
        blocks = cache.cache_allocators["block_attention"]
        local = cache.cache_allocators["block_local_state"]
        cu_q = engine_kwargs["cu_seq_lens_q"].tolist()
        seen = engine_kwargs["cu_seq_lens_k"][local.layer_type].diff().tolist()  # past + new tokens per request
        entries_cu = engine_kwargs["cu_seq_lens_k"][blocks.layer_type].tolist()  # completed blocks, cumulative
        slots = engine_kwargs["write_index"][local.index].tolist()
        ids = input_ids[0].long()
        requests = [  # (position in the batch, first token, new tokens, past tokens, slot, first read entry)
            (r, cu_q[r], cu_q[r + 1] - cu_q[r], seen[r] - (cu_q[r + 1] - cu_q[r]), slots[cu_q[r]], entries_cu[r])
            for r in range(len(cu_q) - 1)
            if cu_q[r + 1] > cu_q[r]
        ]
        hidden_states = self.start_context.new_zeros(1, ids.shape[0], self.config.hidden_size)
        new_entries: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

        fresh = [req for req in requests if req[3] == 0]
        if fresh:  # prompts (or their first chunk): one prefill, left-padded to the longest
            width = max(req[2] for req in fresh)
            padded = ids.new_zeros(len(fresh), width)
            mask = ids.new_zeros(len(fresh), width)
            for i, (_, start, length, *_rest) in enumerate(fresh):
                padded[i, width - length :] = ids[start : start + length]
                mask[i, width - length :] = 1
            state = BlockTransformerCache(self.config)
            last = self._prefill(padded, mask, state, logits_to_keep=1)  # [B, 1, D]
            for i, (_, start, length, *_rest) in enumerate(fresh):
                hidden_states[0, start + length - 1] = last[i, 0]
            self._store_paged(state, fresh, local, new_entries)
        steps = [req for req in requests if req[3] > 0]
        decode = [req for req in steps if req[2] == 1]
        groups = ([decode] if decode else []) + [[req] for req in steps if req[2] > 1]  # chunks: one by one
        for group in groups:  # continuing requests: decode steps from their stored state
            state = self._load_paged(group, blocks, local, engine_kwargs["read_index"][blocks.index])
            rows = torch.stack([ids[start : start + length] for _, start, length, *_rest in group])  # [B, T]
            states = self._decode(rows, state)  # [B, T, D]
            for i, (_, start, length, *_rest) in enumerate(group):
                hidden_states[0, start : start + length] = states[i]
            self._store_paged(state, group, local, new_entries)

        write = engine_kwargs["write_index"][blocks.index]
        if write.numel():  # every completed block's K/V, in the engine's order (request by request)
            ordered = [new_entries[r] for r in sorted(new_entries)]
            for j, layer_idx in enumerate(blocks.layer_indices):
                keys = torch.cat([entries[j][0] for entries in ordered])
                values = torch.cat([entries[j][1] for entries in ordered])
                blocks.write_entries(layer_idx, write[: keys.shape[0]], keys, values)
        return slice_logits_to_keep(hidden_states, logits_to_keep)

    def _no_entries(self) -> torch.Tensor:
        return self.start_context.new_zeros(0, self.config.num_key_value_heads, self.config.head_dim)

    def _load_paged(self, group: list[tuple], blocks, local, read_index: torch.Tensor) -> BlockTransformerCache:
        """A `BlockTransformerCache` holding the stored state of the requests in `group` (see `_paged_forward`)."""
        L = self.config.block_length
        state = BlockTransformerCache(self.config)
        past = torch.tensor([req[3] for req in group], device=read_index.device)
        counts = [req[3] // L for req in group]  # completed blocks before this step
        for layer, layer_idx in zip(state.block_layers, blocks.layer_indices):
            keys = self.start_context.new_zeros(len(group), self.config.num_key_value_heads, max(counts),
                                                self.config.head_dim)  # fmt: skip
            values = torch.zeros_like(keys)
            for i, (req, count) in enumerate(zip(group, counts)):
                if count:  # [n, H_kv, head_dim] -> [H_kv, n, head_dim]
                    k, v = blocks.read_entries(layer_idx, read_index[req[5] : req[5] + count])
                    keys[i, :, :count], values[i, :, :count] = k.transpose(0, 1), v.transpose(0, 1)
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        slot_ids = torch.tensor([req[4] for req in group], device=read_index.device)
        for layer, layer_idx in zip(state.local_layers, local.layer_indices):
            kv = local.local_kv(layer_idx)[slot_ids]  # [B, 2, H_kv, S, head_dim]
            layer.lazy_initialization(kv[:, 0], kv[:, 1])
            layer.keys, layer.values = kv[:, 0], kv[:, 1]
        state.start(local.pending_tokens()[slot_ids, : L - 1], past, int(past.max()))
        return state

    def _store_paged(self, state: BlockTransformerCache, group: list[tuple], local, new_entries: dict) -> None:
        """Store the requests' local K/V and pending ids in their slots; collect the K/V of the blocks completed in
        this step into `new_entries` (written in the engine's order by `_paged_forward`)."""
        L = self.config.block_length
        for i, (r, _, length, past, *_rest) in enumerate(group):
            first, end = past // L, (past + length) // L
            new_entries[r] = [  # per layer: [n, H_kv, head_dim] (none before a prompt's first complete block)
                (layer.keys[i, :, first:end].transpose(0, 1), layer.values[i, :, first:end].transpose(0, 1))
                if end > first
                else (self._no_entries(), self._no_entries())
                for layer in state.block_layers
            ]
        slot_ids = torch.tensor([req[4] for req in group], device=state.num_tokens.device)
        for layer, layer_idx in zip(state.local_layers, local.layer_indices):
            local.local_kv(layer_idx)[slot_ids] = torch.stack([layer.keys, layer.values], dim=1)
        if L > 1:
            local.pending_tokens()[slot_ids, : L - 1] = state.pending_tokens

    # -- incremental decoding ----------------------------------------------------------------------------------------

    def _decode(self, input_ids: torch.Tensor, cache: BlockTransformerCache) -> torch.Tensor:
        """Feed new tokens one by one through the cache (exactly the training computation); `[B, T, D]` states."""
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(
                f"Batch size {input_ids.shape[0]} does not match the cache's {cache.batch_size} (expand the inputs "
                "before building the cache, or use `cache.batch_repeat_interleave`)."
            )
        if cache.stale is not None and bool(cache.stale.any()):
            self._rebuild_local_state(cache)
        step = self._decode_step_static if isinstance(cache, BlockTransformerStaticCache) else self._decode_step
        states = [step(input_ids[:, i], cache) for i in range(input_ids.shape[1])]
        return torch.stack(states, dim=1)

    def _rebuild_local_state(self, cache: BlockTransformerCache) -> None:
        """After a `crop` across a block boundary: for each such row, the context of its current block (one
        block-decoder step on the block before it, or the start context for block 0) and its local token-decoder K/V
        over `[prefix, pending tokens]`, exactly as if the row had been decoded up to here."""
        config = self.config
        L, k, S = config.block_length, config.num_prefix_tokens, config.token_decoder_length
        batch, device, dtype = cache.batch_size, cache.num_tokens.device, self.start_context.dtype
        rows = cache.stale.nonzero(as_tuple=True)[0]  # [r]
        blocks = cache.num_blocks[rows]  # [r], current block of each stale row
        contexts = self.start_context.to(dtype)[None].expand(len(rows), -1).clone()  # [r, D]
        previous = blocks > 0
        if bool(previous.any()):
            rows_p, blocks_p = rows[previous], blocks[previous] - 1  # the last completed block of each row
            columns = blocks_p[:, None] * L + torch.arange(L, device=device)[None]  # [r', L]
            block_embeds = self.embedder(cache.history[rows_p].gather(1, columns)[:, None])  # [r', 1, D]
            num_keys = int(blocks_p.max()) + 1
            allowed = torch.arange(num_keys, device=device)[None] <= blocks_p[:, None]
            block_states = self.block_decoder(
                block_embeds,
                blocks_p[:, None],
                _additive_mask(allowed, dtype)[:, None, None],
                cache=cache,
                cache_kwargs={"rows": rows_p, "positions": blocks_p, "batch_size": batch, "num_keys": num_keys},
            )  # [r', 1, D]; rewrites that block's (unchanged) K/V
            contexts[previous] = block_states[:, 0].to(contexts.dtype)
        inputs = self.token_decoder.embed_tokens.weight.new_zeros(batch, S, config.hidden_size)  # [B, S, D]
        inputs[rows, :k] = self.token_decoder.expand_context(contexts).to(inputs.dtype)
        inputs[rows, k:] = self.token_decoder.embed_tokens(cache.pending_tokens[rows])
        slots = torch.arange(S, device=device)
        positions = slots[None].expand(batch, -1)  # [B, S]
        write_mask = cache.stale[:, None] & (slots[None] < (k + cache.num_pending)[:, None])  # [B, S]
        self.token_decoder(
            inputs,
            positions,
            _causal_mask(S, dtype, device),
            cache=cache,
            cache_kwargs={"positions": positions, "write_mask": write_mask},
        )  # only the stale rows' local K/V are written
        cache.stale = None

    def _decode_step(self, new_ids: torch.Tensor, cache: BlockTransformerCache) -> torch.Tensor:
        """One token per row, `[B]` -> `[B, D]` (the state predicting the following token)."""
        config = self.config
        L, k, S = config.block_length, config.num_prefix_tokens, config.token_decoder_length
        batch, device, dtype = new_ids.shape[0], new_ids.device, self.start_context.dtype
        num_pending = cache.num_pending  # [B], before this token
        completes = num_pending == L - 1  # this token ends its row's block
        done = completes.nonzero(as_tuple=True)[0]  # [r]

        # 1. Rows whose block is now complete: one block-decoder step, new prefix vectors
        prefix = None
        if done.numel() > 0:
            block_ids = torch.cat([cache.pending_tokens[done], new_ids[done, None]], dim=1)  # [r, L]
            block_embeds = self.embedder(block_ids[:, None])  # [r, 1, D]
            block_positions = cache.num_blocks[done]  # [r]: index of the block being added
            num_keys = cache.max_tokens // L + 1  # > every row's block index, known on the host
            allowed = torch.arange(num_keys, device=device)[None] <= block_positions[:, None]  # [r, num_keys]
            block_states = self.block_decoder(
                block_embeds,
                block_positions[:, None],
                _additive_mask(allowed, dtype)[:, None, None],  # [r, 1, 1, num_keys]
                cache=cache,
                cache_kwargs={"rows": done, "positions": block_positions, "batch_size": batch, "num_keys": num_keys},
            )  # [r, 1, D]
            prefix = self.token_decoder.expand_context(block_states[:, 0])  # [r, k, D]

        # 2. Token decoder: q query slots per row. Completing rows: the k fresh prefix vectors at local positions
        #    0..k-1 (their old local state is discarded). Other rows: the new token in the last slot at local
        #    position k + num_pending (the other slots are unused fillers: not written, outputs ignored).
        num_slots = k if prefix is not None else 1
        slot_ids = torch.arange(num_slots, device=device)
        inputs = self.token_decoder.embed_tokens(new_ids)[:, None].expand(-1, num_slots, -1).clone()  # [B, q, D]
        local_positions = torch.where(slot_ids[None] == num_slots - 1, (k + num_pending)[:, None], 0)  # [B, q]
        write_mask = (slot_ids[None] == num_slots - 1).expand(batch, -1).clone()  # [B, q]
        if prefix is not None:
            inputs[done] = prefix.to(inputs.dtype)
            local_positions[done] = slot_ids
            write_mask[done] = True
        allowed = torch.arange(S, device=device)[None, None] <= local_positions[..., None]  # [B, q, S]
        local_states = self.token_decoder(
            inputs,
            local_positions,
            _additive_mask(allowed, dtype)[:, None],  # [B, 1, q, S]
            cache=cache,
            cache_kwargs={"positions": local_positions, "write_mask": write_mask},
        )  # [B, q, D]

        # 3. Bookkeeping: pending ids of unfinished blocks, token counts (and the history while recording)
        cache.record_tokens(new_ids[:, None], cache.num_tokens)
        cache.advance(new_ids)
        return local_states[:, -1]

    def _decode_step_static(self, new_ids: torch.Tensor, cache: BlockTransformerStaticCache) -> torch.Tensor:
        """`_decode_step` without data-dependent control flow or shapes (for `torch.compile` with a static cache):
        every row runs the block decoder on `[pending tokens, new token]` at its next block slot (kept only where the
        block is complete), and the token decoder on `k` query slots: the fresh prefix for completing rows, the new
        token in the last slot (the others are fillers written to the scratch slot) for the rest."""
        config = self.config
        L, k, S = config.block_length, config.num_prefix_tokens, config.token_decoder_length
        device, dtype = new_ids.device, self.start_context.dtype
        num_pending, num_blocks = cache.num_pending, cache.num_blocks  # [B], before this token
        completes = num_pending == L - 1  # [B]

        # 1. Block decoder on every row's would-be block; its K/V land in the slot of the block being formed
        block_ids = torch.cat([cache.pending_tokens[:, : L - 1], new_ids[:, None]], dim=1)  # [B, L]
        capacity = cache.block_layers[0].capacity
        allowed = torch.arange(capacity, device=device)[None] <= num_blocks[:, None]  # [B, capacity]
        block_states = self.block_decoder(
            self.embedder(block_ids[:, None]),  # [B, 1, D]
            num_blocks[:, None],
            _additive_mask(allowed, dtype)[:, None, None],  # [B, 1, 1, capacity]
            cache=cache,
            cache_kwargs={"positions": num_blocks},
        )  # [B, 1, D]
        prefix = self.token_decoder.expand_context(block_states[:, 0])  # [B, k, D]

        # 2. Token decoder on k query slots per row
        slot_ids = torch.arange(k, device=device)[None]  # [1, k]
        last = slot_ids == k - 1
        tokens = self.token_decoder.embed_tokens(new_ids)[:, None].expand(-1, k, -1)  # [B, k, D]
        inputs = torch.where(completes[:, None, None], prefix.to(tokens.dtype), tokens)
        local_positions = torch.where(completes[:, None], slot_ids, torch.where(last, (k + num_pending)[:, None], 0))
        write_mask = completes[:, None] | last  # [B, k]
        keys = torch.arange(S + 1, device=device)  # the last slot is scratch, never attended
        allowed = (keys[None, None] <= local_positions[..., None]) & (keys < S)  # [B, k, S + 1]
        local_states = self.token_decoder(
            inputs,
            local_positions,
            _additive_mask(allowed, dtype)[:, None],  # [B, 1, k, S + 1]
            cache=cache,
            cache_kwargs={"positions": local_positions, "write_mask": write_mask},
        )  # [B, k, D]
        cache.advance(new_ids)
        return local_states[:, -1]


class BlockTransformerForCausalLM(BlockTransformerPreTrainedModel, GenerationMixin):
    """Block Transformer with an LM head on the token decoder; `logits[:, t]` predicts token `t + 1`."""

    _tied_weights_keys = {"lm_head.weight": "model.token_decoder.embed_tokens.weight"}

    def __init__(self, config: BlockTransformerConfig) -> None:
        super().__init__(config)
        self.model = BlockTransformerModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """`generate()` hook: build a `BlockTransformerCache` (the default `DynamicCache` cannot hold block state)."""
        user_cache = model_kwargs.get(CACHE_NAME)
        if user_cache is not None:
            if not isinstance(user_cache, BlockTransformerCache):
                raise ValueError(
                    f"BlockTransformerForCausalLM needs a BlockTransformerCache as `{CACHE_NAME}`, got "
                    f"{type(user_cache).__name__}."
                )
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        implementation = generation_config.cache_implementation
        if implementation not in (None, "dynamic", "static"):
            raise ValueError(
                "BlockTransformerForCausalLM supports `cache_implementation` None / 'dynamic' (BlockTransformerCache) "
                f"and 'static' (BlockTransformerStaticCache, for torch.compile); got {implementation!r}."
            )
        if implementation == "static":
            if generation_config.max_cache_len is not None:
                max_cache_length = max(max_cache_length, generation_config.max_cache_len)
            model_kwargs[CACHE_NAME] = BlockTransformerStaticCache(self.config, max_cache_len=max_cache_length)
            return
        cache = BlockTransformerCache(self.config)
        if generation_config.is_assistant:  # a draft model's cache is cropped after each verification
            cache.activate_past_recording()
        model_kwargs[CACHE_NAME] = cache

    def create_masks_for_generate(
        self,
        attention_mask: torch.Tensor | None = None,
        cache: BlockTransformerCache | None = None,
        past_key_values: BlockTransformerCache | None = None,
        **kwargs,
    ) -> torch.Tensor | None:
        """The 2D padding mask for the prefill; None afterwards (a filled cache holds each row's state and decode
        never reads the mask), so compiled decode steps see no growing input."""
        cache = pick_cache(cache, past_key_values)
        return None if cache is not None and cache.is_initialized else attention_mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: BlockTransformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        past_key_values: BlockTransformerCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward. `labels` are the input ids (-100 = ignored); the loss is the usual shifted
        cross-entropy (`self.loss_function`, which honours Trainer's `num_items_in_batch`). `skip_logits=True`
        returns only the loss; None skips the logits only when training with labels and a fused linear
        cross-entropy is installed (`hf_yoco.integrations.apply_liger_kernel_to_hf_yoco`)."""
        check_labels(labels, input_ids)
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=pick_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        loss, logits = causal_lm_head_and_loss(self, outputs.last_hidden_state, labels, skip_logits, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **cache_kwarg(output_cache(outputs)))


__all__ = [
    "BlockTransformerCache",
    "BlockTransformerStaticCache",
    "BlockTransformerForCausalLM",
    "BlockTransformerModel",
    "BlockTransformerPreTrainedModel",
]
