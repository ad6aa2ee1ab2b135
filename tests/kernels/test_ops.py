"""`hf_yoco.kernels.ops`: the plain-mask check that decides between the attention kernels and PyTorch.

Every layer of one forward receives the same mask tensor, so the check (a `[T, S]` band and a host sync) runs once per
mask; a different mask, or the same one modified in place, is checked again.
"""

from __future__ import annotations

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
