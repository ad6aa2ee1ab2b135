"""Gated retention (YOCO's gRet, fla's simple GLA): `S_t = exp(g_t) S_{t-1} + k_t^T v_t`, `o_t = scale * q_t S_t`.

Only the PyTorch references are exported here (no triton import); the Triton entry points live in `chunk.py`
(`chunk_gated_retention`, training / prefill) and `fused_recurrent.py` (`fused_recurrent_gated_retention`, decode).
"""

from .naive import naive_recurrent_gated_retention

__all__ = ["naive_recurrent_gated_retention"]
