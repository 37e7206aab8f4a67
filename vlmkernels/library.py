"""Defines ``torch.ops.vlmkernels.*`` from :mod:`vlmkernels.schemas` and routes calls to backends.

Ops with C++ kernels register them from C++ (``csrc/ops/``) at the ``CPU``, ``CUDA`` and
``Autograd`` keys, so a call on CPU or CUDA tensors runs C++ from the dispatcher on: no Python, no
per-call backend selection. Only a call that forces a backend the C++ kernel is not (``triton``,
``reference``, by argument or ``VLMKERNELS_BACKEND``) comes back to :func:`_run_python_backend`,
which selects it in :mod:`vlmkernels.registry`. Every (op, key) left without a C++ kernel (Triton
and reference ops, or all of them when ``vlmkernels._C`` is not built) gets a Python impl that does
the same. Fakes (for ``torch.compile``/opcheck) and Python autograd formulas are attached by the
family modules through :func:`register_fake` and :func:`register_autograd`.
"""

from __future__ import annotations

import torch

from . import _ext, registry
from .schemas import SCHEMAS

NAMESPACE = "vlmkernels"
_lib = torch.library.Library(NAMESPACE, "DEF")


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def op(name: str):
    """The ``torch.ops.vlmkernels.<name>`` overload packet."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def cpp_kernel(name: str, key: str) -> bool:
    """Whether ``vlmkernels._C`` registered a C++ kernel for ``name`` at dispatch key ``key``."""
    return _ext.C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(qualname(name), key)


def _first_tensor_device(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device.type
    return "cpu"


def _run_python_backend(name: str, *args):
    """Runs ``name`` with the backend its trailing ``backend`` argument selects (C++ calls this too)."""
    *op_args, backend = args
    return registry.select(name, backend, _first_tensor_device(op_args))[1](*op_args)


# c10::ScalarType codes of the dtypes a schema default can name (defaults come back as ints)
_SCALAR_TYPE_CODES = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16,
                      3: torch.int32, 4: torch.int64, 11: torch.bool}
_DTYPE_CODES = {dtype: code for code, dtype in _SCALAR_TYPE_CODES.items()}


def dtype_arg(dtype):
    """A ``ScalarType`` argument as torch.ops converts it fastest: its int code (a ``torch.dtype``
    costs ~0.7 us more per call to convert); anything else is passed on for the op to reject."""
    return _DTYPE_CODES.get(dtype, dtype)


def _default(arg):
    value = arg.default_value
    # a ScalarType argument's ``type`` is int; its ``real_type`` says ScalarType
    if isinstance(value, int) and str(getattr(arg, "real_type", "")) == "ScalarType":
        return _SCALAR_TYPE_CODES[value]
    return value


def _dispatcher(name: str):
    """Python impl of ``name`` at a key without a C++ kernel. The dispatcher drops trailing arguments
    equal to their schema default: put them back (read once from the schema)."""
    schema_args = op(name).default._schema.arguments
    defaults = tuple(_default(a) for a in schema_args)
    n = len(schema_args)

    def run(*args):
        if len(args) < n:
            args = args + defaults[len(args):]
        return _run_python_backend(name, *args)

    run.__name__ = f"{name}_dispatch"
    return run


for _name, (_family, _schema) in SCHEMAS.items():
    _lib.define(_name + _schema)
    for _key in ("CPU", "CUDA"):
        if not cpp_kernel(_name, _key):
            _lib.impl(_name, _dispatcher(_name), _key)
if _ext.C is not None:
    _ext.C.set_python_backend(_run_python_backend)


def native_backend(name: str, backend: str):
    """The registry entry of a C++ backend (``cpu``/``cuda``): the op with that backend forced, which
    the C++ kernel registered at that key runs."""
    def run(*args):
        return op(name)(*args, backend)

    run.__name__ = f"{name}_{backend}"
    return run


def register_fake(name: str):
    return torch.library.register_fake(qualname(name))


def register_autograd(name: str, backward, setup_context):
    """Python autograd for ``name``, unless ``vlmkernels._C`` registered its C++ autograd (which a call
    that needs no gradient does not pay for); the Python formula then serves builds without it."""
    if not cpp_kernel(name, "Autograd"):
        torch.library.register_autograd(qualname(name), backward, setup_context=setup_context)
