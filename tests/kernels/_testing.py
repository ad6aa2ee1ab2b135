"""Helpers for the kernel tests (imported as a sibling module)."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_rmse(ref: torch.Tensor, tri: torch.Tensor) -> float:
    """Relative RMSE `||tri - ref||_2 / ||ref||_2` (fla's `assert_close` metric), in fp64."""
    ref, tri = ref.double(), tri.double()
    return ((tri - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def assert_close(name: str, ref: torch.Tensor, tri: torch.Tensor, ratio: float = 0.005) -> None:
    """Fail when the relative RMSE of `tri` against `ref` exceeds `ratio` (or either holds a NaN)."""
    assert not tri.isnan().any(), f"{name}: NaN in the kernel output"
    err = rel_rmse(ref, tri)
    assert err <= ratio, f"{name}: relative RMSE {err:.3e} > {ratio}"


def requires_triton() -> None:
    pytest.importorskip("triton")
