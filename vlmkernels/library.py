"""Defines ``torch.ops.vlmkernels.*`` from :mod:`vlmkernels.schemas` and routes calls to backends.

The CPU and CUDA dispatch keys both land in :func:`_dispatcher`, which reads the trailing
``backend`` argument and calls the implementation chosen by :func:`vlmkernels.registry.select`.
Fakes (for ``torch.compile``/opcheck) and autograd formulas are attached by the family modules
through :func:`register_fake` and :func:`register_autograd`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


def direct_cpu_call(op: str, backend: str, tensors) -> Callable | None:
    """The ``cpu`` implementation of ``op`` when an eager call may skip the torch.ops dispatcher.

    At a few thousand tokens the dispatcher round trip (Python dispatch, autograd wrapper, schema
    defaults) costs as much as the C++ kernel, so plain eager CPU calls that need no autograd go
    straight to the implementation ``registry.select`` picks. Anything else — tracing/compile,
    tensor subclasses (fake tensors), dispatch or torch-function modes, functorch transforms,
    inputs requiring grad, another backend — returns None and goes through ``torch.ops``.
    """
    if backend not in ("auto", "cpu") or torch.compiler.is_compiling():
        return None
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or t.device.type != "cpu" or (grad and t.requires_grad):
            return None
    if (_get_current_dispatch_mode() is not None or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return None
    name, fn = registry.select(op, backend, "cpu")
    return fn if name == "cpu" else None
