"""Ahead-of-time compile of a Triton kernel for a CUDA arch without a GPU: the CI check that a
kernel the interpreter runs also builds to a cubin (run it in a process without TRITON_INTERPRET=1,
under which ``triton.jit`` returns an interpreter)."""

from __future__ import annotations

import triton


def aot_compile(kernel, arg_types: dict, constexprs: dict, *, arch: int = 90, num_warps: int = 4,
                num_stages: int = 2, default_scalar: str = "i32"):
    """``arg_types``: Triton type strings (``"*bf16"``, ``"i64"``, ...) by argument name; other
    arguments are ``default_scalar``; ``constexprs``: values by name."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else arg_types.get(n, default_scalar) for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps,
                                                                             num_stages=num_stages))
