"""What every GEMM-epilogue op of the qformer and gated_fusion families shares: argument checks that
name the argument, and the registration of an op with its backward op (backends, fakes, autograd).

Each op has one ``check`` function (metadata only, no device sync, so it also runs on fake tensors and
under ``torch.compile``) called by the functional API, every backend and the fake.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch

from .. import library, registry

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ACTIVATIONS = ("none", "gelu", "gelu_tanh", "relu")
MAX_SEGMENTS = 5  # K segments / groups of one kernel launch


def check_tensor(op: str, name: str, t, *, dim: int | None = None, min_dim: int | None = None,
                 dtype: torch.dtype | None = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if min_dim is not None and t.dim() < min_dim:
        raise ValueError(f"{op}: {name} must have at least {min_dim} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOATS:
        raise TypeError(f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype} (the input's), got {t.dtype}")


def check_linear(op: str, x_name: str, x, w_name: str, weight, b_name: str, bias, *,
                 out_features: int | None = None) -> None:
    """``weight [N, K]`` with ``K == x.shape[-1]``, optional ``bias [N]``, all in ``x``'s dtype."""
    check_tensor(op, w_name, weight, dim=2, dtype=x.dtype)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{op}: {w_name} must be [N, K={x.shape[-1]}] ({x_name}'s last dim), "
                         f"got shape {tuple(weight.shape)}")
    if out_features is not None and weight.shape[0] != out_features:
        raise ValueError(f"{op}: {w_name} must have {out_features} rows, got shape {tuple(weight.shape)}")
    check_vector(op, b_name, bias, weight.shape[0], x.dtype)


def check_vector(op: str, name: str, t, n: int, dtype: torch.dtype) -> None:
    if t is None:
        return
    check_tensor(op, name, t, dim=1, dtype=dtype)
    if t.shape[0] != n:
        raise ValueError(f"{op}: {name} must have shape [{n}], got {tuple(t.shape)}")


def check_activation(op: str, activation, allowed: Sequence[str] = ACTIVATIONS) -> None:
    if activation not in allowed:
        raise ValueError(f"{op}: activation must be one of {tuple(allowed)}, got {activation!r}")


def check_list(op: str, name: str, items, n: int | None = None) -> None:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of Tensors, got {type(items).__name__}")
    if not items:
        raise ValueError(f"{op}: {name} must not be empty")
    if n is not None and len(items) != n:
        raise ValueError(f"{op}: {name} must have {n} entries (one per feature tensor), got {len(items)}")
    if len(items) > MAX_SEGMENTS:
        raise ValueError(f"{op}: at most {MAX_SEGMENTS} entries in {name}, got {len(items)}")


def check_groups(op: str, features, weights, biases) -> int:
    """``features``, ``weights`` (one per feature tensor) and ``biases`` (likewise, or None) are lists;
    returns their length."""
    check_list(op, "features", features)
    n = len(features)
    check_list(op, "weights", weights, n)
    if biases is not None:
        check_list(op, "biases", biases, n)
    return n


def check_devices(op: str, named: dict) -> None:
    devices = {}
    for name, t in named.items():
        if isinstance(t, (list, tuple)):
            for i, u in enumerate(t):
                if u is not None:
                    devices[f"{name}[{i}]"] = u.device
        elif t is not None:
            devices[name] = t.device
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {devices}")


def lazy(spec: str, *tail) -> Callable:
    """The function ``"package.module:name"``, imported on its first call (so ``import vlmkernels``
    imports neither python_ref nor Triton), called with the caller's arguments followed by ``tail``."""
    module, _, name = spec.partition(":")
    fn = None

    def run(*args):
        nonlocal fn
        if fn is None:
            fn = getattr(importlib.import_module(module), name)
        return fn(*args, *tail)

    run.__name__ = name
    return run


def _checked(check: Callable, fn, skip: int = 0) -> Callable:
    """``fn`` (a callable or a :func:`lazy` spec) after ``check`` on its arguments past the first ``skip``
    (a backward op's ``grad``, ...)."""
    fn = lazy(fn) if isinstance(fn, str) else fn

    def run(*args):
        check(*args[skip:])
        return fn(*args)

    run.__name__ = getattr(fn, "__name__", "run")
    return run


def _op_args(name: str) -> Callable:
    """``(args, kwargs)`` of a call to op ``name`` -> every argument but the trailing ``backend``, in schema
    order: a fake may be called with the trailing defaults dropped (read once from the schema)."""
    schema_args = library.op(name).default._schema.arguments[:-1]
    names = [a.name for a in schema_args]
    defaults = [library._default(a) for a in schema_args]

    def bind(args, kwargs):
        args = tuple(args[:len(names)])
        return args + tuple(kwargs.get(n, d) for n, d in zip(names[len(args):], defaults[len(args):]))

    return bind


def register_op(op: str, *, check: Callable, reference, triton, out_shape: Callable,
                backward_reference, backward_fake: Callable, setup_context: Callable, backward: Callable,
                backward_triton=None) -> None:
    """``op`` (reference + triton backends, triton preferred on CUDA) and ``op_backward`` (the reference
    formula; a triton backend where fusing its elementwise part into a GEMM epilogue saves passes, the
    GEMMs themselves with torch matmuls), their fakes, and autograd through the backward op.

    Backends are callables or :func:`lazy` specs (``"python_ref.ops.linear_epilogue:mlp_projector"``)
    taking the op's arguments without ``backend`` (the backward's with ``grad`` first); each runs after
    ``check`` (the one the functional API calls) on the forward's arguments, the reference ones without
    autograd. The fake runs ``check`` and returns an empty ``out_shape(*args)`` like the first tensor
    argument; ``backward_fake`` gets the backward op's arguments without ``backend``."""
    bwd = f"{op}_backward"
    # the backward's leading arguments (grad, the forward's output) are not checked
    lead = len(library.op(bwd).default._schema.arguments) - len(library.op(op).default._schema.arguments)
    for name, ref, tri, skip in ((op, reference, triton, 0), (bwd, backward_reference, backward_triton, lead)):
        registry.register(name, "reference", no_grad(_checked(check, ref, skip)), devices=("cpu", "cuda"))
        if tri is not None:
            registry.register(name, "triton", _checked(check, tri, skip), devices=("cuda", "cpu"))
        registry.set_preference(name, "cuda", ("triton", "reference") if tri is not None else ("reference",))
        registry.set_preference(name, "cpu", ("reference",))
    fwd_args, bwd_args = _op_args(op), _op_args(bwd)

    def fake(*args, **kwargs):
        args = fwd_args(args, kwargs)
        check(*args)
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        return first.new_empty(out_shape(*args))

    def fake_backward(*args, **kwargs):
        return backward_fake(*bwd_args(args, kwargs))

    library.register_fake(op)(fake)
    library.register_fake(bwd)(fake_backward)
    library.register_autograd(op, backward, setup_context)


def grads_for(ctx, grads, num_args: int) -> tuple:
    """One entry per schema argument (``num_args``, backend included): the gradients autograd asked for,
    ``None`` elsewhere. ``ctx.needs_input_grad`` covers only the arguments the call passed (the
    dispatcher drops trailing defaults)."""
    need = ctx.needs_input_grad
    out = [g if i < len(need) and need[i] else None for i, g in enumerate(grads)]
    return tuple(out + [None] * (num_args - len(out)))


def no_grad(fn: Callable) -> Callable:
    """A backend runs without recording autograd (its own backward op computes the gradients)."""
    def run(*args):
        with torch.no_grad():
            return fn(*args)

    run.__name__ = getattr(fn, "__name__", "run")
    return run
