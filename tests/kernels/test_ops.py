"""`hf_yoco.kernels.ops`: the plain-mask check that decides between the attention kernels and PyTorch.

Every layer of one forward receives the same mask tensor, so the check (a `[T, S]` band and a host sync) runs once per
mask; a different mask, or the same one modified in place, is checked again.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_yoco.kernels import ops
from hf_yoco.kernels.utils import causal_band


def band(length: int, kv_length: int, window: int = 0) -> torch.Tensor:
    """Bottom-right causal (window) band as transformers' 4D bool mask `[1, 1, T, S]` (True = keep)."""
    return causal_band(length, kv_length, window, "cpu")[None, None]


@pytest.fixture
def band_checks(monkeypatch):
    """Counts the uncached band checks (`ops._band_matches`), starting from an empty cache."""
    monkeypatch.setattr(ops, "_plain_mask_cache", None)
    calls = []
    original = ops._band_matches

    def counted(*args):
        calls.append(args[1:])
        return original(*args)

    monkeypatch.setattr(ops, "_band_matches", counted)
    return calls


@pytest.mark.parametrize(("length", "kv_length", "window"), [(6, 6, 0), (3, 9, 0), (7, 7, 3), (2, 10, 4)])
def test_plain_masks_are_recognized(length, kv_length, window):
    mask = band(length, kv_length, window)
    assert ops._band_matches(mask, length, kv_length, window)
    float_mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert ops._band_matches(float_mask, length, kv_length, window)
    assert not ops._band_matches(band(length, kv_length, window + 1), length, kv_length, window)
    custom = mask.clone()
    custom[..., -1, -1] = False  # the last query without itself
    assert not ops._band_matches(custom, length, kv_length, window)


def test_mask_check_runs_once_per_mask(band_checks):
    mask = band(5, 5)
    assert all(ops._mask_is_plain(mask, 5, 5, 0) for _ in range(4))  # four layers, one check
    assert len(band_checks) == 1
    assert not ops._mask_is_plain(mask, 5, 5, 3)  # another window: checked again
    assert ops._mask_is_plain(band(5, 5), 5, 5, 0)  # an equal but new tensor: checked again
    assert len(band_checks) == 3
    assert not ops._mask_is_plain(mask, 4, 5, 0)  # shape mismatch: refused before any band check
    assert len(band_checks) == 3


def test_modified_mask_is_checked_again(band_checks):
    mask = band(5, 5)
    assert ops._mask_is_plain(mask, 5, 5, 0)
    mask[..., 0] = False  # in place, as a padded batch would: bumps the version counter
    assert not ops._mask_is_plain(mask, 5, 5, 0)
    assert not ops._mask_is_plain(mask, 5, 5, 0)
    mask[..., 0] = band(5, 5)[..., 0]  # restored in place
    assert ops._mask_is_plain(mask, 5, 5, 0)
    assert len(band_checks) == 3
    view = mask[:, :, :, :]
    view[..., 1, 1] = False  # through a view: shares the version counter
    assert not ops._mask_is_plain(mask, 5, 5, 0)
    assert len(band_checks) == 4


def test_inference_tensors_are_always_checked(band_checks):
    with torch.inference_mode():
        mask = band(4, 4)
        assert ops._mask_is_plain(mask, 4, 4, 0)
        mask[..., 0] = False
        assert not ops._mask_is_plain(mask, 4, 4, 0)
    assert len(band_checks) == 2


# ---------------------------------------------------------------------------------------------- auto fallback


def _yoco(self_decoder_type: str, backend: str):
    from hf_yoco import YocoConfig, YocoForCausalLM

    config = YocoConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, self_decoder_type=self_decoder_type, retention_chunk_size=16,
        sliding_window=8 if self_decoder_type == "sliding_window" else None, kernel_backend=backend,
    )  # fmt: skip
    torch.manual_seed(0)
    return YocoForCausalLM(config).eval()


LAUNCHERS = {  # op -> (module, launcher) that the tests make fail
    "gated_retention": ("hf_yoco.kernels.gated_retention.chunk", "chunk_gated_retention_fwd"),
    "attention": ("hf_yoco.kernels.sliding_window_attention.chunk", "attention_fwd"),
}


@pytest.fixture
def break_kernel(monkeypatch):
    """`break_kernel(op)`: make `kernel_backend="auto"` pick Triton for CPU tensors (as it does for CUDA ones) and the
    launcher of `op` fail the way a kernel that does not fit the GPU does; returns the list of launch attempts."""
    import importlib

    from triton.runtime.errors import OutOfResources

    from hf_yoco.models import modeling_common, modeling_yoco

    monkeypatch.setattr(ops, "use_triton", lambda backend, tensor: backend != "torch")
    monkeypatch.setattr(ops, "FAILED_KERNELS", {})
    for module in (modeling_common, modeling_yoco):  # past kernel_op's shortcut that keeps "auto" CPU on PyTorch
        monkeypatch.setattr(
            module, "kernel_op", lambda config, tensor, name: ops.dispatch(config.kernel_backend, name, tensor)
        )

    def break_op(op: str) -> list:
        attempts = []

        def out_of_resources(*args, **kwargs):
            attempts.append(op)
            raise OutOfResources(232448 + 1024, 232448, "shared memory")

        module, launcher = LAUNCHERS[op]
        monkeypatch.setattr(importlib.import_module(module), launcher, out_of_resources)
        return attempts

    return break_op


@pytest.mark.parametrize(
    ("self_decoder_type", "op"), [("gated_retention", "gated_retention"), ("sliding_window", "attention")]
)
def test_auto_warns_once_and_runs_pytorch_when_a_kernel_fails(break_kernel, self_decoder_type, op):
    attempts = break_kernel(op)
    ids = torch.randint(0, 64, (2, 70))  # longer than the fused recurrent kernel's range: the chunk kernel
    with torch.no_grad():
        expected = _yoco(self_decoder_type, "torch")(ids).logits
        model = _yoco(self_decoder_type, "auto")
        with pytest.warns(
            RuntimeWarning, match=rf"Triton kernel for `{op}` failed on cpu.*OutOfResources.*shared memory"
        ):
            torch.testing.assert_close(model(ids).logits, expected)
        assert attempts == [op]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: no second warning ...
            torch.testing.assert_close(model(ids).logits, expected)
        assert attempts == [op]  # ... and the failed kernel is not launched again on this device


def test_triton_backend_raises_when_a_kernel_fails(break_kernel):
    from triton.runtime.errors import OutOfResources

    break_kernel("gated_retention")
    with pytest.raises(OutOfResources, match="shared memory"), torch.no_grad():
        _yoco("gated_retention", "triton")(torch.randint(0, 64, (1, 70)))
