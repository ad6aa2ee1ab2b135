"""Model card templates (Jinja, rendered by `hf_yoco.hub.create_model_card` with `huggingface_hub.ModelCard`)."""
