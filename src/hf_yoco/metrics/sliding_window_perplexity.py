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
        from hf_yoco.evaluation import load_model_and_tokenizer, text_perplexity

        model, tokenizer = load_model_and_tokenizer(model_id, "float32")
        perplexities, total_nll, total_tokens = [], 0.0, 0
        for text in predictions:
            result = text_perplexity(model, tokenizer, text, window, stride, max_tokens)
            perplexities.append(result["perplexity"])
            total_nll += result["nll"] * result["tokens"]
            total_tokens += result["tokens"]
        return {
            "perplexities": perplexities,
            "mean_perplexity": sum(perplexities) / len(perplexities),
            "perplexity": math.exp(total_nll / total_tokens),
            "tokens": total_tokens,
        }
