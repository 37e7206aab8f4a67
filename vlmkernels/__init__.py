"""vlmkernels: fused kernels for vision-language models.

``torch.ops.vlmkernels.*`` are defined on import; ``vlmkernels.ops`` is the functional API;
``vlmkernels.patch(model)`` swaps accelerated forwards onto a model's instances.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from . import library  # noqa: E402,F401  (defines torch.ops.vlmkernels.*)
from .patching import PatchReport, patch, unpatch  # noqa: E402
from .registry import BackendUnavailableError, backends, format_backends  # noqa: E402

# Each family module registers its backends, fakes and autograd when imported.
FAMILY_MODULES = ("moe", "anyres", "qformer", "gated_fusion")
for _fam in FAMILY_MODULES:
    try:
        importlib.import_module(f"vlmkernels.{_fam}")
    except ModuleNotFoundError as _e:  # a family that has not landed yet
        if _e.name != f"vlmkernels.{_fam}":
            raise

from . import ops  # noqa: E402

__all__ = ["__version__", "ops", "patch", "unpatch", "PatchReport", "backends", "format_backends",
           "BackendUnavailableError"]
