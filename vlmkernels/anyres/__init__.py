"""The anyres kernel family: functional API, backend registration, fakes and autograd.

Each submodule registers its ops' implementations on import and lists its public functions in
``__all__``.
"""

import importlib as _importlib

__all__: list[str] = []
SUBMODULES = ("plan", "tile", "embed", "pack", "encode")
for _sub in SUBMODULES:
    try:
        _mod = _importlib.import_module(f"{__name__}.{_sub}")
    except ModuleNotFoundError as _e:  # still being written
        if _e.name != f"{__name__}.{_sub}":
            raise
        continue
    for _n in _mod.__all__:
        globals()[_n] = getattr(_mod, _n)
        __all__.append(_n)
