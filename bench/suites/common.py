"""Helpers the suites share: which of our backends can be timed here, compiled providers, dtypes."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def functional(name: str):
    """``vlmkernels.ops.<name>``, or None (with a message) while that op has not landed."""
    try:
        import vlmkernels.ops as ops
    except Exception as e:  # noqa: BLE001 - a broken family must not stop the other suites
        log(f"  skip {name}: vlmkernels.ops is not importable ({type(e).__name__}: {e})")
        return None
    fn = getattr(ops, name, None)
    if fn is None:
        log(f"  skip {name}: vlmkernels.ops.{name} has not landed yet")
    return fn


def reference(name: str):
    """``python_ref.ops.<name>`` or None."""
    try:
        import python_ref.ops as ref
    except Exception as e:  # noqa: BLE001
        log(f"  python_ref.ops is not importable ({type(e).__name__}: {e})")
        return None
    return getattr(ref, name, None)


def our_backends(op: str, device: str, *, include_reference: bool | None = None) -> list[str]:
    """Backends of ``op`` that can run on ``device`` tensors, never the Triton interpreter.

    ``reference`` (python_ref behind the op dispatcher) duplicates the python_ref provider, so by
    default it is timed only when it is the op's one backend here.
    """
    try:
        from vlmkernels import registry
    except Exception:  # noqa: BLE001
        return []
    names = []
    for b in ("cuda", "triton", "cpu", "reference"):
        if b == "reference" and include_reference is False:
            continue
        if b == "reference" and include_reference is None and names:
            continue
        if b == "triton" and (device != "cuda" or registry.triton_interpret()):
            continue
        try:
            ok, _ = registry.availability(op, b, device)
        except KeyError:
            return []
        if ok:
            names.append(b)
    return names


def compile_modes(full: bool, device: str) -> list[str]:
    """torch.compile default always; max-autotune too in --full (its tuning takes minutes per shape,
    more than the whole quick run may take)."""
    # no-cudagraphs: the harness captures its own CUDA graph around every provider
    return ["default", "max-autotune-no-cudagraphs"] if full else ["default"]


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, mode: str) -> Callable:
    """One compiled wrapper per (function, mode), shared across shapes so recompiles stay few."""
    if mode == "default":
        return torch.compile(fn)
    return torch.compile(fn, mode=mode)


def compile_provider_name(mode: str) -> str:
    return "torch.compile" if mode == "default" else "torch.compile-max-autotune"


def randn(shape, dtype, device, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Fresh random data, drawn on the device itself (weights can be GBs on the GPU)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(shape, generator=g, device=device) * scale).to(dtype)


def nbytes(*tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))
