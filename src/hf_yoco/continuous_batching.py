"""Continuous batching for hf_yoco models through transformers' own engine (`model.generate_batch(...)`,
`init_continuous_batching()`, `transformers serve`): the cache allocators the engine lacks, and where it groups layers.

transformers' engine pages the K/V of `full_attention` and `sliding_attention` layers. hf_yoco models need three
more kinds of memory, added here as allocators of the engine's own `CacheAllocator` interface (registered on
`import hf_yoco`; the engine is not forked):

- `RetentionStateAllocator` (`linear_attention`, YOCO-gRet's self-decoder): one slot per request holding each
  layer's fp32 retention state `[H, K, V]`.
- `BlockKVAllocator` (`block_attention`, the Block Transformer's block decoder): the K/V of *completed blocks*,
  paged like full attention but one entry per block of `block_length` tokens.
- `BlockLocalStateAllocator` (`block_local_state`, the Block Transformer's token decoder): one slot per request
  holding each layer's K/V of the current block's local sequence, plus the ids of its pending tokens.

and two engine behaviours are adapted for hf_yoco configs only (other models keep the engine's):

- layer grouping (`group_layers_by_attn_type`): YOCO's "reuse" cross-decoder layers own no cache (the engine ignores
  `kv_sharing_modes` and would page a global K/V per cross layer); the Block Transformer's layers map to the two
  allocators above;
- the engine's per-group tensors (`cu_seq_lens_k`, masks) exist only for full and sliding attention: the new groups
  get their `cu_seq_lens_k` and no mask (the models build what they need).

The models read these through `cache.layer_to_allocator` (duck typing: the modeling files never import this module,
so Hub remote code stays self-contained; continuous batching of a gated-retention YOCO or a Block Transformer needs
`import hf_yoco`). Prefix sharing is off for models with a state slot (a slot summarises the whole prefix). The
decode fast path (flash `block_table`) is off for them too: the engine's kernels do not know these layouts.

What an upstream change would look like: a public `register_cache_allocator(layer_type, cls)` whose allocator
declares whether it needs `cu_seq_lens_k` and a mask (instead of the full / sliding cases written into the engine's
IO code), grouping that honours `kv_sharing_modes`, and a built-in state allocator for `linear_attention` layers.
"""

from __future__ import annotations

import math

import torch

RETENTION_STATE = "linear_attention"
BLOCK_KV = "block_attention"
BLOCK_LOCAL_STATE = "block_local_state"
HF_YOCO_MODEL_TYPES = ("hf_yoco", "hf_yoco_block_transformer")
_installed = False


def _padded_page_bytes(nbytes: int) -> int:
    """Page size of a state slot, rounded up to a power of two (>= 128): sectors are sized by the LCM of every
    group's block bytes, so odd page sizes would make sectors huge."""
    return max(128, 1 << math.ceil(math.log2(nbytes)))


def group_layers(config) -> dict[str, list[int]]:
    """The engine's layer groups for an hf_yoco config: {layer type: layer indices that own a cache}."""
    if config.model_type == "hf_yoco_block_transformer":
        block = list(range(config.num_block_decoder_layers))
        local = list(range(config.num_block_decoder_layers, config.num_hidden_layers))
        return {BLOCK_KV: block, BLOCK_LOCAL_STATE: local}
    groups: dict[str, list[int]] = {}
    for index, (layer_type, mode) in enumerate(zip(config.layer_types, config.kv_sharing_modes)):
        if mode != "reuse":  # the cross-decoder layers that reuse the global K/V store nothing
            groups.setdefault(layer_type, []).append(index)
    return groups


def _allocator_base():
    from transformers.generation.continuous_batching.cache_allocators import CacheAllocator

    return CacheAllocator


def _full_attention_base():
    from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator

    return FullAttentionCacheAllocator


class _SlotAllocatorMixin:
    """One block per request, `pages_per_block` fixed-size pages in it (one per layer, plus extra pages): a state slot.

    The engine asks for write indices per query token; a slot allocator answers the request's slot for each, so the
    model finds every token's slot in `write_index[group]`. Nothing is read through `read_index`."""

    supports_block_sharing = False  # a slot summarises the whole prefix: nothing to share page by page
    supports_block_table = False
    rows_per_token = 1

    def _init_slots(self, index: int, layer_indices: list[int], page_bytes: int, extra_pages: int = 0) -> None:
        self.layer_pages = {layer: i for i, layer in enumerate(layer_indices)}
        self._before_cache_tensor_init(
            index=index,
            layer_indices=layer_indices,
            tokens_per_page=1,
            bytes_per_page=_padded_page_bytes(page_bytes),
            allow_block_sharing=False,
        )
        # Extra pages (bookkeeping) after the layers' pages, in every slot
        self.pages_per_block += extra_pages
        self.tokens_per_block = self.tokens_per_page * self.pages_per_block
        self.block_physical_stride = self.rows_per_token * self.tokens_per_block
        self.bytes_per_block = self.bytes_per_page * self.pages_per_block

    def register_cache_tensor(self, bytes_per_sector: int, non_trash_bytes: int, cache_tensor, pool) -> None:
        self._copy_view = cache_tensor.view(-1, self.bytes_per_block)  # forks and offloading copy whole slots
        total_blocks = (non_trash_bytes + 2 * bytes_per_sector) // self.bytes_per_block
        # [slot, page, bytes]: every slot spans the whole tensor's block grid (block ids are absolute)
        pages = cache_tensor[: total_blocks * self.bytes_per_block].view(total_blocks, self.pages_per_block, -1)
        self._after_cache_tensor_init(non_trash_bytes, bytes_per_sector, pages, pool)

    def page_view(self, page: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """Page `page` of every slot as `[num_slots, *shape]` of `dtype` (a view: writes go to the cache)."""
        numel = math.prod(shape)
        return self.cache_tensor[:, page].view(dtype)[:, :numel].unflatten(-1, shape)

    def needs_new_blocks(self, request_id: str, past_length: int, query_length: int) -> int:
        return 0 if self.block_table.get(request_id) else 1

    def allocate_cache_to_request(self, request_id: str, past_length: int, query_length: int) -> None:
        if not self.block_table.get(request_id):
            self.block_table[request_id] = self.pool.get_free_blocks(self.index, 1)

    def get_seqlen_k(self, past_length: int, query_length: int) -> int:
        return past_length + query_length  # lets the model tell a request's past length from cu_seq_lens_k

    def get_read_indices(self, request_id: str, past_length: int, query_length: int) -> list[int]:
        return []

    def get_write_indices(self, request_id: str, past_length: int, query_length: int) -> list[int]:
        return self.block_table[request_id][:1] * query_length

    def fill_block_table(self, request_id, past_length, query_length, block_table) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no kernel block table (supports_block_table=False)")

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        raise NotImplementedError(f"{type(self).__name__} holds per-request state: the model reads its slots")

    def get_cache_for_block_table(self, layer_idx: int):
        raise NotImplementedError(f"{type(self).__name__} has no kernel block table")


def _make_allocators() -> dict[str, type]:
    CacheAllocator = _allocator_base()
    FullAttentionCacheAllocator = _full_attention_base()

    class RetentionStateAllocator(_SlotAllocatorMixin, CacheAllocator):
        """YOCO-gRet: per request, the fp32 retention state `[H, K, V]` of every self-decoder layer."""

        layer_type = RETENTION_STATE

        def __init__(self, index, config, num_key_value_heads, cache_dtype, page_size, layer_indices,
                     allow_block_sharing) -> None:  # fmt: skip
            heads = config.num_retention_heads or config.num_attention_heads
            self.state_shape = (heads, config.retention_head_dim, config.retention_head_dim)
            self._init_slots(index, layer_indices, math.prod(self.state_shape) * torch.float32.itemsize)

        def states(self, layer_idx: int) -> torch.Tensor:
            """`[num_slots, H, K, V]` fp32 states of layer `layer_idx` (a view of the paged cache)."""
            return self.page_view(self.layer_pages[layer_idx], torch.float32, self.state_shape)

    class BlockLocalStateAllocator(_SlotAllocatorMixin, CacheAllocator):
        """Block Transformer: per request, each token-decoder layer's local K/V `[2, H_kv, S, head_dim]` (S = prefix +
        block length - 1 positions) and, in an extra page, the ids of the current block's pending tokens."""

        layer_type = BLOCK_LOCAL_STATE

        def __init__(self, index, config, num_key_value_heads, cache_dtype, page_size, layer_indices,
                     allow_block_sharing) -> None:  # fmt: skip
            self.cache_dtype = cache_dtype
            self.kv_shape = (2, num_key_value_heads, config.token_decoder_length, config.head_dim)
            self.pending_shape = (max(config.block_length - 1, 1),)
            kv_bytes = math.prod(self.kv_shape) * cache_dtype.itemsize
            pending_bytes = self.pending_shape[0] * torch.int64.itemsize
            self._init_slots(index, layer_indices, max(kv_bytes, pending_bytes), extra_pages=1)

        def local_kv(self, layer_idx: int) -> torch.Tensor:
            """`[num_slots, 2, H_kv, S, head_dim]` local K/V of layer `layer_idx`."""
            return self.page_view(self.layer_pages[layer_idx], self.cache_dtype, self.kv_shape)

        def pending_tokens(self) -> torch.Tensor:
            """`[num_slots, block_length - 1]` ids of each slot's pending tokens (int64)."""
            return self.page_view(len(self.layer_pages), torch.int64, self.pending_shape)

    class BlockKVAllocator(FullAttentionCacheAllocator):
        """Block Transformer: the block decoder's K/V, paged like full attention but one entry per *completed
        block*: a request of n tokens holds n // block_length entries (pages of `page_size` blocks)."""

        supports_block_sharing = False  # entries are blocks, not tokens: the engine's token hashes do not apply
        supports_block_table = False
        layer_type = BLOCK_KV

        def __init__(self, index, config, num_key_value_heads, cache_dtype, page_size, layer_indices,
                     allow_block_sharing) -> None:  # fmt: skip
            self.block_length = config.block_length
            super().__init__(index, config, num_key_value_heads, cache_dtype, page_size, layer_indices, False)

        def _entries(self, past_length: int, query_length: int) -> tuple[int, int]:
            """(completed blocks before this query, blocks completed by it) for token lengths."""
            before = past_length // self.block_length
            return before, (past_length + query_length) // self.block_length - before

        def needs_new_blocks(self, request_id: str, past_length: int, query_length: int) -> int:
            return super().needs_new_blocks(request_id, *self._entries(past_length, query_length))

        def allocate_cache_to_request(self, request_id: str, past_length: int, query_length: int) -> None:
            super().allocate_cache_to_request(request_id, *self._entries(past_length, query_length))

        def get_seqlen_k(self, past_length: int, query_length: int) -> int:
            return sum(self._entries(past_length, query_length))

        def get_read_indices(self, request_id: str, past_length: int, query_length: int) -> list[int]:
            before, new = self._entries(past_length, query_length)
            return super().get_read_indices(request_id, before, new) if before + new else []

        def get_write_indices(self, request_id: str, past_length: int, query_length: int) -> list[int]:
            before, new = self._entries(past_length, query_length)
            return super().get_write_indices(request_id, before, new) if new else []

        def fill_block_table(self, request_id, past_length, query_length, block_table) -> None:
            raise NotImplementedError("BlockKVAllocator has no kernel block table (supports_block_table=False)")

        def read_entries(self, layer_idx: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """K and V `[n, H_kv, head_dim]` of the block entries at physical `index` (from `read_index`)."""
            keys, values = self._kv_token_views[layer_idx]
            return keys.index_select(0, index), values.index_select(0, index)

        def write_entries(self, layer_idx: int, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Store K and V `[n, H_kv, head_dim]` of new block entries at physical `index` (from `write_index`)."""
            key_view, value_view = self._kv_token_views[layer_idx]
            key_view.index_copy_(0, index, keys.to(key_view.dtype))
            value_view.index_copy_(0, index, values.to(value_view.dtype))

    return {
        RETENTION_STATE: RetentionStateAllocator,
        BLOCK_KV: BlockKVAllocator,
        BLOCK_LOCAL_STATE: BlockLocalStateAllocator,
    }


def paged_cache_bytes(config, continuous_batching_config, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "meta") -> int:  # fmt: skip
    """Bytes of the paged cache transformers' engine allocates for `config` with `continuous_batching_config`, built
    the way the engine builds it (on the meta device by default: nothing is allocated)."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
    from transformers.generation.continuous_batching.distributed import DistributedHelper
    from transformers.generation.continuous_batching.initialization import resolve_continuous_batching_config

    engine = resolve_continuous_batching_config(config=config, cb_config=continuous_batching_config,
                                                workload_hints=None, has_logit_processors=False,
                                                device=torch.device(device))  # fmt: skip
    cache = PagedAttentionCache(config=config, continuous_batching_config=engine, device=device,
                                distributed_helper=DistributedHelper(None, None), dtype=dtype)  # fmt: skip
    return cache.cache_tensor.numel()  # uint8: one element per byte


def num_blocks_within(config, max_bytes: int, continuous_batching_config, dtype: torch.dtype = torch.float32) -> int:
    """The largest `num_blocks` whose paged cache for `config` takes at most `max_bytes`: the way to give models
    equal cache memory. What one block costs depends on the release: up to 5.24 transformers sizes it as `page_size`
    tokens of K/V for `num_hidden_layers` full-attention layers (a same-depth Llama's), from 5.25 as the model's own
    cache groups need (a YOCO block is then smaller, a Block Transformer block larger). Every other field of
    `continuous_batching_config` is kept; the candidate caches are sized on the meta device."""
    import dataclasses

    def size(blocks: int) -> int:
        return paged_cache_bytes(config, dataclasses.replace(continuous_batching_config, num_blocks=blocks), dtype)

    if (smallest := size(1)) > max_bytes:
        raise ValueError(f"max_bytes ({max_bytes}) is below the smallest paged cache of this model ({smallest} bytes)")
    low, high = 1, 2  # size(low) <= max_bytes < size(high)
    while size(high) <= max_bytes:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if size(middle) <= max_bytes else (low, middle)
    return low


def install() -> bool:
    """Register the allocators and the hf_yoco layer grouping with transformers' continuous-batching engine (once;
    `import hf_yoco` calls it). Returns False when the installed transformers has no such engine."""
    global _installed
    if _installed:
        return True
    try:
        from transformers.generation.continuous_batching import cache as cb_cache
        from transformers.generation.continuous_batching import initialization as cb_init
        from transformers.generation.continuous_batching import input_outputs as cb_io
    except ImportError:
        return False

    cb_cache.ATTN_TYPE_TO_ALLOCATOR.update(_make_allocators())  # the dict the engine's modules share
    engine_grouping = cb_cache.group_layers_by_attn_type

    def group_layers_by_attn_type(config):
        if getattr(config, "model_type", None) in HF_YOCO_MODEL_TYPES:
            return group_layers(config)
        return engine_grouping(config)

    cb_cache.group_layers_by_attn_type = group_layers_by_attn_type
    cb_init.group_layers_by_attn_type = group_layers_by_attn_type

    engine_setup = cb_io.ContinuousBatchingIOs._setup_static_tensors

    def _setup_static_tensors(self, *args, **kwargs):
        engine_setup(self, *args, **kwargs)
        for layer_type in self.cache.cache_allocators:  # the groups the engine has no tensors for
            if layer_type not in self.cumulative_seqlens_k:
                size = self.cumulative_seqlens_q.shape[0]
                self.cumulative_seqlens_k[layer_type] = torch.zeros(size, dtype=torch.int32, device=self.device)
                self.total_seqlen_k[layer_type] = 0
                self.max_length_k[layer_type] = 0
                if self.attention_mask is not None:  # the models build their own masks for these groups
                    self.attention_mask[layer_type] = torch.zeros(
                        1, 1, 1, 1, dtype=self.model_dtype, device=self.device
                    )

    cb_io.ContinuousBatchingIOs._setup_static_tensors = _setup_static_tensors
    engine_build_mask = cb_io.build_attention_mask

    def build_attention_mask(attention_mask, *args, **kwargs):
        if attention_mask.shape[-2:] == (1, 1):  # the placeholder of a group without a mask
            return None
        return engine_build_mask(attention_mask, *args, **kwargs)

    cb_io.build_attention_mask = build_attention_mask
    _installed = True
    return True
