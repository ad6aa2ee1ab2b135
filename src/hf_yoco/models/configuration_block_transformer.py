"""Block Transformer (global-to-local language model) configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2CLS
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

LAYER_STYLES = ("llama", "gpt_neox")
KERNEL_BACKENDS = ("auto", "torch", "triton")


@strict
class BlockTransformerConfig(PreTrainedConfig):
    r"""
    Configuration of a Block Transformer (Ho et al., 2024, arXiv:2406.02657): a global *block decoder* over blocks of
    `block_length` tokens and a local *token decoder* that decodes the tokens of one block at a time.

    Pipeline: each block of `block_length` token ids is embedded by concatenating `block_length` lookup embeddings of
    width `hidden_size // block_length` (the *embedder*); the *block decoder* runs causal self-attention over these
    block vectors; the output for block `i - 1` (a learned start-of-sequence context for block 0) is projected into
    `num_prefix_tokens` prefix vectors; the *token decoder* attends only to `[prefix vectors, tokens of block i so
    far]` and predicts the tokens of block `i` through an (untied by default) LM head.

    The model type is `"hf_yoco_block_transformer"`.

    Args:
        vocab_size (`int`, defaults to 32000): vocabulary size (shared by the embedder and the token decoder).
        hidden_size (`int`, defaults to 512): width `D` of both decoders; must be divisible by `block_length`.
        intermediate_size (`int`, defaults to 2048): feed-forward width of both decoders.
        block_length (`int`, defaults to 4): tokens per block `L_B`.
        num_prefix_tokens (`int`, defaults to 2): prefix vectors the block context is expanded into.
        num_block_decoder_layers (`int`, defaults to 4): layers of the block decoder.
        num_token_decoder_layers (`int`, defaults to 4): layers of the token decoder.
        num_attention_heads (`int`, defaults to 8): query heads of every attention layer.
        num_key_value_heads (`int`, *optional*): key/value heads (GQA); defaults to `num_attention_heads`.
        head_dim (`int`, *optional*): head size; defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): feed-forward activation (`"gelu"` for GPT-NeoX / Pythia).
        layer_style (`str`, defaults to `"llama"`):
            `"llama"`: pre-RMSNorm, SwiGLU feed-forward (`gate_proj`/`up_proj`/`down_proj`).
            `"gpt_neox"`: pre-LayerNorm (with bias) and a two-layer feed-forward (`up_proj`/`down_proj`), as in the
            official Pythia-based checkpoints (combine with `use_parallel_residual=True`,
            `partial_rotary_factor=0.25`, `attention_bias=True`, `mlp_bias=True`, `hidden_act="gelu"`).
        use_parallel_residual (`bool`, defaults to `False`):
            `x + attn(norm1(x)) + mlp(norm2(x))` (GPT-NeoX) instead of the sequential pre-norm residual.
        partial_rotary_factor (`float`, defaults to 1.0): fraction of each head's channels that RoPE rotates.
        attention_bias (`bool`, defaults to `False`): biases on the q/k/v/o projections.
        mlp_bias (`bool`, defaults to `False`): biases on the feed-forward projections.
        norm_eps (`float`, defaults to 1e-5): epsilon of RMSNorm / LayerNorm.
        max_position_embeddings (`int`, defaults to 2048): longest sequence in tokens (used by scaled RoPE types).
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights.
        use_cache, pad_token_id, bos_token_id, eos_token_id, tie_word_embeddings, rope_parameters, attention_dropout:
            As in `LlamaConfig`. `tie_word_embeddings=True` ties the LM head to the token decoder's embedding (the
            paper's model is untied). Rotary positions are block indices in the block decoder and
            `0 .. num_prefix_tokens + block_length - 2` inside every block of the token decoder.
        kernel_backend (`str`, defaults to `"auto"`):
            Kernels for the hot paths: `"auto"` runs hf_yoco's Triton kernels on CUDA tensors (when triton is
            installed) and PyTorch otherwise; `"torch"` always PyTorch; `"triton"` always Triton (CPU tensors need
            `TRITON_INTERPRET=1`, for tests). Without the hf_yoco package (Hub remote code) PyTorch is used.
    """

    model_type = "hf_yoco_block_transformer"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # the cache output's name up to 5.23 and from 5.24

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 2048
    block_length: int = 4
    num_prefix_tokens: int = 2
    num_block_decoder_layers: int = 4
    num_token_decoder_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    layer_style: str = "llama"
    use_parallel_residual: bool = False
    partial_rotary_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: RopeParameters | dict | None = None
    attention_dropout: float = 0.0
    kernel_backend: str = "auto"

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if (
            self.head_dim is None
            and isinstance(self.num_attention_heads, int)
            and self.num_attention_heads > 0
            and self.hidden_size % self.num_attention_heads == 0
        ):
            self.head_dim = self.hidden_size // self.num_attention_heads
        # Validate here (plain `ValueError`s) before `@strict` runs it again wrapped in its own error type.
        self.validate_architecture()
        super().__post_init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """Block-decoder plus token-decoder layers (what generic tooling counts)."""
        return self.num_block_decoder_layers + self.num_token_decoder_layers

    @property
    def embedder_hidden_size(self) -> int:
        """Width of one token's slice of a block vector: `hidden_size // block_length`."""
        return self.hidden_size // self.block_length

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head: `int(head_dim * partial_rotary_factor)`."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def token_decoder_length(self) -> int:
        """Positions the token decoder sees per block: the prefix plus the first `block_length - 1` tokens."""
        return self.num_prefix_tokens + self.block_length - 1

    def validate_architecture(self):
        """Part of `@strict` validation: every error names the field and the allowed values."""

        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "block_length",
            "num_prefix_tokens",
            "num_block_decoder_layers",
            "num_token_decoder_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            positive_int(name)
        if self.hidden_size % self.block_length:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `block_length` ({self.block_length}): the "
                "embedder concatenates `block_length` token embeddings of width `hidden_size / block_length`."
            )
        if self.head_dim is None:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must divide `hidden_size` ({self.hidden_size}) "
                "unless `head_dim` is given."
            )
        positive_int("head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` ({self.num_key_value_heads}) must divide `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.layer_style not in LAYER_STYLES:
            raise ValueError(f"`layer_style` must be one of {LAYER_STYLES}, got {self.layer_style!r}.")
        if self.hidden_act not in ACT2CLS:
            raise ValueError(f"`hidden_act` must be one of {sorted(ACT2CLS)}, got {self.hidden_act!r}.")
        factor = self.partial_rotary_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise ValueError(f"`partial_rotary_factor` must be a number in (0, 1], got {factor!r}.")
        rotary_dim = int(self.head_dim * factor)
        if rotary_dim < 2 or rotary_dim % 2:
            raise ValueError(
                f"`head_dim * partial_rotary_factor` must give a positive even number of rotary channels, got "
                f"int({self.head_dim} * {factor}) = {rotary_dim}."
            )
        for name in ("use_parallel_residual", "attention_bias", "mlp_bias", "tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}.")
        for name in ("norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        dropout = self.attention_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`attention_dropout` must be a number in [0, 1), got {dropout!r}.")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"`kernel_backend` must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}.")


__all__ = ["BlockTransformerConfig"]
