"""Loads the compiled extension ``vlmkernels._C`` if it was built; never raises on import."""

from __future__ import annotations

C = None
IMPORT_ERROR: str | None = None

try:
    import torch  # noqa: F401  (the extension links against libtorch)

    from . import _C as C  # type: ignore[attr-defined,no-redef]
except Exception as e:  # a missing or stale build must not break `import vlmkernels`
    C = None
    IMPORT_ERROR = f"{type(e).__name__}: {e}"


def has_cuda() -> bool:
    return bool(C is not None and getattr(C, "with_cuda", False))


def cuda_archs() -> list[str]:
    return list(getattr(C, "cuda_archs", "").split(";")) if has_cuda() else []


def require():
    """The extension module, or a clear error saying why it is missing."""
    if C is None:
        raise RuntimeError(
            "vlmkernels._C is not available: "
            f"{IMPORT_ERROR}. Reinstall with `pip install --no-build-isolation .`"
        )
    return C
