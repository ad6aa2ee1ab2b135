"""Model cards and `push_to_hub` for hf_yoco models.

`create_model_card(model, ...)` renders the templates in `model_cards/` (installed as `hf_yoco.model_cards`) with
`huggingface_hub.ModelCard` / `ModelCardData`: architecture, how to load with and without the package, cache
memory against a same-size Transformer, and optional training / evaluation results.

`model.push_to_hub(repo_id)` on a YOCO or Block Transformer model uploads weights, config, the remote-code files and
this card (an existing card in the repository is kept).
"""

from __future__ import annotations

import os
import tempfile
from importlib import resources

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers import PreTrainedModel
from transformers.utils import hub as transformers_hub

BF16_BYTES = 2
CONTEXTS = (4096, 32768, 131072, 1048576)


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


def _context_label(tokens: int) -> str:
    return f"{tokens // 1048576}M" if tokens >= 1048576 else f"{tokens // 1024}K"


def _memory_rows(cache_bytes, transformer_bytes) -> list[dict[str, str]]:
    rows = []
    for tokens in CONTEXTS:
        ours, theirs = cache_bytes(tokens), transformer_bytes(tokens)
        rows.append(
            {
                "context": _context_label(tokens),
                "yoco": _human(ours),
                "llama": _human(theirs),
                "ratio": f"{theirs / ours:.1f}x smaller",
            }
        )
    return rows


def _yoco_variables(config) -> dict:
    from .models.modeling_yoco import yoco_cache_bytes

    half = config.num_self_decoder_layers
    kv_per_token = 2 * config.num_key_value_heads * config.head_dim * BF16_BYTES
    if config.self_decoder_type == "sliding_window":
        description = f"sliding-window attention over the last {config.sliding_window} tokens"
        state_description = f"window of {config.sliding_window - 1} keys/values in each self-decoder layer"
        if config.attention_sink_tokens:
            description += f" and the first {config.attention_sink_tokens} (attention sinks)"
            state_description += f" plus {config.attention_sink_tokens} sinks"
    else:
        heads = config.num_retention_heads or config.num_attention_heads
        description = f"gated retention with {heads} heads (a gated linear recurrence with a constant-size state)"
        state_description = (
            f"{heads}x{config.retention_head_dim}x{config.retention_head_dim} fp32 state per self layer"
        )
    if config.official_numerics:
        numerics = "official YOCO (embeddings x sqrt(d), interleaved RoPE with `theta ** -linspace(0, 1, d/2)`)"
    else:
        numerics = f"Llama-style RoPE ({config.rope_parameters.get('rope_type', 'default')}, theta {config.rope_parameters['rope_theta']:g})"
    return {
        "num_layers": config.num_hidden_layers,
        "num_self": half,
        "num_cross": config.num_hidden_layers - half,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "self_decoder_description": description,
        "self_state_description": state_description,
        "kv_bytes_per_token": kv_per_token,
        "numerics": numerics,
        "stateful": config.self_decoder_type == "gated_retention",
        "memory_rows": _memory_rows(
            lambda n: yoco_cache_bytes(config, n, kv_bytes=BF16_BYTES)["total"],
            lambda n: n * kv_per_token * config.num_hidden_layers,
        ),
    }


def _block_transformer_variables(config) -> dict:
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    kv_per_position = 2 * config.num_key_value_heads * head_dim * BF16_BYTES
    local_positions = config.num_prefix_tokens + config.block_length
    total_layers = config.num_block_decoder_layers + config.num_token_decoder_layers

    def cache_bytes(tokens: int) -> float:
        blocks = tokens // config.block_length
        local = config.num_token_decoder_layers * local_positions * kv_per_position
        return config.num_block_decoder_layers * blocks * kv_per_position + local

    return {
        "block_length": config.block_length,
        "num_prefix_tokens": config.num_prefix_tokens,
        "num_block_layers": config.num_block_decoder_layers,
        "num_token_layers": config.num_token_decoder_layers,
        "total_layers": total_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "layer_style": config.layer_style,
        "vocab_size": config.vocab_size,
        "local_positions": local_positions,
        "memory_rows": _memory_rows(cache_bytes, lambda n: n * kv_per_position * total_layers),
    }


TEMPLATES = {
    "hf_yoco": ("yoco.md", _yoco_variables, ["yoco", "hf_yoco", "decoder-decoder", "long-context"]),
    "hf_yoco_block_transformer": (
        "block_transformer.md",
        _block_transformer_variables,
        ["block-transformer", "hf_yoco", "global-to-local"],
    ),
}


def create_model_card(
    model: PreTrainedModel,
    repo_id: str | None = None,
    *,
    description: str = "",
    license: str = "mit",
    language: str | list[str] | None = "en",
    base_model: str | None = None,
    datasets: list[str] | None = None,
    eval_results: dict[str, float] | None = None,
    eval_dataset: str | None = None,
    training_summary: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """Render the hf_yoco model card for `model`.

    Args:
        model: a YOCO or Block Transformer model (`config.model_type` "hf_yoco" or "hf_yoco_block_transformer").
        repo_id: Hub repository the card is written for (used in the loading snippets).
        description: free text placed under the title.
        license, language, base_model, datasets: card metadata.
        eval_results: metric name -> value (e.g. `{"perplexity": 12.3}`) measured on `eval_dataset`.
        training_summary: free text for a "Training" section (e.g. steps, tokens, final loss).
        tags: extra tags.
    """
    model_type = model.config.model_type
    if model_type not in TEMPLATES:
        raise ValueError(f"`model.config.model_type` must be one of {sorted(TEMPLATES)}, got {model_type!r}.")
    template_name, variables_fn, default_tags = TEMPLATES[model_type]
    model_name = repo_id.split("/")[-1] if repo_id else f"{type(model).__name__} ({model_type})"
    results = None
    eval_rows = []
    if eval_results:
        if not eval_dataset:
            raise ValueError("`eval_dataset` must name the dataset the `eval_results` were measured on.")
        results = [
            EvalResult(
                task_type="text-generation",
                dataset_type=eval_dataset,
                dataset_name=eval_dataset,
                metric_type=name,
                metric_value=value,
            )
            for name, value in eval_results.items()
        ]
        eval_rows = [{"dataset": eval_dataset, "metric": k, "value": f"{v:.4g}"} for k, v in eval_results.items()]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        language=language,
        base_model=base_model,
        datasets=datasets,
        tags=sorted({*default_tags, *(tags or [])}),
        model_name=model_name,
        eval_results=results,
    )
    template = resources.files("hf_yoco.model_cards").joinpath(template_name).read_text(encoding="utf-8")
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        repo_id=repo_id or "path/to/checkpoint",
        description=description,
        num_parameters=f"{model.num_parameters():,}",
        training_summary=training_summary,
        eval_rows=eval_rows,
        **variables_fn(model.config),
    )


def push_to_hub_with_card(
    model: PreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
    **card_kwargs,
) -> str:
    """`PreTrainedModel.push_to_hub` with the hf_yoco model card (kept if the repository already has one)."""
    api = transformers_hub.hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    if api.file_exists(repo_id, "README.md", revision=revision, token=token):  # keep the repository's own card
        card = ModelCard.load(api.hf_hub_download(repo_id, "README.md", revision=revision, token=token))
        card.data.tags = sorted({*(card.data.tags or []), *(tags or [])})
    else:
        card = create_model_card(model, repo_id, tags=tags, **card_kwargs)
    with tempfile.TemporaryDirectory() as tmp_dir:
        model.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
        card.save(os.path.join(tmp_dir, "README.md"))
        return model._upload_modified_files(
            tmp_dir,
            repo_id,
            files_timestamps={},
            commit_message=commit_message,
            token=token,
            create_pr=create_pr,
            revision=revision,
            commit_description=commit_description,
        )
