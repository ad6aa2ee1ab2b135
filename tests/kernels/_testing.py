"""Helpers for the kernel tests (imported as a sibling module)."""

from __future__ import annotations

import contextlib
import math
import sys

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


class GuardMemory:
    """Out-of-bounds detector for the Triton interpreter, which never faults on a bad pointer.

    `guard(t)` copies an input into the middle of a buffer three times its size whose margins hold NaN (floats) or a
    sentinel (integers); inside `allocations()`, every tensor the kernels' launchers allocate (`torch.empty`,
    `torch.empty_like`, `Tensor.new_empty`) is such a view too, its interior NaN as well, so an element a kernel
    forgets to write stays NaN. `check()` then fails if any margin changed (an out-of-bounds write) or an allocated
    output still holds NaN; an out-of-bounds read of a NaN margin shows up as NaN in the outputs.
    """

    SENTINEL = -7  # integer margins (an out-of-bounds read of an index goes wild, so only writes are detected)

    def __init__(self) -> None:
        self.buffers: list[tuple[str, torch.Tensor, int, int, bool]] = []  # name, buffer, start, numel, is_output

    def _new(self, shape, dtype, device, name: str, is_output: bool) -> torch.Tensor:
        numel = math.prod(shape)
        margin = max(2 * numel, 1 << 16)  # wider than any tile that overruns a row
        fill = float("nan") if dtype.is_floating_point else self.SENTINEL
        buffer = torch.full((numel + 2 * margin,), fill, dtype=dtype, device=device)
        self.buffers.append((name, buffer, margin, numel, is_output))
        return buffer[margin : margin + numel].view(shape)

    def guard(self, tensor: torch.Tensor | None, name: str = "input") -> torch.Tensor | None:
        """`tensor`'s values in a guarded buffer (a leaf that requires grad if `tensor` did)."""
        if tensor is None:
            return None
        view = self._new(tuple(tensor.shape), tensor.dtype, tensor.device, name, is_output=False)
        view.copy_(tensor.detach())
        return view.requires_grad_(tensor.requires_grad)

    @contextlib.contextmanager
    def allocations(self):
        """Route the launchers' output allocations to guarded buffers (only while the kernels run)."""
        empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

        def from_kernels() -> bool:  # only the launchers' allocations, not triton's or torch's own
            return sys._getframe(2).f_globals.get("__name__", "").startswith("hf_yoco.kernels")

        def shape_of(size: tuple) -> tuple:
            return tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)

        def guarded_empty(*size, dtype=None, device=None, **kwargs):
            if not from_kernels():
                return empty(*size, dtype=dtype, device=device, **kwargs)
            return self._new(shape_of(size), dtype or torch.get_default_dtype(), device or "cpu", "empty", True)

        def guarded_empty_like(tensor, *, dtype=None, device=None, **kwargs):
            if not from_kernels():
                return empty_like(tensor, dtype=dtype, device=device, **kwargs)
            return self._new(tuple(tensor.shape), dtype or tensor.dtype, device or tensor.device, "empty_like", True)

        def guarded_new_empty(tensor, *size, dtype=None, device=None, **kwargs):
            if not from_kernels():
                return new_empty(tensor, *size, dtype=dtype, device=device, **kwargs)
            return self._new(shape_of(size), dtype or tensor.dtype, device or tensor.device, "new_empty", True)

        torch.empty, torch.empty_like, torch.Tensor.new_empty = guarded_empty, guarded_empty_like, guarded_new_empty
        try:
            yield self
        finally:
            torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty

    def check(self) -> None:
        for name, buffer, start, numel, is_output in self.buffers:
            margins = torch.cat([buffer[:start], buffer[start + numel :]])
            if buffer.is_floating_point():
                changed = int((~margins.isnan()).sum())
            else:
                changed = int((margins != self.SENTINEL).sum())
            assert changed == 0, f"{name}: {changed} element(s) written out of bounds"
            if is_output and buffer.is_floating_point():
                unwritten = int(buffer[start : start + numel].isnan().sum())
                assert unwritten == 0, (
                    f"{name} {tuple(buffer[start : start + numel].shape)}: {unwritten} never written"
                )


@contextlib.contextmanager
def loop_overrun(*modules, extra: int = 2):
    """Run every `range` loop with a runtime trip count inside the Triton kernels of `modules` for `extra` more
    iterations.

    A compiler that software-pipelines a loop (`num_stages > 1`) issues the loads of the next iterations before it
    knows they exist; the interpreter never does. A kernel is safe only if every access of an iteration outside its
    loop's range is masked off, and such iterations must then change nothing (masked loads give zeros). Under this
    context the interpreter executes those iterations, so `GuardMemory` sees any access they make.
    """
    import builtins

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    kernels = set()  # (file, name): the interpreter runs a rewritten copy of each kernel, not its code object
    for module in modules:
        for value in vars(module).values():
            while isinstance(value, Autotuner):
                value = value.fn
            if isinstance(value, InterpretedFunction):
                kernels.add((value.fn.__code__.co_filename, value.fn.__name__))
    assert kernels, "no interpreted kernels found (is TRITON_INTERPRET=1 set?)"

    def overrunning_range(*args):
        loop = builtins.range(*args)
        caller = sys._getframe(1).f_code
        if (caller.co_filename, caller.co_name) not in kernels or all(isinstance(a, int) for a in args):
            return loop  # not a kernel loop, or a compile-time trip count (constexpr bounds), which is exact
        return builtins.range(loop.start, loop.stop + extra * loop.step, loop.step)

    for module in modules:
        module.range = overrunning_range
    try:
        yield
    finally:
        for module in modules:
            del module.range
