"""``qformer_cross_kv``: the K and V projections of every cross-attention layer as ONE GEMM.

The cross K/V of all layers depend only on the (shared) encoder states, so they are hoisted out of
the layer loop: ``encoder_states [B,N,E] @ weight[L*2*D, E].T + bias`` reads the encoder states once
and gives a well-shaped GEMM even at batch 1 (BLIP-2: ``[257, 1408] x [1408, 6*2*768]``).

``weight`` stacks the layers' key then value weights, layer-major (:func:`stack_cross_kv_weights`
builds it from HF ``Blip2QFormerMultiHeadAttention`` cross modules; the patch helper caches it).
The op ``torch.ops.vlmkernels.qformer_cross_kv`` returns the GEMM's ``[B, N, L*2*D]``; the functional
API returns the zero-copy view ``[L, 2, B, N, D]``: ``kv[l, 0]`` / ``kv[l, 1]`` are layer ``l``'s K / V,
and ``kv[l, 0].unflatten(-1, (H, d))`` is the ``[B, N, H, d]`` view (token stride ``L*2*D``, head
stride ``d``) that :func:`vlmkernels.ops.attention` and its kernels read in place, without a copy.
(With packed images, pass ``encoder_states`` as ``[1, total_k, E]`` and take ``kv[l, 0, 0]``.)

Backend: ``reference`` on every device, which is a single ``torch.addmm`` -- the fastest way to run
one dense GEMM (cuBLAS/oneDNN; a Triton GEMM would only match it), with fp32 accumulation for
16-bit inputs and TF32 exactly where torch's own matmul settings allow it. The backward
(``encoder_states``, ``weight`` and ``bias`` gradients; K/V weights are trained while the encoder is
frozen) is three more GEMM-shaped ops written with torch ops, so ``torch.compile`` traces it.
"""

from __future__ import annotations

import torch

from .. import library, registry

__all__ = ["qformer_cross_kv", "stack_cross_kv_weights"]

OP = "qformer_cross_kv"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(encoder_states, weight, bias) -> None:
    """Metadata checks shared by the functional API, the backend and the fake."""
    for name, t in (("encoder_states", encoder_states), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"qformer_cross_kv: {name} must be a Tensor, got {type(t).__name__}")
    if encoder_states.dim() != 3:
        raise ValueError(f"qformer_cross_kv: encoder_states must be 3-D [B, N, E], got shape "
                         f"{tuple(encoder_states.shape)}")
    if weight.dim() != 2 or weight.shape[1] != encoder_states.shape[2]:
        raise ValueError(f"qformer_cross_kv: weight must be [L*2*D, E={encoder_states.shape[2]}], got shape "
                         f"{tuple(weight.shape)}")
    if encoder_states.dtype not in _FLOATS:
        raise TypeError(f"qformer_cross_kv: encoder_states must be float32, float16, bfloat16 or float64, "
                        f"got {encoder_states.dtype}")
    if weight.dtype != encoder_states.dtype:
        raise TypeError(f"qformer_cross_kv: weight must have encoder_states' dtype {encoder_states.dtype}, "
                        f"got {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"qformer_cross_kv: bias must be [{weight.shape[0]}] (weight's rows), got {got}")
        if bias.dtype != encoder_states.dtype:
            raise TypeError(f"qformer_cross_kv: bias must have encoder_states' dtype {encoder_states.dtype}, "
                            f"got {bias.dtype}")
    devices = {n: t.device for n, t in (("encoder_states", encoder_states), ("weight", weight), ("bias", bias))
               if t is not None}
    if len(set(devices.values())) != 1:
        raise ValueError(f"qformer_cross_kv: all tensors must be on one device, got {devices}")


def qformer_cross_kv(encoder_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     num_layers: int, backend: str = "auto") -> torch.Tensor:
    """Every cross layer's K and V: a ``[L, 2, B, N, D]`` view of one GEMM's output (module docstring)."""
    _check(encoder_states, weight, bias)
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"qformer_cross_kv: num_layers must be a positive int, got {num_layers!r}")
    rows = weight.shape[0]
    if rows % (2 * num_layers):
        raise ValueError(f"qformer_cross_kv: weight's {rows} rows are not num_layers={num_layers} x 2 (K, V) x D")
    B, N, _ = encoder_states.shape
    kv = library.op(OP)(encoder_states, weight, bias, backend)
    return kv.view(B, N, num_layers, 2, rows // (2 * num_layers)).permute(2, 3, 0, 1, 4)


def stack_cross_kv_weights(modules) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [L*2*D, E], bias [L*2*D] or None)`` from the ``.key`` / ``.value`` ``nn.Linear`` of HF
    ``Blip2QFormerMultiHeadAttention`` cross modules (InstructBLIP's too), in the given layer order.
    A copy: re-stack after the projections' weights change (the patch helper caches it per step)."""
    modules = list(modules)
    if not modules:
        raise ValueError("stack_cross_kv_weights: modules is empty")
    linears = []
    for i, m in enumerate(modules):
        for name in ("key", "value"):
            lin = getattr(m, name, None)
            if not isinstance(lin, torch.nn.Linear):
                raise TypeError(f"stack_cross_kv_weights: modules[{i}].{name} must be an nn.Linear, "
                                f"got {type(lin).__name__}")
            linears.append(lin)
    shapes = {tuple(lin.weight.shape) for lin in linears}
    if len(shapes) != 1:
        raise ValueError(f"stack_cross_kv_weights: every key/value Linear must have one weight shape, got {shapes}")
    weight = torch.cat([lin.weight for lin in linears])
    if all(lin.bias is None for lin in linears):
        return weight, None
    bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])
    return weight, bias


# ---- backend, fake, autograd --------------------------------------------------------------------

def _reference_impl(encoder_states, weight, bias):
    from python_ref.ops.qformer import qformer_cross_kv as ref

    _check(encoder_states, weight, bias)
    # the op computes in its inputs' dtype (an autocast region does not cast a custom op's inputs)
    with torch.no_grad(), torch.autocast(encoder_states.device.type, enabled=False):
        return ref(encoder_states, weight, bias)


registry.register(OP, "reference", _reference_impl, devices=("cpu", "cuda"))


@library.register_fake(OP)
def _fake(encoder_states, weight, bias=None, backend="auto"):
    _check(encoder_states, weight, bias)
    B, N, _ = encoder_states.shape
    return encoder_states.new_empty((B, N, weight.shape[0]))


def _setup_context(ctx, inputs, output):
    encoder_states, weight, bias, _backend = inputs
    ctx.save_for_backward(encoder_states, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    encoder_states, weight = ctx.saved_tensors
    B, N, E = encoder_states.shape
    g = grad.reshape(B * N, weight.shape[0])
    needs = ctx.needs_input_grad
    d_x = (g @ weight).view(B, N, E) if needs[0] else None
    d_w = g.t() @ encoder_states.reshape(B * N, E) if needs[1] else None
    d_b = g.sum(0) if ctx.has_bias and needs[2] else None
    return d_x, d_w, d_b, None


library.register_autograd(OP, _backward, _setup_context)
