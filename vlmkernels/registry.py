"""Backend registry: which implementations exist per op, which are usable here, and which one runs.

Backends are ``cuda`` (csrc, CUDA tensors), ``triton`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``cpu`` (csrc, CPU tensors) and ``reference`` (python_ref, anywhere).
A family module registers each implementation with :func:`register`; the op dispatcher in
:mod:`vlmkernels.library` calls :func:`select` with the op's input device.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("vlmkernels")

BACKENDS = ("cuda", "triton", "cpu", "reference")
# auto preference per device type; an op may override it (e.g. fused_moe prefers triton on CUDA)
DEFAULT_PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call."""


@dataclass
class Impl:
    fn: Callable
    devices: tuple[str, ...]


@dataclass
class OpEntry:
    name: str
    family: str
    impls: dict[str, Impl] = field(default_factory=dict)
    preference: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PREFERENCE))


_OPS: dict[str, OpEntry] = {}
_LOGGED: set[tuple[str, str, str]] = set()
_SELECTED: dict[tuple, tuple[str, Callable]] = {}  # (op, backend, device type, TRITON_INTERPRET) -> choice


def _entry(op: str) -> OpEntry:
    entry = _OPS.get(op)
    if entry is not None:  # hot path: every op call selects a backend
        return entry
    from .schemas import SCHEMAS

    if op not in _OPS:
        if op not in SCHEMAS:
            raise KeyError(f"unknown vlmkernels op {op!r}; schemas are defined in vlmkernels/schemas.py")
        _OPS[op] = OpEntry(op, SCHEMAS[op][0])
    return _OPS[op]


def register(op: str, backend: str, fn: Callable, *, devices: tuple[str, ...]) -> Callable:
    """Register ``fn`` as ``backend``'s implementation of ``op`` for the given device types."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _entry(op).impls[backend] = Impl(fn, tuple(devices))
    _SELECTED.clear()
    return fn


def set_preference(op: str, device_type: str, order: tuple[str, ...]) -> None:
    _entry(op).preference[device_type] = tuple(order)
    _SELECTED.clear()


# ---- availability -------------------------------------------------------------------------------

def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _ext_status(device_type: str) -> tuple[bool, str]:
    from . import _ext

    if _ext.C is None:
        return False, f"vlmkernels._C is not built ({_ext.IMPORT_ERROR})"
    if device_type == "cuda" and not _ext.has_cuda():
        return False, "vlmkernels._C was built without CUDA (no nvcc or VLMKERNELS_NO_CUDA=1 at build time)"
    return True, ""


@functools.lru_cache(maxsize=None)
def _triton_status(device_type: str, interpret: bool) -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a hard dependency on Linux
        return False, f"triton is not importable ({e})"
    if device_type == "cpu" and not interpret:
        return False, "triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return True, ""


def availability(op: str, backend: str, device_type: str) -> tuple[bool, str]:
    """(usable, reason-if-not) for ``backend`` on ``device_type`` tensors."""
    entry = _entry(op)
    impl = entry.impls.get(backend)
    if impl is None:
        return False, f"{op} has no {backend} implementation"
    if device_type not in impl.devices:
        return False, f"{backend} {op} takes {'/'.join(impl.devices)} tensors, not {device_type}"
    if backend in ("cuda", "cpu"):
        return _ext_status(device_type)
    if backend == "triton":
        return _triton_status(device_type, triton_interpret())
    return True, ""


def env_backend() -> str:
    return os.environ.get("VLMKERNELS_BACKEND", "auto") or "auto"


def select(op: str, backend: str, device_type: str) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device_type``.

    ``backend="auto"`` defers to ``VLMKERNELS_BACKEND`` and then to the preference order; a forced
    backend that cannot run raises :class:`BackendUnavailableError` naming the reason. The choice is
    made once per (op, backend, device type) in a process; :func:`reset` forgets it.
    """
    if backend == "auto":
        backend = env_backend()
        if backend != "auto" and backend not in BACKENDS:  # say where the bad name came from
            raise ValueError(f"VLMKERNELS_BACKEND must be 'auto' or one of {BACKENDS}, got {backend!r}")
    key = (op, backend, device_type, triton_interpret())
    hit = _SELECTED.get(key)
    if hit is None:
        hit = _SELECTED[key] = _select(op, backend, device_type)
    if backend == "auto" and (op, device_type, hit[0]) not in _LOGGED:
        _LOGGED.add((op, device_type, hit[0]))
        log.info("vlmkernels.%s on %s: auto selected backend %r", op, device_type, hit[0])
    return hit


def _select(op: str, backend: str, device_type: str) -> tuple[str, Callable]:
    entry = _entry(op)
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        ok, why = availability(op, backend, device_type)
        if not ok:
            raise BackendUnavailableError(f"vlmkernels.{op}: backend {backend!r} is unavailable: {why}")
        return backend, entry.impls[backend].fn
    for name in entry.preference.get(device_type, ("reference",)):
        if availability(op, name, device_type)[0]:
            return name, entry.impls[name].fn
    raise BackendUnavailableError(f"vlmkernels.{op}: no backend can run on {device_type} tensors")


def reset() -> None:
    """Forget the cached backend choices (after registering an implementation or changing what is
    available, e.g. ``TRITON_INTERPRET``)."""
    _SELECTED.clear()
    _triton_status.cache_clear()


def ops() -> dict[str, OpEntry]:
    from .schemas import SCHEMAS

    for name in SCHEMAS:
        _entry(name)
    return dict(_OPS)


def backends() -> dict[str, dict[str, dict[str, str]]]:
    """``{op: {backend: {device: "yes" | reason}}}`` for every registered op."""
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    table: dict[str, dict[str, dict[str, str]]] = {}
    for name, entry in ops().items():
        row = {}
        for backend in BACKENDS:
            row[backend] = {}
            for dev in devices:
                ok, why = availability(name, backend, dev)
                row[backend][dev] = "yes" if ok else why
        table[name] = row
    return table


def format_backends(table: dict | None = None) -> str:
    table = table if table is not None else backends()
    lines = [f"{'op':<24} {'backend':<10} {'device':<6} available"]
    for op, row in table.items():
        for backend, per_dev in row.items():
            for dev, status in per_dev.items():
                lines.append(f"{op:<24} {backend:<10} {dev:<6} {status}")
    return "\n".join(lines)
