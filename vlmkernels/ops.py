"""Functional API: one function per op, each taking ``backend="auto"``.

Families export their public functions through ``__all__``; this module gathers them.
"""

from __future__ import annotations

import importlib

__all__: list[str] = []

for _fam in ("moe", "anyres", "qformer", "gated_fusion"):
    try:
        _mod = importlib.import_module(f"vlmkernels.{_fam}")
    except ModuleNotFoundError as _e:
        if _e.name != f"vlmkernels.{_fam}":
            raise
        continue
    for _name in getattr(_mod, "__all__", ()):
        globals()[_name] = getattr(_mod, _name)
        __all__.append(_name)
