"""Host overhead per op: the C++ entry called straight through pybind (no dispatcher) against the
same call through ``torch.ops.vlmkernels.*`` and through ``vlmkernels.ops``, with and without
inputs that require grad. The table reports each path's time *minus* the direct call's: what the
dispatch layer adds to every call. Timed as host wall time on every device (at these sizes a GPU op
is launch-bound), at decode size, T = 1. On a GPU the Triton backend of the same op is timed too:
the host time of its launches.
"""

from __future__ import annotations

import torch

from ..harness import Case, SkipSuite

FAMILY = "dispatch"
E, K, BLOCK = 64, 8, 16


def _route_case(C, device: str, grad: bool) -> Case:
    import vlmkernels

    logits = torch.randn(1, E, device=device, requires_grad=grad)
    raw = getattr(C, f"moe_topk_route_{device}")
    op = torch.ops.vlmkernels.moe_topk_route.default
    providers = {  # the same call on each path: a Mixtral router's (the schema's defaults otherwise)
        "C++ direct": lambda: raw(logits.detach(), K),
        "ours-torch.ops": lambda: op(logits, K),
        "ours-vlmkernels.ops": lambda: vlmkernels.ops.moe_topk_route(logits, K),
    }
    if device == "cuda":  # host time of a Triton launch (one kernel) through the same op
        providers["ours-torch.ops triton"] = lambda: op(logits, K, "softmax", True, None, 1, 1, "top2_sum", 1.0,
                                                        torch.float32, "triton")
    return Case("moe_topk_route", FAMILY, {"T": 1, "E": E, "k": K, "requires_grad": grad}, "float32", providers,
                baseline="C++ direct", timing="host", compare="difference")


def _align_case(C, device: str) -> Case:
    import vlmkernels

    ids = torch.randint(0, E, (1, K), dtype=torch.int32, device=device)
    raw = getattr(C, f"moe_align_block_size_{device}")
    op = torch.ops.vlmkernels.moe_align_block_size.default
    providers = {
        "C++ direct": lambda: raw(ids, E, BLOCK),
        "ours-torch.ops": lambda: op(ids, E, BLOCK),
        "ours-vlmkernels.ops": lambda: vlmkernels.ops.moe_align_block_size(ids, E, BLOCK),
    }
    if device == "cuda":  # host time of the Triton align (four launches) through the same op
        providers["ours-torch.ops triton"] = lambda: op(ids, E, BLOCK, None, "triton")
    return Case("moe_align_block_size", FAMILY, {"T": 1, "k": K, "E": E, "block": BLOCK}, "int32", providers,
                baseline="C++ direct", timing="host", compare="difference")


def _ext(device: str):
    from vlmkernels import _ext

    C = _ext.C
    if C is None:
        raise SkipSuite(f"vlmkernels._C is not built ({_ext.IMPORT_ERROR})")
    if not hasattr(C, f"moe_topk_route_{device}"):
        raise SkipSuite(f"vlmkernels._C has no {device} kernels")
    return C


def cases(full: bool, device: str) -> list[Case]:
    C = _ext(device)
    return [_route_case(C, device, False), _route_case(C, device, True), _align_case(C, device)]


def smoke_cases(device: str) -> list[Case]:
    return [_route_case(_ext(device), device, False)]
