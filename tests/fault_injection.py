"""Run `hf_yoco.training.train` and kill the process with SIGKILL at a chosen point (used by test_faults.py).

    python tests/fault_injection.py step N -- <train flags>          # inside the forward of optimizer step N + 1
    python tests/fault_injection.py checkpoint N -- <train flags>    # while checkpoint-N's optimizer.pt is written

SIGKILL cannot be caught: nothing of hf_yoco or the Trainer runs after it, as after a crash or an OOM kill.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from transformers import TrainerCallback

from hf_yoco.training import parse_args, train


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillInsideStep(TrainerCallback):
    """SIGKILL from inside the forward pass of the optimizer step that follows `step` completed steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.register_forward_hook(lambda *_: die())


def kill_while_writing_checkpoint(step: int) -> None:
    """SIGKILL after half of checkpoint-`step`'s optimizer.pt is on disk (the weights are already written)."""
    save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt") and f"checkpoint-{step}" in str(f):
            with open(f, "wb") as file:
                file.write(b"\x80\x02 half an optimizer state")
                file.flush()
            die()
        return save(obj, f, *args, **kwargs)

    torch.save = torn_save


if __name__ == "__main__":
    where, step, separator, *flags = sys.argv[1:]
    assert separator == "--" and where in ("step", "checkpoint")
    callbacks = [KillInsideStep(int(step))] if where == "step" else []
    if where == "checkpoint":
        kill_while_writing_checkpoint(int(step))
    train(parse_args(flags), callbacks=callbacks)
    sys.exit("the run was expected to be killed")
