"""AnyRes patch rules: HF image processors (anyres_processors) and vision models (anyres_models)."""

import importlib

for _sub in ("anyres_processors", "anyres_models"):
    try:
        importlib.import_module(f"vlmkernels.patching.{_sub}")
    except ModuleNotFoundError as _e:  # still being written
        if _e.name != f"vlmkernels.patching.{_sub}":
            raise
