"""``patch_embed``: CLIP/SigLIP patch embedding (conv-as-GEMM + bias + class token + positions +
optional pre-LayerNorm) as one op.

Backends: ``triton`` (im2col-free GEMM with a fused epilogue; CUDA, or CPU under
``TRITON_INTERPRET=1``) and ``reference`` (python_ref, a matmul over unfolded patches; it is also
the fast path for CPU tensors). Autograd gives gradients to pixels, weight, bias, class token,
position embeddings and the LayerNorm affine, with explicit formulas (no autograd re-trace) so the
backward also compiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import library, registry

__all__ = ["patch_embed", "patch_embed_uint8"]

OP = "patch_embed"
OP_U8 = "patch_embed_uint8"


# ---- implementations ----------------------------------------------------------------------------

def _reference(pixels, weight, bias, cls, pos, ln_w, ln_b, ln_eps):
    from python_ref.ops.anyres_embed import patch_embed as ref

    ln = None if ln_eps is None else (ln_w, ln_b, ln_eps)
    return ref(pixels, weight, bias, class_embedding=cls, position_embedding=pos, pre_layernorm=ln)


def _triton(pixels, weight, bias, cls, pos, ln_w, ln_b, ln_eps):
    if weight.dtype == torch.float64:
        raise TypeError("patch_embed: the triton backend takes float32/float16/bfloat16 weights, not float64")
    from ..triton.patch_embed import patch_embed as kernel

    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return kernel(pixels, weight.contiguous(), cont(bias), cont(cls), cont(pos), cont(ln_w), cont(ln_b), ln_eps)


registry.register(OP, "reference", _reference, devices=("cpu", "cuda"))
registry.register(OP, "triton", _triton, devices=("cpu", "cuda"))


@library.register_fake(OP)
def _fake(pixels, weight, bias=None, cls=None, pos=None, ln_w=None, ln_b=None, ln_eps=None, backend="auto"):
    p = weight.shape[-1]
    rows = (pixels.shape[2] // p) * (pixels.shape[3] // p) + (1 if cls is not None else 0)
    return pixels.new_empty(pixels.shape[0], rows, weight.shape[0], dtype=weight.dtype)


# ---- autograd -----------------------------------------------------------------------------------

def _patches(pixels, weight, cd):
    d, c, p, _ = weight.shape
    n, _, h, w = pixels.shape
    gh, gw = h // p, w // p
    x = pixels[:, :, : gh * p, : gw * p].to(weight.dtype).to(cd)
    return x.reshape(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)


def _setup_context(ctx, inputs, output):
    pixels, weight, bias, cls, pos, ln_w, ln_b, ln_eps, _ = inputs
    ctx.save_for_backward(pixels, weight, bias, cls, pos, ln_w, ln_b)
    ctx.ln_eps = ln_eps


def _grads(grad, need, pixels, weight, bias, cls, pos, ln_w, ln_b, ln_eps):
    """Gradients of (pixels, weight, bias, cls, pos, ln_w, ln_b) in that order (None where unneeded)."""
    d, c, p, _ = weight.shape
    n, _, h, w = pixels.shape
    cd = torch.float64 if weight.dtype == torch.float64 else torch.float32
    g = grad.to(cd)
    X = _patches(pixels, weight, cd)
    Wm = weight.reshape(d, -1).to(cd)
    g_ln_w = g_ln_b = None
    if ln_eps is not None:
        # recompute the pre-LN rows (one GEMM) instead of saving an fp32 copy of the output
        z = X @ Wm.t()
        if bias is not None:
            z = z + bias.to(cd)
        if cls is not None:
            z = torch.cat([cls.to(cd).expand(n, 1, d), z], dim=1)
        if pos is not None:
            z = z + pos.to(cd)
        mu = z.mean(-1, keepdim=True)
        rstd = torch.rsqrt(z.var(-1, unbiased=False, keepdim=True) + ln_eps)
        xhat = (z - mu) * rstd
        if ln_w is not None and need[5]:
            g_ln_w = (g * xhat).sum((0, 1)).to(ln_w.dtype)
        if ln_b is not None and need[6]:
            g_ln_b = g.sum((0, 1)).to(ln_b.dtype)
        gx = g * ln_w.to(cd) if ln_w is not None else g
        g = rstd * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))
    g_pos = g.sum(0).to(pos.dtype) if pos is not None and need[4] else None
    g_cls = g[:, 0].sum(0).to(cls.dtype) if cls is not None and need[3] else None
    gy = g[:, 1:] if cls is not None else g
    g_bias = gy.sum((0, 1)).to(bias.dtype) if bias is not None and need[2] else None
    g_weight = None
    if need[1]:
        g_weight = (gy.reshape(-1, d).t() @ X.reshape(-1, X.shape[-1])).reshape(weight.shape).to(weight.dtype)
    g_pixels = None
    if need[0]:
        gh, gw = h // p, w // p
        gp = (gy @ Wm).reshape(n, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * p, gw * p)
        # pixels past the last full patch never reach the output: zero gradient
        g_pixels = F.pad(gp, (0, w - gw * p, 0, h - gh * p)).to(pixels.dtype)
    return g_pixels, g_weight, g_bias, g_cls, g_pos, g_ln_w, g_ln_b


def _backward(ctx, grad):
    saved = ctx.saved_tensors
    return (*_grads(grad, ctx.needs_input_grad, *saved, ctx.ln_eps), None, None)


library.register_autograd(OP, _backward, _setup_context)


# ---- uint8 tiles ---------------------------------------------------------------------------------

def _lut_pixels(tiles, lut):
    # [N, C, H, W] uint8 -> float32 via the per-channel table (the reference normalization)
    c = tiles.shape[1]
    return lut[torch.arange(c, device=tiles.device).view(1, c, 1, 1), tiles.long()]


def _check_u8(tiles, lut):
    # the op may be called directly: a short table would be read out of bounds
    if tiles.dtype != torch.uint8:
        raise TypeError(f"tiles must be uint8, got {tiles.dtype}")
    if lut.shape != (tiles.shape[1], 256) or not lut.is_floating_point():
        raise ValueError(f"lut must be a float [C={tiles.shape[1]}, 256] table, got {lut.dtype} {tuple(lut.shape)}")


def _reference_u8(tiles, lut, weight, *rest):
    _check_u8(tiles, lut)
    return _reference(_lut_pixels(tiles, lut), weight, *rest)


def _triton_u8(tiles, lut, weight, bias, cls, pos, ln_w, ln_b, ln_eps):
    _check_u8(tiles, lut)
    if weight.dtype == torch.float64:
        raise TypeError("patch_embed_uint8: the triton backend takes float32/float16/bfloat16 weights, not float64")
    from ..triton.patch_embed import patch_embed as kernel

    cont = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return kernel(tiles, weight.contiguous(), cont(bias), cont(cls), cont(pos), cont(ln_w), cont(ln_b), ln_eps,
                  lut=lut.to(torch.float32).contiguous())


registry.register(OP_U8, "reference", _reference_u8, devices=("cpu", "cuda"))
registry.register(OP_U8, "triton", _triton_u8, devices=("cpu", "cuda"))


@library.register_fake(OP_U8)
def _fake_u8(tiles, lut, weight, *rest):
    return _fake(tiles, weight, *rest)


def _setup_context_u8(ctx, inputs, output):
    tiles, lut, weight, bias, cls, pos, ln_w, ln_b, ln_eps, _ = inputs
    ctx.save_for_backward(tiles, lut, weight, bias, cls, pos, ln_w, ln_b)
    ctx.ln_eps = ln_eps


def _backward_u8(ctx, grad):
    tiles, lut, *params = ctx.saved_tensors
    need = (False,) + tuple(ctx.needs_input_grad[2:])
    grads = _grads(grad, need, _lut_pixels(tiles, lut), *params, ctx.ln_eps)
    return (None, None, *grads[1:], None, None)


library.register_autograd(OP_U8, _backward_u8, _setup_context_u8)


# ---- functional ---------------------------------------------------------------------------------

def _check_vec(t, name, d, device):
    if t is None:
        return None
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.shape != (d,):
        raise ValueError(f"{name} must have shape [D={d}], got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but weight is on {device}")
    return t


def _check_params(pixels, weight, bias, class_embedding, position_embedding, pre_layernorm):
    """Validate everything but the pixel dtype; returns the op's parameter arguments."""
    if not torch.is_tensor(pixels) or not torch.is_tensor(weight):
        raise TypeError("pixels and weight must be tensors")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be [D, C, p, p], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if pixels.dim() != 4:
        raise ValueError(f"pixels must be [N, C, H, W], got shape {tuple(pixels.shape)}")
    d, c, p, _ = weight.shape
    if pixels.shape[1] != c:
        raise ValueError(f"pixels have {pixels.shape[1]} channels but weight expects {c}")
    if p == 0 or d == 0:
        raise ValueError(f"weight must have a positive patch size and D, got shape {tuple(weight.shape)}")
    if pixels.shape[2] < p or pixels.shape[3] < p:
        raise ValueError(f"pixels {tuple(pixels.shape[2:])} are smaller than one {p}x{p} patch")
    if pixels.device != weight.device:
        raise ValueError(f"pixels are on {pixels.device} but weight is on {weight.device}")
    bias = _check_vec(bias, "bias", d, weight.device)
    class_embedding = _check_vec(class_embedding, "class_embedding", d, weight.device)
    rows = (pixels.shape[2] // p) * (pixels.shape[3] // p) + (1 if class_embedding is not None else 0)
    if position_embedding is not None:
        if not torch.is_tensor(position_embedding) or not position_embedding.is_floating_point():
            raise TypeError("position_embedding must be a floating point tensor")
        if position_embedding.shape != (rows, d):
            raise ValueError(
                f"position_embedding must be [rows={rows}, D={d}] for {tuple(pixels.shape[2:])} pixels, "
                f"got {tuple(position_embedding.shape)} (interpolate it for other sizes)"
            )
        if position_embedding.device != weight.device:
            raise ValueError(f"position_embedding is on {position_embedding.device} but weight is on {weight.device}")
    ln_w = ln_b = ln_eps = None
    if pre_layernorm is not None:
        if isinstance(pre_layernorm, torch.nn.LayerNorm):
            if tuple(pre_layernorm.normalized_shape) != (d,):
                raise ValueError(f"pre_layernorm normalizes {tuple(pre_layernorm.normalized_shape)}, expected ({d},)")
            ln_w, ln_b, ln_eps = pre_layernorm.weight, pre_layernorm.bias, pre_layernorm.eps
        elif isinstance(pre_layernorm, (tuple, list)) and len(pre_layernorm) == 3:
            ln_w, ln_b, ln_eps = pre_layernorm
        else:
            raise TypeError("pre_layernorm must be an nn.LayerNorm or a (weight, bias, eps) tuple")
        ln_w = _check_vec(ln_w, "pre_layernorm weight", d, weight.device)
        ln_b = _check_vec(ln_b, "pre_layernorm bias", d, weight.device)
        ln_eps = float(ln_eps)
        if not ln_eps >= 0:
            raise ValueError(f"pre_layernorm eps must be >= 0, got {ln_eps}")
    return bias, class_embedding, position_embedding, ln_w, ln_b, ln_eps


def patch_embed(pixels, weight, bias=None, *, class_embedding=None, position_embedding=None,
                pre_layernorm=None, backend="auto") -> torch.Tensor:
    """Patch embedding of ``pixels [N, C, H, W]`` with ``weight [D, C, p, p]`` -> ``[N, P(+1), D]``.

    P = (H//p)·(W//p) (pixels past the last full patch are ignored, like a "valid" conv).
    ``class_embedding [D]`` becomes row 0; ``position_embedding [P(+1), D]`` is added to every row
    (pass ``nn.Embedding.weight``); ``pre_layernorm`` is an ``nn.LayerNorm(D)`` or a
    ``(weight|None, bias|None, eps)`` tuple applied last (CLIP's ``pre_layrnorm``). The output dtype
    is ``weight.dtype``; pixels are cast to it first (as HF does), math accumulates in fp32.
    NaN/inf in the inputs propagate. ``N == 0`` gives an empty ``[0, P(+1), D]``.
    """
    args = _check_params(pixels, weight, bias, class_embedding, position_embedding, pre_layernorm)
    if not pixels.is_floating_point():
        raise TypeError(f"pixels must be floating point (use patch_embed_uint8 for uint8 tiles), got {pixels.dtype}")
    return library.op(OP)(pixels, weight, *args, backend)


def _lut(mean, std, channels, device):
    vals = {}
    for name, v in (("mean", mean), ("std", std)):
        v = [float(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        if len(v) not in (1, channels):
            raise ValueError(f"{name} must have 1 or {channels} values, got {len(v)}")
        vals[name] = torch.tensor(v, dtype=torch.float32).reshape(-1, 1).expand(channels, 1)
    if (vals["std"] == 0).any():
        raise ValueError("std must be non-zero")
    # HF PIL backend order: float64 x * (1/255) rounded to float32, then (x - mean) / std in float32
    x = (torch.arange(256, dtype=torch.float64) * (1.0 / 255.0)).to(torch.float32)
    return ((x[None] - vals["mean"]) / vals["std"]).contiguous().to(device)


def patch_embed_uint8(tiles, weight, bias=None, *, mean, std, class_embedding=None, position_embedding=None,
                      pre_layernorm=None, backend="auto") -> torch.Tensor:
    """:func:`patch_embed` straight from uint8 tiles ``[N, C, H, W]`` (any strides, e.g. an HWC
    buffer viewed with ``permute``): each byte is normalized on load exactly like HF's PIL backend
    (``x/255`` in float64 rounded to float32, then ``(x - mean) / std``), so no float tiles are
    materialized. ``mean``/``std``: one value or one per channel.
    """
    args = _check_params(tiles, weight, bias, class_embedding, position_embedding, pre_layernorm)
    if tiles.dtype != torch.uint8:
        raise TypeError(f"tiles must be uint8, got {tiles.dtype}")
    lut = _lut(mean, std, tiles.shape[1], tiles.device)
    return library.op(OP_U8)(tiles, lut, weight, *args, backend)
