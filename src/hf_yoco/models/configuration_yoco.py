"""YOCO ("You Only Cache Once") configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

SELF_DECODER_TYPES = ("sliding_window", "gated_retention")
KERNEL_BACKENDS = ("auto", "torch", "triton")
# Cache layer type that transformers' `DynamicCache(config=...)` builds for each self-decoder type.
SELF_DECODER_LAYER_TYPES = {"sliding_window": "sliding_attention", "gated_retention": "linear_attention"}


@strict
class YocoConfig(PreTrainedConfig):
    r"""
    Configuration of a YOCO decoder-decoder language model (Sun et al., 2024, arXiv:2405.05254).

    The first `num_self_decoder_layers` layers (half by default) form the *self-decoder* (sliding-window attention or
    gated retention, constant-size state); its output is normalized and projected **once** into a global K/V that
    every layer of the *cross-decoder* (the remaining layers) attends to. `layer_types` and `kv_sharing_modes`
    express this to transformers' cache machinery, so `DynamicCache(config=config)` / `StaticCache(config=config,
    ...)` build `[sliding|linear] * S + [full ("store", the global K/V)] + [dummy ("reuse")] * (L - S - 1)` for S
    self-decoder layers.

    The model type is `"hf_yoco"` (flash-linear-attention registers `"yoco"` for its own port).

    Args:
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        head_dim, hidden_act, max_position_embeddings, initializer_range, rms_norm_eps, use_cache, pad_token_id,
        bos_token_id, eos_token_id, tie_word_embeddings, rope_parameters, attention_dropout:
            As in `LlamaConfig`. `num_attention_heads` / `num_key_value_heads` / `head_dim` describe the
            cross-decoder (queries per layer, one shared K/V) and the sliding-window self-decoder. `rope_theta=...`
            is accepted and stored in `rope_parameters["rope_theta"]` (transformers 5 convention).
        num_self_decoder_layers (`int`, *optional*):
            Layers in the self-decoder, 1 .. `num_hidden_layers - 1`; the rest form the cross-decoder. Defaults to
            `num_hidden_layers // 2` (the paper's split; `num_hidden_layers` must then be even). A larger self-decoder
            keeps more layers' own attention (constant-size state each) and shares the global K/V among fewer cross
            layers, as cross-layer KV sharing does in Gemma 3n (the last third of the layers share) - the choice
            `hf-yoco distill` makes when it converts a pretrained model.
        self_decoder_type (`str`, defaults to `"gated_retention"`):
            `"gated_retention"` (gRet, the paper's default) or `"sliding_window"` (SWA).
        sliding_window (`int`, *optional*):
            Window W of the SWA self-decoder; token t attends to keys t-W+1..t (W keys, current token included).
            Required for, and only valid with, `self_decoder_type="sliding_window"`.
        attention_sink_tokens (`int`, defaults to 0):
            Attention sinks of the sliding-window self-decoder (Xiao et al., 2023, StreamingLLM): the first
            `attention_sink_tokens` tokens of each sequence (padding excluded) stay visible to every later token
            beside its window, at a constant cost of that many cached keys per layer. Pretrained softmax attention
            parks surplus attention on the first tokens; a window that drops them degrades every position beyond
            it, so conversions of pretrained models (`hf-yoco distill`) keep 4. Only valid with
            `self_decoder_type="sliding_window"`; not supported by the static cache or continuous batching.
        num_retention_heads (`int`, *optional*):
            Heads of gated retention (defaults to `num_attention_heads`); key and value head size is
            `hidden_size // num_retention_heads`. Only valid with `self_decoder_type="gated_retention"`.
        gate_logit_normalizer (`float`, defaults to 16):
            `log(gamma) = logsigmoid(x W_gamma) / gate_logit_normalizer` (gRet decay per head and token).
        retention_chunk_size (`int`, defaults to 64):
            Chunk length of the chunkwise gRet form used for prompts/training sequences.
        self_decoder_chunk_size (`int` or `"auto"`, *optional*, defaults to `"auto"`):
            Chunked prefill: in eval mode, push at most this many prompt tokens through the self-decoder at once
            (state carried by the cache), so activation memory stays bounded for very long prompts; results equal
            one-shot prefill. `None` disables it. `"auto"`: 2048 on CPU; on a GPU as many tokens as fit a quarter of
            the free memory (a multiple of 2048), so long prompts run in few large chunks. With a sliding-window
            self-decoder on the PyTorch attention path the chunk is also capped at `max(sliding_window, 512)`, so
            each chunk only meets about two windows of keys (block-sparse prefill; the Triton kernel is block-sparse
            by itself). (Named apart from `GenerationConfig.prefill_chunk_size`, which chunks whole forward calls
            inside `generate()` and also works with YOCO.)
        official_numerics (`bool`, defaults to `False`):
            Reproduce the official microsoft/unilm YOCO numerics needed to load converted checkpoints: embeddings
            scaled by `sqrt(hidden_size)` and RoPE with `theta ** -linspace(0, 1, d/2)` frequencies on interleaved
            (GPT-J) pairs. Off: standard Llama-style RoPE (any `rope_type`) and unscaled embeddings.
        kernel_backend (`str`, defaults to `"auto"`):
            Kernels for the hot paths: `"auto"` runs hf_yoco's Triton kernels on CUDA tensors (when triton is
            installed) and PyTorch otherwise; `"torch"` always PyTorch; `"triton"` always Triton (CPU tensors need
            `TRITON_INTERPRET=1`, for tests). Without the hf_yoco package (Hub remote code) PyTorch is used.
        layer_types (`list[str]`, *optional*):
            Derived from `self_decoder_type`; accepted only if it matches.
    """

    model_type = "hf_yoco"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache output's name up to 5.23 and from 5.24

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_self_decoder_layers: int | None = None
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float = 0.0
    self_decoder_type: str = "gated_retention"
    sliding_window: int | None = None
    attention_sink_tokens: int = 0
    num_retention_heads: int | None = None
    gate_logit_normalizer: float = 16.0
    retention_chunk_size: int = 64
    self_decoder_chunk_size: int | str | None = "auto"
    official_numerics: bool = False
    kernel_backend: str = "auto"
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        layers = self.num_hidden_layers
        if self.num_self_decoder_layers is None and isinstance(layers, int) and layers >= 2 and layers % 2 == 0:
            self.num_self_decoder_layers = layers // 2  # the paper's half/half (else `validate_architecture` says why)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0 and self.hidden_size % self.num_attention_heads == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        expected_layer_types = self._expected_layer_types()
        if self.layer_types is None:
            self.layer_types = expected_layer_types
        elif expected_layer_types is not None and list(self.layer_types) != expected_layer_types:
            raise ValueError(
                f"`layer_types` is derived from `self_decoder_type` and `num_hidden_layers` and must be "
                f"{expected_layer_types}, got {self.layer_types}."
            )
        # Validate here (plain `ValueError`s) before `@strict` runs it again wrapped in its own error type.
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def _expected_layer_types(self) -> list[str] | None:
        if (
            self.self_decoder_type not in SELF_DECODER_TYPES
            or not isinstance(self.num_self_decoder_layers, int)
            or not 1 <= self.num_self_decoder_layers < self.num_hidden_layers
        ):
            return None  # reported by `validate_architecture`
        half = self.num_self_decoder_layers
        return [SELF_DECODER_LAYER_TYPES[self.self_decoder_type]] * half + ["full_attention"] * (
            self.num_hidden_layers - half
        )

    @property
    def kv_sharing_modes(self) -> list[str | None]:
        """Self-decoder: own cache; first cross layer: "store" (the global K/V); other cross layers: "reuse"."""
        half = self.num_self_decoder_layers
        return [None] * half + ["store"] + ["reuse"] * (self.num_hidden_layers - half - 1)

    @property
    def retention_head_dim(self) -> int:
        return self.hidden_size // (self.num_retention_heads or self.num_attention_heads)

    def validate_architecture(self):
        """Part of `@strict` validation: every error names the field and the allowed values."""

        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            positive(name)
        for name in ("rms_norm_eps", "gate_logit_normalizer", "retention_chunk_size", "max_position_embeddings"):
            positive(name)
        layers, split = self.num_hidden_layers, self.num_self_decoder_layers
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 2:
            raise ValueError(f"`num_hidden_layers` must be an integer >= 2, got {layers!r}.")
        if split is None:
            raise ValueError(
                f"`num_hidden_layers` must be an even number >= 2 (half self-decoder, half cross-decoder) unless "
                f"`num_self_decoder_layers` sets the split, got {layers}."
            )
        if not isinstance(split, int) or isinstance(split, bool) or not 1 <= split < layers:
            raise ValueError(
                f"`num_self_decoder_layers` must be an integer from 1 to `num_hidden_layers - 1` ({layers - 1}), "
                f"got {split!r}."
            )
        if self.self_decoder_type not in SELF_DECODER_TYPES:
            raise ValueError(
                f"`self_decoder_type` must be one of {SELF_DECODER_TYPES}, got {self.self_decoder_type!r}."
            )
        if self.head_dim is None:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size}) "
                "unless `head_dim` is given."
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"`head_dim` must be a positive even number (RoPE rotates pairs), got {self.head_dim}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.self_decoder_type == "sliding_window":
            if self.sliding_window is None or isinstance(self.sliding_window, bool) or self.sliding_window < 2:
                raise ValueError(
                    "`sliding_window` must be an int >= 2 (the number of keys each token sees, itself included; "
                    "transformers' sliding-window cache cannot hold the empty past of a window of 1) when "
                    f"`self_decoder_type='sliding_window'`, got {self.sliding_window!r}."
                )
            sinks = self.attention_sink_tokens
            if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
                raise ValueError(f"`attention_sink_tokens` must be an int >= 0, got {sinks!r}.")
            if self.num_retention_heads is not None:
                raise ValueError(
                    "`num_retention_heads` is only used by `self_decoder_type='gated_retention'`; "
                    f"got {self.num_retention_heads} with 'sliding_window'. Remove it."
                )
        else:
            if self.sliding_window is not None:
                raise ValueError(
                    "`sliding_window` is only used by `self_decoder_type='sliding_window'`; "
                    f"got {self.sliding_window} with 'gated_retention'. Set it to None."
                )
            if self.attention_sink_tokens:
                raise ValueError(
                    "`attention_sink_tokens` is only used by `self_decoder_type='sliding_window'`; "
                    f"got {self.attention_sink_tokens!r} with 'gated_retention'. Set it to 0."
                )
            heads = self.num_retention_heads or self.num_attention_heads
            if heads <= 0 or self.hidden_size % heads or (self.hidden_size // heads) % 2:
                raise ValueError(
                    f"`num_retention_heads` ({heads}) must divide `hidden_size` ({self.hidden_size}) into an even "
                    "head size."
                )
        chunk = self.self_decoder_chunk_size
        if (
            chunk is not None
            and chunk != "auto"
            and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk <= 0)
        ):
            raise ValueError(f"`self_decoder_chunk_size` must be a positive int, 'auto' or None, got {chunk!r}.")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"`kernel_backend` must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}.")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if self.official_numerics and rope_type != "default":
            raise ValueError(
                f"`official_numerics=True` uses the official YOCO RoPE; `rope_parameters['rope_type']` must be "
                f"'default', got {rope_type!r}."
            )


__all__ = ["YocoConfig"]
