"""One module per kernel family (plus ``e2e``), each exposing ``cases(full, device) -> list[Case]``
and ``smoke_cases(device) -> list[Case]`` (one tiny case, for tests/test_bench_smoke.py).

A module dropped in this folder is a suite: :func:`discover` finds it, nothing else lists it.
"""

import pkgutil

HELPERS = ("common",)


def discover() -> list[str]:
    """Suite names, families alphabetically and ``e2e`` last."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in HELPERS)
    return [n for n in names if n != "e2e"] + (["e2e"] if "e2e" in names else [])
