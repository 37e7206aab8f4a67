"""What every Triton launcher of the package does around its launches.

Triton launches on the *current* CUDA device and stream, whatever device the arguments live on, so
a model split across cards (``device_map="auto"``) would launch layer 2's kernel on card 0 with
card 1's pointers. Every launcher is therefore decorated with :func:`launcher`, which makes its first
argument's card current while it runs.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def device_of(t: torch.Tensor) -> torch.device:
    """The device a launch for ``t`` must run on (a seam: the tests fake a second card here)."""
    return t.device


def on_device(t: torch.Tensor):
    """Context making ``t``'s CUDA device current for the launches inside it; a no-op for CPU
    tensors (the Triton interpreter)."""
    dev = device_of(t)
    if dev.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def launcher(fn):
    """Decorates a launcher whose first argument is a tensor on the device to launch on."""
    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        with on_device(first):
            return fn(first, *args, **kwargs)

    return run
