"""AnyRes patch rules: HF image processors (anyres_processors), vision models (anyres_models) and
python_ref's uint8 tilers (anyres_tilers)."""

import importlib

for _sub in ("anyres_processors", "anyres_models", "anyres_tilers"):
    try:
        importlib.import_module(f"vlmkernels.patching.{_sub}")
    except ModuleNotFoundError as _e:  # still being written
        if _e.name != f"vlmkernels.patching.{_sub}":
            raise
