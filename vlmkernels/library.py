"""Defines ``torch.ops.vlmkernels.*`` from :mod:`vlmkernels.schemas` and routes calls to backends.

The CPU and CUDA dispatch keys both land in :func:`_dispatcher`, which reads the trailing
``backend`` argument and calls the implementation chosen by :func:`vlmkernels.registry.select`.
Fakes (for ``torch.compile``/opcheck) and autograd formulas are attached by the family modules
through :func:`register_fake` and :func:`register_autograd`.
"""

from __future__ import annotations

import torch

from . import registry
from .schemas import SCHEMAS

NAMESPACE = "vlmkernels"
_lib = torch.library.Library(NAMESPACE, "DEF")


def _first_tensor_device(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
        if isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    return b.device.type
    return "cpu"


def _with_defaults(name: str, args: tuple) -> tuple:
    """The dispatcher drops trailing arguments equal to their schema default: put them back."""
    schema_args = op(name).default._schema.arguments
    if len(args) >= len(schema_args):
        return args
    return tuple(args) + tuple(_default(a) for a in schema_args[len(args):])


# c10::ScalarType codes of the dtypes a schema default can name (defaults come back as ints)
_SCALAR_TYPE_CODES = {5: torch.float16, 6: torch.float32, 7: torch.float64, 15: torch.bfloat16,
                      3: torch.int32, 4: torch.int64, 11: torch.bool}


def _default(arg):
    value = arg.default_value
    # a ScalarType argument's ``type`` is int; its ``real_type`` says ScalarType
    if isinstance(value, int) and str(getattr(arg, "real_type", "")) == "ScalarType":
        return _SCALAR_TYPE_CODES[value]
    return value


def _dispatcher(name: str):
    def run(*args):
        *op_args, backend = _with_defaults(name, args)
        _, fn = registry.select(name, backend, _first_tensor_device(op_args))
        return fn(*op_args)

    run.__name__ = f"{name}_dispatch"
    return run


for _name, (_family, _schema) in SCHEMAS.items():
    _lib.define(_name + _schema)
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _dispatcher(_name), _key)


def op(name: str):
    """The ``torch.ops.vlmkernels.<name>`` overload packet."""
    return getattr(getattr(torch.ops, NAMESPACE), name)


def qualname(name: str) -> str:
    return f"{NAMESPACE}::{name}"


def register_fake(name: str):
    return torch.library.register_fake(qualname(name))


def register_autograd(name: str, backward, setup_context):
    torch.library.register_autograd(qualname(name), backward, setup_context=setup_context)
