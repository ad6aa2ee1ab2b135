"""hf_yoco: YOCO and Block Transformer as native Hugging Face Transformers models.

`import hf_yoco` registers the configs and models with the Auto classes:

    model_type "hf_yoco"  -> YocoConfig, YocoModel, YocoForCausalLM
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.configuration_yoco import YocoConfig
from .models.modeling_yoco import YocoCache, YocoForCausalLM, YocoModel, YocoPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(YocoConfig.model_type, YocoConfig, exist_ok=True)
AutoModel.register(YocoConfig, YocoModel, exist_ok=True)
AutoModelForCausalLM.register(YocoConfig, YocoForCausalLM, exist_ok=True)

__all__ = [
    "YocoCache",
    "YocoConfig",
    "YocoForCausalLM",
    "YocoModel",
    "YocoPreTrainedModel",
]
