"""`evaluate` metric: sliding-window perplexity of texts under a saved causal LM (YOCO, Block Transformer, Llama...).

import evaluate
from hf_yoco.evaluation import PERPLEXITY_METRIC

metric = evaluate.load(PERPLEXITY_METRIC)
metric.compute(predictions=[text], model_id="path/to/model", window=1024, stride=512)
# {"perplexities": [...], "mean_perplexity": ..., "perplexity": ... (token-weighted over all texts)}
"""

import math

import datasets
import evaluate
import torch

_DESCRIPTION = (
    "Perplexity with overlapping windows: every token is scored once, with up to window - stride tokens of context."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): a saved model folder loadable by `AutoModelForCausalLM` (hf_yoco models included).
    window (int): tokens per forward pass. stride (int): tokens between window starts.
    max_tokens (int, optional): score only the first N tokens of each text.
Returns:
    perplexities (list of float), mean_perplexity (float), perplexity (float, token-weighted), tokens (int).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SlidingWindowPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, window=1024, stride=512, max_tokens=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import hf_yoco  # noqa: F401
        from hf_yoco.evaluation import sliding_window_perplexity

        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        perplexities, total_nll, total_tokens = [], 0.0, 0
        for text in predictions:
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
            if max_tokens:
                ids = ids[:max_tokens]
            result = sliding_window_perplexity(model, ids, window, stride)
            perplexities.append(result["perplexity"])
            total_nll += result["nll"] * result["tokens"]
            total_tokens += result["tokens"]
        return {
            "perplexities": perplexities,
            "mean_perplexity": sum(perplexities) / len(perplexities),
            "perplexity": math.exp(total_nll / total_tokens),
            "tokens": total_tokens,
        }
