"""`python -m vlmkernels`: versions, compiled archs, visible device and the backend table."""

from __future__ import annotations

import importlib


def _version(mod: str) -> str:
    try:
        return importlib.import_module(mod).__version__
    except Exception as e:
        return f"not importable ({type(e).__name__})"


def main() -> None:
    import torch

    import vlmkernels
    from vlmkernels import _ext

    print(f"vlmkernels   {vlmkernels.__version__}")
    for mod in ("torch", "triton", "transformers"):
        print(f"{mod:<12} {_version(mod)}")
    if _ext.C is None:
        print(f"_C           not built: {_ext.IMPORT_ERROR}")
    else:
        archs = ", ".join(f"sm_{a.replace('.', '')}" for a in _ext.cuda_archs() if a) or "none (CPU-only build)"
        print(f"_C           built; CUDA archs: {archs}")
    if torch.cuda.is_available():
        i = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(i)
        print(f"device       cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print(f"device       cpu ({torch.get_num_threads()} threads); no CUDA device visible")
    print()
    print(vlmkernels.format_backends())


if __name__ == "__main__":
    main()
