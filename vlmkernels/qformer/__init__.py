"""The qformer kernel family: functional API, backend registration, fakes and autograd.

Each submodule registers its ops' implementations on import and lists its public functions in
``__all__``.
"""

from .._family import load as _load

SUBMODULES = ("attention", "cross_kv", "linear")
__all__: list[str] = _load(__name__, SUBMODULES, globals())
