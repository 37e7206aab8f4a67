"""Loads a kernel family package: imports its submodules (each registers its ops' backends, fakes and
autograd on import) and gathers their public functions into the package's ``__all__``."""

from __future__ import annotations

import importlib


def load(package: str, submodules: tuple[str, ...], namespace: dict) -> list[str]:
    exported: list[str] = []
    for sub in submodules:
        try:
            mod = importlib.import_module(f"{package}.{sub}")
        except ModuleNotFoundError as e:  # a submodule still being written
            if e.name != f"{package}.{sub}":
                raise
            continue
        for name in mod.__all__:
            namespace[name] = getattr(mod, name)
            exported.append(name)
    return exported
