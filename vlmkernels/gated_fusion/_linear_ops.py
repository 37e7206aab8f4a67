"""What every GEMM-epilogue op of the qformer and gated_fusion families shares: argument checks that
name the argument, and the registration of an op with its backward op (backends, fakes, autograd).

Each op has one ``check`` function (metadata only, no device sync, so it also runs on fake tensors and
under ``torch.compile``) called by the functional API, every backend and the fake.
"""

from __future__ import annotations

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


def register_op(op: str, *, reference: Callable, triton: Callable | None, fake: Callable,
                backward_reference: Callable, backward_fake: Callable,
                setup_context: Callable, backward: Callable, backward_triton: Callable | None = None) -> None:
    """``op`` (reference + triton backends, triton preferred on CUDA) and ``op_backward`` (the reference
    formula; a triton backend where fusing its elementwise part into a GEMM epilogue saves passes, the
    GEMMs themselves with torch matmuls), their fakes, and autograd through the backward op."""
    bwd = f"{op}_backward"
    registry.register(op, "reference", reference, devices=("cpu", "cuda"))
    if triton is not None:
        registry.register(op, "triton", triton, devices=("cuda", "cpu"))
        registry.set_preference(op, "cuda", ("triton", "reference"))
    else:
        registry.set_preference(op, "cuda", ("reference",))
    registry.set_preference(op, "cpu", ("reference",))
    library.register_fake(op)(fake)
    registry.register(bwd, "reference", backward_reference, devices=("cpu", "cuda"))
    if backward_triton is not None:
        registry.register(bwd, "triton", backward_triton, devices=("cuda", "cpu"))
        registry.set_preference(bwd, "cuda", ("triton", "reference"))
    else:
        registry.set_preference(bwd, "cuda", ("reference",))
    registry.set_preference(bwd, "cpu", ("reference",))
    library.register_fake(bwd)(backward_fake)
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
