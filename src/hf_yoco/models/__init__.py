"""Model definitions. Each model's files are flat siblings so that `save_pretrained` can ship them as remote code."""
