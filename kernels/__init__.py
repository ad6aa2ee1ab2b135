"""Triton kernels for hf_yoco, installed as `hf_yoco.kernels`. Importing this package never imports triton."""
