"""Reference (pure PyTorch) definition of every fused op; the ground truth for parity tests.

Each family's file exports its functions through ``__all__``; they are gathered here.
"""

import importlib

__all__: list[str] = []
for _mod_name in ("moe", "moe_experts", "anyres", "anyres_embed", "linear_epilogue", "fusion_gates", "qformer"):
    try:
        _mod = importlib.import_module(f"python_ref.ops.{_mod_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"python_ref.ops.{_mod_name}":
            raise
        continue
    for _n in _mod.__all__:
        globals()[_n] = getattr(_mod, _n)
        __all__.append(_n)
