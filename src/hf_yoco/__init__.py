"""hf_yoco: YOCO and Block Transformer as native Hugging Face Transformers models.

`import hf_yoco` registers the configs and models with the Auto classes:

    model_type "hf_yoco"  -> YocoConfig, YocoModel, YocoForCausalLM
    model_type "hf_yoco_block_transformer" -> BlockTransformerConfig, BlockTransformerModel,
                                              BlockTransformerForCausalLM

It first checks that the installed transformers is a release CI tests (`hf_yoco.compat`). `CACHE_NAME`,
`output_cache(outputs)` and `cache_kwarg(cache)` spell the cache the way the installed release does
(`past_key_values` up to 5.23, `cache` from 5.24).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

# First of the package's own imports: importing `compat` checks the transformers release, before any model code.
from .compat import supported_transformers
from .continuous_batching import install as install_continuous_batching
from .integrations import register_liger, register_peft
from .models.configuration_block_transformer import BlockTransformerConfig
from .models.configuration_yoco import YocoConfig
from .models.modeling_block_transformer import (
    BlockTransformerCache,
    BlockTransformerForCausalLM,
    BlockTransformerModel,
    BlockTransformerPreTrainedModel,
    BlockTransformerStaticCache,
)
from .models.modeling_common import CACHE_NAME, cache_kwarg, output_cache
from .models.modeling_yoco import (
    YocoCache,
    YocoForCausalLM,
    YocoModel,
    YocoPreTrainedModel,
    YocoStaticCache,
    yoco_cache_bytes,
)

__version__ = "0.1.0"

for _config, _base, _causal_lm in (
    (YocoConfig, YocoModel, YocoForCausalLM),
    (BlockTransformerConfig, BlockTransformerModel, BlockTransformerForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _base, exist_ok=True)
    AutoModelForCausalLM.register(_config, _causal_lm, exist_ok=True)
    # `save_pretrained` then writes `auto_map` and copies the model's source files, so checkpoints also load with
    # `trust_remote_code=True` where hf_yoco is not installed.
    _config.register_for_auto_class()
    _base.register_for_auto_class("AutoModel")
    _causal_lm.register_for_auto_class("AutoModelForCausalLM")
register_peft()  # default LoRA target modules for both model types (only if peft is installed)
register_liger()  # `use_liger_kernel=True` / AutoLigerKernelForCausalLM for both model types (if liger is installed)
install_continuous_batching()  # transformers' `generate_batch` / `transformers serve` engine: hf_yoco's cache kinds

__all__ = [
    "CACHE_NAME",
    "BlockTransformerCache",
    "BlockTransformerStaticCache",
    "BlockTransformerConfig",
    "BlockTransformerForCausalLM",
    "BlockTransformerModel",
    "BlockTransformerPreTrainedModel",
    "YocoCache",
    "YocoStaticCache",
    "YocoConfig",
    "YocoForCausalLM",
    "YocoModel",
    "YocoPreTrainedModel",
    "cache_kwarg",
    "output_cache",
    "supported_transformers",
    "yoco_cache_bytes",
]
