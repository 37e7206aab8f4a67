"""One Triton GEMM core for every linear op of the qformer and gated_fusion families.

``out[m, n] = epilogue(sum_s scale[sample(m), s] * (X_s[m, :] · W_s[n, :]))`` where the K dimension is
split over up to ``MAX_SEGMENTS`` input pointers ``X_s [M, K_s]`` / ``W_s [N, K_s]`` (a constexpr
segment count): a concat of the inputs is never materialized (concat_linear, gated_fusion reading
``a`` then ``b``), and with per-(sample, segment) scales one launch computes a gated sum of
per-expert GEMMs (expert_mix). Rows are tiled per sample (a tile never straddles two samples), so a
segment whose scale is 0 for the tile's sample is skipped: no loads, no MMA. In grouped mode
(split_linear) the segments are independent GEMMs instead: program column ``g`` computes group ``g``
into its own column block of the output, all groups in one launch.

Epilogue (fp32, or fp64 for fp64 inputs), in this order: bias (per column, or per sample and column
for expert_mix's gated bias mix), activation (erf GELU / tanh GELU / ReLU / none), sigmoid gate mix
``vb + g*(va - vb)`` (loads the ``va, vb`` tiles), dropout keep-mask with scale, residual add,
LayerNorm over the row; then one rounding to the output dtype, stored through arbitrary output
strides (column blocks and interleaved token slots of split_linear are strided views of one output).

LayerNorm: when the row fits one tile (``N <= LN_FULL_ROW_MAX``, e.g. the Q-Former's 768) a program
owns whole rows and normalizes in registers, so the pre-norm sum never goes to memory and the op is
one launch; wider rows would need more than 1024 fp32 accumulators per row per program (register
spills, tiny grids), so they write the fp32 pre-norm sum and run one row-LayerNorm kernel.

Backward: the same core recomputes the GEMM and its epilogue applies the vjp's elementwise part
(``grad * act'(z)``; for the gate ``dz = grad (va - vb) g (1 - g)`` plus ``d va = grad g`` as a second
output), so pre-activations never go to memory; the LayerNorm + dropout vjp is one row kernel over
the recomputed fp32 pre-norm sum (with partial column sums for the LayerNorm parameters); weight and
input gradients are torch matmuls in the inputs' dtype.

fp32 inputs use TF32 only where torch allows it for its own matmuls
(:func:`vlmkernels.triton.fused_moe.dot_precision`). Tile configs: five autotuned configs on CUDA
(:data:`TUNE_CONFIGS`); a fixed config for the full-row LayerNorm epilogue and under the interpreter
(``TRITON_INTERPRET=1``), where autotuning would run every config in numpy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .fused_moe import dot_precision, grouped_pid
from .launch import launcher, on_device

MAX_SEGMENTS = 5
LN_FULL_ROW_MAX = 1024
ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


# ---- kernels ------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # exact erf GELU
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 2:  # tanh GELU; tanh(y) = 2*sigmoid(2y) - 1 avoids a libdevice dependency
        y = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = z * _sigmoid(2.0 * y)  # 0.5 z (1 + tanh(y))
    elif ACTIVATION == 3:  # relu
        z = tl.where(z > 0, z, 0.0)
    return z


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """d act(z) / dz."""
    if ACTIVATION == 1:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACTIVATION == 2:
        y = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * _sigmoid(2.0 * y) - 1.0
        d = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == 3:
        d = tl.where(z > 0, 1.0, 0.0)
    else:
        d = z * 0.0 + 1.0
    return d


@triton.jit
def _pick(g, v0, v1, v2, v3, v4):
    """The ``g``-th of five scalars or pointers (a runtime group index)."""
    return tl.where(g == 0, v0, tl.where(g == 1, v1, tl.where(g == 2, v2, tl.where(g == 3, v3, v4))))


@triton.jit
def _segment_dot(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, K, rows, row_ok, offs_n, col_ok,
                 BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``acc += X[rows, :K] · W[offs_n, :K]ᵀ``."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_UPCAST:  # the interpreter's 16-bit tl.dot is wrong (triton 3.8): products in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _segment(acc, s: tl.constexpr, sample, scale_ptr, stride_sb, stride_ss,
             x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, K, rows, row_ok, offs_n, col_ok,
             SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """Segment ``s``'s contribution; a scaled segment gets its own partial product (scaled in fp32,
    exact for a 0/1 gate) and is skipped where the sample's scale is 0."""
    if SCALED:
        scale = tl.load(scale_ptr + sample * stride_sb + s * stride_ss).to(acc.dtype)
        if scale != 0:
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc.dtype)
            part = _segment_dot(part, x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, K, rows, row_ok,
                                offs_n, col_ok, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
            acc += scale * part
    else:
        acc = _segment_dot(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, K, rows, row_ok, offs_n,
                           col_ok, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
    return acc


@triton.jit
def _linear_epilogue_kernel(
    x0, x1, x2, x3, x4, w0, w1, w2, w3, w4,
    sx0m, sx0k, sx1m, sx1k, sx2m, sx2k, sx3m, sx3k, sx4m, sx4k,
    sw0n, sw0k, sw1n, sw1k, sw2n, sw2k, sw3n, sw3k, sw4n, sw4k,
    K0, K1, K2, K3, K4, N0, N1, N2, N3, N4, C0, C1, C2, C3, C4,
    scale_ptr, stride_sb, stride_ss,
    bias_ptr, stride_bias_b,
    va_ptr, stride_va_m, stride_va_n, vb_ptr, stride_vb_m, stride_vb_n,
    keep_ptr, stride_keep_m, stride_keep_n, drop_scale,
    res_ptr, stride_res_m, stride_res_n,
    ln_w_ptr, ln_b_ptr, eps,
    grad_ptr, stride_grad_m, stride_grad_n, aux_ptr, stride_aux_m, stride_aux_n,
    out_ptr, stride_om, stride_on,
    T, N, num_samples, M_BUCKET,
    NSEG: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    GATE_MIX: tl.constexpr, DROPOUT: tl.constexpr, RESIDUAL: tl.constexpr, LAYERNORM: tl.constexpr,
    HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, ACC_FP64: tl.constexpr, GRAD: tl.constexpr,
    GROUPED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering: consecutive programs share W tiles in L2
    tiles_per_sample = tl.cdiv(T, BLOCK_M)
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_samples * tiles_per_sample, tl.cdiv(N, BLOCK_N), GROUP_M)

    sample = pid_m // tiles_per_sample
    t = (pid_m % tiles_per_sample) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = t < T
    rows = sample.to(tl.int64) * T + t
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if GROUPED:  # group = program_id(1): its own input, weight, width N_g and output column block C_g
        grp = tl.program_id(1)
        n_g = _pick(grp, N0, N1, N2, N3, N4)
        if pid_n * BLOCK_N >= n_g:
            return
        col_ok = offs_n < n_g
        cols = offs_n + _pick(grp, C0, C1, C2, C3, C4)
    else:
        col_ok = offs_n < N
        cols = offs_n

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUPED:
        acc = _segment_dot(acc, _pick(grp, x0, x1, x2, x3, x4), _pick(grp, sx0m, sx1m, sx2m, sx3m, sx4m),
                           _pick(grp, sx0k, sx1k, sx2k, sx3k, sx4k), _pick(grp, w0, w1, w2, w3, w4),
                           _pick(grp, sw0n, sw1n, sw2n, sw3n, sw4n), _pick(grp, sw0k, sw1k, sw2k, sw3k, sw4k),
                           _pick(grp, K0, K1, K2, K3, K4), rows, row_ok, offs_n, col_ok, BLOCK_K, DOT_PRECISION,
                           DOT_UPCAST)
    else:
        acc = _segment(acc, 0, sample, scale_ptr, stride_sb, stride_ss, x0, sx0m, sx0k, w0, sw0n, sw0k, K0, rows,
                       row_ok, offs_n, col_ok, SCALED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
        if NSEG > 1:
            acc = _segment(acc, 1, sample, scale_ptr, stride_sb, stride_ss, x1, sx1m, sx1k, w1, sw1n, sw1k, K1,
                           rows, row_ok, offs_n, col_ok, SCALED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
        if NSEG > 2:
            acc = _segment(acc, 2, sample, scale_ptr, stride_sb, stride_ss, x2, sx2m, sx2k, w2, sw2n, sw2k, K2,
                           rows, row_ok, offs_n, col_ok, SCALED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
        if NSEG > 3:
            acc = _segment(acc, 3, sample, scale_ptr, stride_sb, stride_ss, x3, sx3m, sx3k, w3, sw3n, sw3k, K3,
                           rows, row_ok, offs_n, col_ok, SCALED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, DOT_UPCAST)
        if NSEG > 4:
            acc = _segment(acc, 4, sample, scale_ptr, stride_sb, stride_ss, x4, sx4m, sx4k, w4, sw4n, sw4k, K4,
                           rows, row_ok, offs_n, col_ok, SCALED, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, DOT_UPCAST)

    tile_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + sample * stride_bias_b + cols, mask=col_ok, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    if (GRAD == 1) | (GRAD == 2):  # backward epilogues: the recomputed pre-activation never goes to memory
        gy = tl.load(grad_ptr + rows[:, None] * stride_grad_m + cols[None, :] * stride_grad_n, mask=tile_ok,
                     other=0.0).to(acc.dtype)
    if GRAD == 1:  # d pre-activation = grad * act'(z)
        acc = gy * _activation_grad(acc, ACTIVATION)
    elif GRAD == 2:  # gate: d z = grad (va - vb) g (1 - g); aux = d va = grad g
        g = _sigmoid(acc)
        va = tl.load(va_ptr + rows[:, None] * stride_va_m + offs_n[None, :] * stride_va_n, mask=tile_ok,
                     other=0.0).to(acc.dtype)
        vb = tl.load(vb_ptr + rows[:, None] * stride_vb_m + offs_n[None, :] * stride_vb_n, mask=tile_ok,
                     other=0.0).to(acc.dtype)
        tl.store(aux_ptr + rows[:, None] * stride_aux_m + offs_n[None, :] * stride_aux_n,
                 (gy * g).to(aux_ptr.dtype.element_ty), mask=tile_ok)
        acc = gy * (va - vb) * g * (1.0 - g)
    elif GRAD == 3:  # expert_mix vjp, acc = grad W_i: d gate partial sum(acc * x_i) per tile, d x_i = s acc
        xv = tl.load(va_ptr + rows[:, None] * stride_va_m + offs_n[None, :] * stride_va_n, mask=tile_ok,
                     other=0.0).to(acc.dtype)
        part = tl.sum(tl.sum(acc * xv, axis=1), axis=0)
        tl.store(aux_ptr + pid_m * stride_aux_m + pid_n * stride_aux_n, part.to(aux_ptr.dtype.element_ty))
        acc = acc * tl.load(scale_ptr + sample * stride_sb).to(acc.dtype)
    else:
        acc = _activation(acc, ACTIVATION)
    if GATE_MIX:
        g = _sigmoid(acc)
        va = tl.load(va_ptr + rows[:, None] * stride_va_m + offs_n[None, :] * stride_va_n, mask=tile_ok,
                     other=0.0).to(acc.dtype)
        vb = tl.load(vb_ptr + rows[:, None] * stride_vb_m + offs_n[None, :] * stride_vb_n, mask=tile_ok,
                     other=0.0).to(acc.dtype)
        acc = vb + g * (va - vb)
    if DROPOUT:
        keep = tl.load(keep_ptr + rows[:, None] * stride_keep_m + offs_n[None, :] * stride_keep_n, mask=tile_ok,
                       other=0)
        acc = tl.where(keep != 0, acc * drop_scale, 0.0)
    if RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_res_m + offs_n[None, :] * stride_res_n, mask=tile_ok,
                      other=0.0)
        acc += res.to(acc.dtype)
    if LAYERNORM:  # BLOCK_N >= N: this program owns whole rows
        acc = _layernorm_rows(acc, col_ok, offs_n, ln_w_ptr, ln_b_ptr, eps, N, HAS_LN_W, HAS_LN_B)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _layernorm_rows(h, col_ok, offs_n, ln_w_ptr, ln_b_ptr, eps, N, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr):
    """LayerNorm of each row of ``h`` over its first ``N`` columns (two-pass variance, like torch)."""
    h = tl.where(col_ok[None, :], h, 0.0)
    mean = tl.sum(h, axis=1) / N
    d = tl.where(col_ok[None, :], h - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / N
    y = d * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_LN_W:
        y = y * tl.load(ln_w_ptr + offs_n, mask=col_ok, other=0.0).to(y.dtype)[None, :]
    if HAS_LN_B:
        y = y + tl.load(ln_b_ptr + offs_n, mask=col_ok, other=0.0).to(y.dtype)[None, :]
    return y


@triton.jit
def _row_layernorm_kernel(h_ptr, stride_hm, out_ptr, stride_om, ln_w_ptr, ln_b_ptr, eps, N,
                          HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """LayerNorm of one wide row (the pre-norm sum written by the GEMM, fp32/fp64)."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    h = tl.load(h_ptr + row * stride_hm + offs_n, mask=col_ok, other=0.0)
    y = _layernorm_rows(h[None, :], col_ok, offs_n, ln_w_ptr, ln_b_ptr, eps, N, HAS_LN_W, HAS_LN_B)
    tl.store(out_ptr + row * stride_om + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _layernorm_backward_kernel(h_ptr, stride_hm, g_ptr, stride_gm, keep_ptr, stride_km, drop_scale, ln_w_ptr,
                               dres_ptr, stride_drm, dz_ptr, stride_dzm, part_w_ptr, part_b_ptr, M, N, eps,
                               ROWS: tl.constexpr, HAS_LN_W: tl.constexpr, DROPOUT: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """LayerNorm + dropout vjp for ``ROWS`` rows of the pre-norm sum ``h``: ``d residual = dh``,
    ``dz = dh * keep * scale``, and this program's partial column sums of ``g * xhat`` (d ln_weight) and
    ``g`` (d ln_bias); one pass over ``h`` and ``grad``."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    col_ok = offs < N
    pw = tl.zeros((BLOCK_N,), dtype=part_w_ptr.dtype.element_ty)
    pb = tl.zeros((BLOCK_N,), dtype=part_w_ptr.dtype.element_ty)
    if HAS_LN_W:
        w = tl.load(ln_w_ptr + offs, mask=col_ok, other=0.0).to(pw.dtype)
    for r in range(ROWS):
        row = (pid * ROWS + r).to(tl.int64)
        ok = col_ok & (row < M)
        h = tl.load(h_ptr + row * stride_hm + offs, mask=ok, other=0.0).to(pw.dtype)
        g = tl.load(g_ptr + row * stride_gm + offs, mask=ok, other=0.0).to(pw.dtype)
        mean = tl.sum(h, axis=0) / N
        d = tl.where(col_ok, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
        xhat = d * rstd
        pw += g * xhat
        pb += g
        dxhat = g
        if HAS_LN_W:
            dxhat = g * w
        c1 = tl.sum(dxhat, axis=0) / N
        c2 = tl.sum(dxhat * xhat, axis=0) / N
        dh = tl.where(col_ok, rstd * (dxhat - c1 - xhat * c2), 0.0)
        tl.store(dres_ptr + row * stride_drm + offs, dh.to(dres_ptr.dtype.element_ty), mask=ok)
        if DROPOUT:
            keep = tl.load(keep_ptr + row * stride_km + offs, mask=ok, other=0)
            dh = tl.where(keep != 0, dh * drop_scale, 0.0)
        tl.store(dz_ptr + row * stride_dzm + offs, dh.to(dz_ptr.dtype.element_ty), mask=ok)
    tl.store(part_w_ptr + pid * N + offs, pw, mask=col_ok)
    tl.store(part_b_ptr + pid * N + offs, pb, mask=col_ok)


# ---- configs ----

# a few CUDA tile configs, autotuned per (rows bucket, N, K of the first two segments, flags)
TUNE_CONFIGS = [
    triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=8, num_stages=3),
    triton.Config(dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), num_warps=4, num_stages=4),
    triton.Config(dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1), num_warps=4, num_stages=4),
]


def _bench(fn, quantiles=None):
    """Autotuning timer: triton's on CUDA; one wall-clock run elsewhere (the interpreter, in tests)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
    import time

    t0 = time.perf_counter()
    fn()
    ms = (time.perf_counter() - t0) * 1e3
    return [ms] * len(quantiles) if quantiles else ms


_linear_epilogue_tuned = triton.autotune(
    configs=TUNE_CONFIGS,
    key=["M_BUCKET", "N", "K0", "K1", "NSEG", "SCALED", "GATE_MIX", "GRAD", "ACTIVATION", "GROUPED"],
    do_bench=_bench,
)(_linear_epilogue_kernel)


def _config(M: int, N: int, K: int, device: torch.device, layernorm: bool, dtype=torch.bfloat16) -> dict:
    """Tile config: whole rows for the LayerNorm epilogue, a small heuristic otherwise. The interpreter
    runs each program in numpy: mid-size tiles keep it fast. fp64 (no tensor cores) takes small tiles."""
    if dtype == torch.float64 and device.type == "cuda" and not layernorm:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2)
    if layernorm:
        block_n = max(16, triton.next_power_of_2(N))
        block_m = 16 if block_n >= 512 or device.type != "cuda" else 32
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32 if block_n <= 512 else 16, GROUP_M=1,
                    num_warps=8 if block_n >= 512 else 4, num_stages=2 if device.type == "cuda" else 1)
    if device.type != "cuda":
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)
    if M <= 64:  # decode-sized: skinny row tiles, more column tiles to fill the SMs
        return dict(BLOCK_M=16 if M <= 16 else 64, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4)
    if N <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


# ---- launcher -----------------------------------------------------------------------------------

def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-D ``[rows, last dim]`` (a view when the strides allow it)."""
    rows = 1
    for d in t.shape[:-1]:
        rows *= d
    return t.reshape(rows, t.shape[-1])


def _launch(xs, ws, out, *, bias=None, bias_per_sample=False, scale=None, rows_per_sample=None,
            activation="none", mix=None, keep=None, drop_scale=1.0, residual=None, layernorm=None, grad=None,
            grad_mode=0, aux=None, groups=None, config=None, tune=None):
    """``out [M, N] = epilogue(sum_s scale * xs[s] · ws[s]ᵀ)``; ``xs[s] [M, K_s]``, ``ws[s] [N, K_s]``
    (any strides), ``out`` any 2-D strided view. ``scale [num_samples, S]`` with ``rows_per_sample``
    rows per sample; ``bias [N]`` or ``[num_samples, N]``; ``mix = (va, vb)`` [M, N]; ``keep`` uint8
    [M, N]; ``residual`` [M, N]; ``layernorm = (ln_w, ln_b, eps)`` (N must fit one tile).
    Backward epilogues (``grad [M, N]``): ``grad_mode=1`` stores ``grad * act'(z)``; ``grad_mode=2``
    (with ``mix``) stores the gate's ``d z`` and ``aux = grad * g``; ``grad_mode=3`` (xs = [grad],
    ws = [W_iᵀ], ``mix = (x_i, x_i)``, ``scale`` = the gate column) stores ``scale * grad W_i`` and each
    tile's ``sum(grad W_i * x_i)`` at ``aux[pid_m, pid_n]``. ``tune`` (default: CUDA, no
    LayerNorm, no ``config``, not fp64) picks the tile config by autotuning over :data:`TUNE_CONFIGS`.
    ``groups = widths``: grouped GEMM, one launch: group ``s`` computes ``xs[s] · ws[s]ᵀ`` into the column
    block of ``out`` (and of ``bias``/``grad``) at ``sum(widths[:s])`` (no K concat)."""
    M, N = out.shape
    if M == 0 or N == 0:
        return out
    widths = list(groups) if groups is not None else []
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    if groups is not None:
        N = max(widths)
    nseg = len(xs)
    assert 1 <= nseg <= MAX_SEGMENTS
    T = rows_per_sample or M
    num_samples = M // T
    dtype = xs[0].dtype
    cfg = config or _config(M, N, sum(x.shape[1] for x in xs), out.device, layernorm is not None, dtype)
    pad = MAX_SEGMENTS - nseg
    xs_p = list(xs) + [xs[0]] * pad
    ws_p = list(ws) + [ws[0]] * pad
    x_strides = [s for x in xs_p for s in x.stride()]
    w_strides = [s for w in ws_p for s in w.stride()]
    ks = [x.shape[1] for x in xs] + [0] * pad
    ns = (widths + [0] * MAX_SEGMENTS)[:MAX_SEGMENTS]
    cs = (offsets + [0] * MAX_SEGMENTS)[:MAX_SEGMENTS]
    dummy = out
    va, vb = mix if mix is not None else (dummy, dummy)
    ln_w, ln_b, eps = layernorm if layernorm is not None else (None, None, 0.0)
    if tune is None:
        tune = out.device.type == "cuda" and layernorm is None and config is None and dtype != torch.float64
    kernel = _linear_epilogue_tuned if tune else _linear_epilogue_kernel

    def grid(meta):
        return (num_samples * triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), max(1, len(widths)))

    meta = {} if tune else dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    kernel[grid if tune else grid(meta)](
        *xs_p, *ws_p, *x_strides, *w_strides, *ks, *ns, *cs,
        scale if scale is not None else dummy, *(scale.stride() if scale is not None else (0, 0)),
        bias if bias is not None else dummy, bias.stride(0) if bias is not None and bias_per_sample else 0,
        va, *va.stride()[-2:], vb, *vb.stride()[-2:],
        keep if keep is not None else dummy, *(keep.stride() if keep is not None else (0, 0)), float(drop_scale),
        residual if residual is not None else dummy, *(residual.stride() if residual is not None else (0, 0)),
        ln_w if ln_w is not None else dummy, ln_b if ln_b is not None else dummy, float(eps),
        grad if grad is not None else dummy, *(grad.stride() if grad is not None else (0, 0)),
        aux if aux is not None else dummy, *(aux.stride() if aux is not None else (0, 0)),
        out, out.stride(0), out.stride(1),
        T, N, num_samples, triton.next_power_of_2(M),
        NSEG=nseg, SCALED=scale is not None and grad_mode != 3, HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        GATE_MIX=mix is not None and grad_mode == 0, DROPOUT=keep is not None, RESIDUAL=residual is not None,
        LAYERNORM=layernorm is not None, HAS_LN_W=ln_w is not None, HAS_LN_B=ln_b is not None,
        ACC_FP64=dtype == torch.float64, GRAD=grad_mode, GROUPED=groups is not None,
        DOT_PRECISION="ieee" if dtype == torch.float64 else dot_precision(dtype),
        DOT_UPCAST=xs[0].device.type == "cpu" and dtype in (torch.float16, torch.bfloat16), **meta,
    )
    return out


def _out(lead, n, like):
    return like.new_empty((*lead, n))


# ---- ops (inputs validated by the functional API / op wrappers) -----------------------------------

@launcher
def linear_activation(x, weight, bias, activation="none"):
    """``act(x Wᵀ + b)``."""
    out = _out(x.shape[:-1], weight.shape[0], x)
    _launch([_rows(x)], [weight], _rows(out), bias=bias, activation=activation)
    return out


@launcher
def linear_residual_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps, keep_mask, dropout_p):
    from python_ref.ops.linear_epilogue import dropout_scale

    N = weight.shape[0]
    out = torch.empty_like(residual, memory_format=torch.contiguous_format)
    keep = None if keep_mask is None else _rows(keep_mask.view(torch.uint8))
    common = dict(bias=bias, keep=keep, drop_scale=dropout_scale(dropout_p), residual=_rows(residual))
    if N <= LN_FULL_ROW_MAX:
        return _launch([_rows(x)], [weight], _rows(out), layernorm=(ln_weight, ln_bias, eps), **common).view(
            out.shape)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.empty((out.numel() // N, N), dtype=acc, device=x.device)
    _launch([_rows(x)], [weight], h, **common)
    o2 = _rows(out)
    if h.shape[0]:
        _row_layernorm_kernel[(h.shape[0],)](h, h.stride(0), o2, o2.stride(0),
                                             ln_weight if ln_weight is not None else h,
                                             ln_bias if ln_bias is not None else h, float(eps), N,
                                             HAS_LN_W=ln_weight is not None, HAS_LN_B=ln_bias is not None,
                                             BLOCK_N=triton.next_power_of_2(N))
    return out


@launcher
def gated_fusion(a, b, weight, bias, mix_a, mix_b):
    da = a.shape[-1]
    out = _out(a.shape[:-1], weight.shape[0], a)
    va = _rows(a if mix_a is None else mix_a)
    vb = _rows(b if mix_b is None else mix_b)
    _launch([_rows(a), _rows(b)], [weight[:, :da], weight[:, da:]], _rows(out), bias=bias, mix=(va, vb))
    return out


def expert_mix(features, gate, weights, biases):
    with on_device(features[0]):  # a list first: the launcher decorator takes a tensor
        return _expert_mix(features, gate, weights, biases)


def _expert_mix(features, gate, weights, biases):
    B, T = features[0].shape[:2]
    out = features[0].new_empty((B, T, weights[0].shape[0]))
    acc = torch.float64 if features[0].dtype == torch.float64 else torch.float32
    scale = gate.to(acc).contiguous()
    # the gated bias sum_i gate[b, i] b_i is one tiny [B, D_out] product, added per sample in the epilogue
    bias = None if biases is None else scale @ torch.stack([b.to(acc) for b in biases])
    _launch([_rows(x) for x in features], list(weights), _rows(out), bias=bias, bias_per_sample=True,
            scale=scale, rows_per_sample=T)
    return out


def concat_linear(features, weight, bias, activation="none"):
    with on_device(features[0]):  # a list first: the launcher decorator takes a tensor
        return _concat_linear(features, weight, bias, activation)


def _concat_linear(features, weight, bias, activation="none"):
    out = _out(features[0].shape[:-1], weight.shape[0], features[0])
    ws, k0 = [], 0
    for x in features:
        ws.append(weight[:, k0:k0 + x.shape[-1]])
        k0 += x.shape[-1]
    _launch([_rows(x) for x in features], ws, _rows(out), bias=bias, activation=activation)
    return out


def split_linear(features, weights, biases, activation="none", layout="channel_concat"):
    with on_device(features[0]):  # a list first: the launcher decorator takes a tensor
        return _split_linear(features, weights, biases, activation, layout)


def _split_linear(features, weights, biases, activation="none", layout="channel_concat"):
    """One grouped launch writing each group into its column block of ``[M, sum D_out_i]``; the
    interleaved ``[..., N*T, D]`` output viewed as ``[M, N*D]`` is the same layout."""
    lead = features[0].shape[:-1]
    widths = [w.shape[0] for w in weights]
    if layout == "channel_concat":
        out = _out(lead, sum(widths), features[0])
    else:
        out = features[0].new_empty((*lead[:-1], lead[-1] * len(features), widths[0]))
    bias = None if biases is None else torch.cat(list(biases))  # [sum D_out_i], indexed like the output
    _launch([_rows(x) for x in features], list(weights), out.view(-1, sum(widths)), bias=bias,
            activation=activation, groups=widths)
    return out


@launcher
def mlp_projector(x, w1, b1, w2, b2, activation="gelu"):
    h = _out(x.shape[:-1], w1.shape[0], x)
    _launch([_rows(x)], [w1], _rows(h), bias=b1, activation=activation)
    out = _out(x.shape[:-1], w2.shape[0], x)
    _launch([_rows(h)], [w2], _rows(out), bias=b2)
    return out


# ---- ahead-of-time compile check ------------------------------------------------------------------

def aot_compile(dtype: str = "bf16", arch: int = 90, nseg: int = 2, scaled: bool = False, activation: str = "gelu",
                gate_mix: bool = False, layernorm: bool = False, dropout: bool = False, grad_mode: int = 0,
                grouped: bool = False, cfg: dict | None = None):
    """Compile one variant of the GEMM core for ``sm_<arch>`` without a GPU (needs a process without
    ``TRITON_INTERPRET=1``)."""
    from .aot import aot_compile as compile_for

    cfg = cfg or (_config(64, 768, 768, torch.device("cuda"), True) if layernorm
                  else _config(4096, 4096, 4096, torch.device("cuda"), False))
    acc = "fp64" if dtype == "fp64" else "fp32"
    types = {n: "*" + dtype for n in ("x0", "x1", "x2", "x3", "x4", "w0", "w1", "w2", "w3", "w4", "va_ptr", "vb_ptr",
                                       "res_ptr", "ln_w_ptr", "ln_b_ptr", "out_ptr", "grad_ptr", "aux_ptr")}
    types.update(scale_ptr="*" + acc, bias_ptr="*" + (acc if scaled else dtype), keep_ptr="*u8",
                 drop_scale="fp32", eps="fp32")
    values = dict(NSEG=nseg, SCALED=scaled, HAS_BIAS=True, ACTIVATION=ACTIVATION_CODES[activation],
                  GATE_MIX=gate_mix, DROPOUT=dropout, RESIDUAL=layernorm, LAYERNORM=layernorm, HAS_LN_W=layernorm,
                  HAS_LN_B=layernorm, ACC_FP64=dtype == "fp64", GRAD=grad_mode, GROUPED=grouped,
                  DOT_PRECISION="ieee" if dtype in ("fp32", "fp64")
                  else "tf32", DOT_UPCAST=False,
                  **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})
    return compile_for(_linear_epilogue_kernel, types, values, arch=arch, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"])


def aot_compile_layernorm_backward(dtype: str = "bf16", arch: int = 90, block_n: int = 1024):
    from .aot import aot_compile as compile_for

    types = {"h_ptr": "*fp32", "g_ptr": "*" + dtype, "keep_ptr": "*u8", "drop_scale": "fp32", "ln_w_ptr": "*" + dtype,
             "dres_ptr": "*" + dtype, "dz_ptr": "*" + dtype, "part_w_ptr": "*fp32", "part_b_ptr": "*fp32",
             "eps": "fp32"}
    return compile_for(_layernorm_backward_kernel, types, dict(ROWS=8, HAS_LN_W=True, DROPOUT=True, BLOCK_N=block_n),
                       arch=arch)


def aot_compile_row_layernorm(dtype: str = "bf16", arch: int = 90, block_n: int = 4096):
    from .aot import aot_compile as compile_for

    types = {"h_ptr": "*fp32", "out_ptr": "*" + dtype, "ln_w_ptr": "*" + dtype, "ln_b_ptr": "*" + dtype, "eps": "fp32"}
    return compile_for(_row_layernorm_kernel, types, dict(HAS_LN_W=True, HAS_LN_B=True, BLOCK_N=block_n), arch=arch)


# ---- backward (the GEMMs with torch matmuls; elementwise parts fused into the recompute epilogue) ----

def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weight_grads(dz, x2, weight, bias_dtype):
    """``(dx, dW, db)`` of ``z = x Wᵀ + b`` from ``dz [M, N]`` (x's dtype): torch matmuls, fp32 bias sum."""
    return dz @ weight, dz.t() @ x2, dz.sum(0, dtype=_acc(dz.dtype)).to(bias_dtype)


@launcher
def linear_activation_backward(grad, x, weight, bias, activation="none"):
    """``(dx, dW, db)``: one GEMM recomputes ``z`` and its epilogue stores ``grad * act'(z)`` (``z`` never
    goes to memory); then the two weight-gradient GEMMs."""
    x2, g2 = _rows(x), _rows(grad)
    if activation == "none":
        dz = g2.to(x.dtype)
    else:
        dz = x.new_empty(g2.shape)
        _launch([x2], [weight], dz, bias=bias, activation=activation, grad=g2, grad_mode=1)
    dx, dW, db = _weight_grads(dz, x2, weight, (bias if bias is not None else weight).dtype)
    return dx.view(x.shape), dW, db


@launcher
def linear_residual_layernorm_backward(grad, x, weight, bias, residual, ln_weight, ln_bias, eps, keep_mask,
                                       dropout_p):
    """Recompute the fp32 pre-norm sum with the GEMM core, then one row kernel for the LayerNorm and
    dropout vjp (d residual, dz, partial d ln_weight / d ln_bias), then the weight-gradient GEMMs."""
    from python_ref.ops.linear_epilogue import dropout_scale

    N = weight.shape[0]
    x2, r2, g2 = _rows(x), _rows(residual), _rows(grad)
    M = x2.shape[0]
    acc = _acc(x.dtype)
    keep = None if keep_mask is None else _rows(keep_mask.view(torch.uint8))
    h = torch.empty((M, N), dtype=acc, device=x.device)
    _launch([x2], [weight], h, bias=bias, keep=keep, drop_scale=dropout_scale(dropout_p), residual=r2)
    dres = residual.new_empty((M, N))
    dz = x.new_empty((M, N))
    rows = 8
    programs = triton.cdiv(M, rows)
    part_w = torch.zeros((max(programs, 1), N), dtype=acc, device=x.device)
    part_b = torch.zeros_like(part_w)
    if programs and N:
        _layernorm_backward_kernel[(programs,)](
            h, h.stride(0), g2, g2.stride(0), keep if keep is not None else h,
            keep.stride(0) if keep is not None else 0,
            float(dropout_scale(dropout_p)), ln_weight if ln_weight is not None else h,
            dres, dres.stride(0), dz, dz.stride(0), part_w, part_b, M, N, float(eps),
            ROWS=rows, HAS_LN_W=ln_weight is not None, DROPOUT=keep is not None, BLOCK_N=triton.next_power_of_2(N))
    dx, dW, db = _weight_grads(dz, x2, weight, (bias if bias is not None else weight).dtype)
    pdt = weight.dtype
    return (dx.view(x.shape), dW, db, dres.view(residual.shape),
            part_w.sum(0).to(pdt if ln_weight is None else ln_weight.dtype),
            part_b.sum(0).to(pdt if ln_bias is None else ln_bias.dtype))


@launcher
def gated_fusion_backward(grad, a, b, weight, bias, mix_a, mix_b):
    """One GEMM recomputes the gate pre-activation; its epilogue stores ``dz = grad (va - vb) g (1 - g)``
    and ``d va = grad g``; then ``d vb = grad - d va`` and the weight-gradient GEMMs."""
    da_ = a.shape[-1]
    a2, b2, g2 = _rows(a), _rows(b), _rows(grad)
    va = _rows(a if mix_a is None else mix_a)
    vb = _rows(b if mix_b is None else mix_b)
    wa, wb = weight[:, :da_], weight[:, da_:]
    dz = a.new_empty(g2.shape)
    dva = va.new_empty(g2.shape)
    _launch([a2, b2], [wa, wb], dz, bias=bias, mix=(va, vb), grad=g2, grad_mode=2, aux=dva)
    dvb = g2.to(dva.dtype) - dva
    d_a, d_b = dz @ wa, dz @ wb
    if mix_a is None:
        d_a, d_b = d_a + dva, d_b + dvb
    dW = torch.cat([dz.t() @ a2, dz.t() @ b2], dim=1)
    dbias = dz.sum(0, dtype=_acc(dz.dtype)).to((bias if bias is not None else weight).dtype)
    out_shape = (*a.shape[:-1], weight.shape[0])
    return (d_a.view(a.shape), d_b.view(b.shape), dW, dbias, dva.view(out_shape), dvb.view(out_shape))


def concat_linear_backward(grad, features, weight, bias, activation="none"):
    with on_device(features[0]):
        return _concat_linear_backward(grad, features, weight, bias, activation)


def _concat_linear_backward(grad, features, weight, bias, activation):
    xs = [_rows(x) for x in features]
    ws, k0 = [], 0
    for x in features:
        ws.append(weight[:, k0:k0 + x.shape[-1]])
        k0 += x.shape[-1]
    g2 = _rows(grad)
    if activation == "none":
        dz = g2.to(xs[0].dtype)
    else:
        dz = xs[0].new_empty(g2.shape)
        _launch(xs, ws, dz, bias=bias, activation=activation, grad=g2, grad_mode=1)
    d_feats = [(dz @ w).view(x.shape) for w, x in zip(ws, features)]
    dW = torch.cat([dz.t() @ x for x in xs], dim=1)
    return d_feats, dW, dz.sum(0, dtype=_acc(dz.dtype)).to((bias if bias is not None else weight).dtype)


def split_linear_backward(grad, features, weights, biases, activation="none", layout="channel_concat"):
    """One grouped recompute launch storing ``grad * act'(z)`` for every group's column block, then each
    group's weight-gradient matmuls."""
    with on_device(features[0]):
        widths = [w.shape[0] for w in weights]
        g2 = grad.reshape(-1, sum(widths)).to(features[0].dtype)  # the interleaved layout viewed as column blocks
        xs = [_rows(x) for x in features]
        if activation == "none":
            dz = g2
        else:
            dz = torch.empty_like(g2)
            bias = None if biases is None else torch.cat(list(biases))
            _launch(xs, list(weights), dz, bias=bias, activation=activation, grad=g2, grad_mode=1, groups=widths)
        d_feats, d_weights, d_biases, off = [], [], [], 0
        for i, (x, x2, w) in enumerate(zip(features, xs, weights)):
            dzi = dz[:, off:off + widths[i]]
            off += widths[i]
            dx, dW, db = _weight_grads(dzi, x2, w, (w if biases is None else biases[i]).dtype)
            d_feats.append(dx.view(x.shape))
            d_weights.append(dW)
            d_biases.append(db)
        return d_feats, d_weights, d_biases if biases is not None else []


@launcher
def mlp_projector_backward(grad, x, w1, b1, w2, b2, activation="gelu"):
    """Recompute the hidden activation (GEMM core, bias + act epilogue) for ``dW2``; ``dh = grad W2``; the
    first layer's vjp fuses ``dh * act'(z1)`` into its recompute epilogue."""
    x2, g2 = _rows(x), _rows(grad)
    h = x.new_empty((x2.shape[0], w1.shape[0]))
    _launch([x2], [w1], h, bias=b1, activation=activation)
    g2 = g2.to(x.dtype)
    dh, dW2, db2 = _weight_grads(g2, h, w2, (b2 if b2 is not None else w2).dtype)
    dx, dW1, db1 = linear_activation_backward(dh, x2, w1, b1, activation)
    return dx.view(x.shape), dW1, db1, dW2, db2


def expert_mix_backward(grad, features, gate, weights, biases):
    with on_device(features[0]):
        return _expert_mix_backward(grad, features, gate, weights, biases)


def _expert_mix_backward(grad, features, gate, weights, biases):
    """Per expert one GEMM ``grad W_i`` whose epilogue stores ``d x_i = gate * (grad W_i)`` and per-tile
    partial sums of ``(grad W_i) * x_i`` for ``d gate`` (tiles never straddle samples: the sum per sample
    is a reshape); then ``d W_i = (gate * grad)ᵀ x_i`` as a torch matmul."""
    B, T, d_out = grad.shape
    dtype = features[0].dtype
    acc = _acc(dtype)
    g2 = _rows(grad).to(dtype)
    gate_acc = gate.to(acc)
    gy_rows = grad.sum(1, dtype=acc)  # [B, D_out]
    d_feats, d_gate, d_weights, d_biases = [], [], [], []
    for i, (x, w) in enumerate(zip(features, weights)):
        x2 = _rows(x)
        cfg = _config(B * T, x.shape[2], d_out, x.device, False, dtype)
        tiles = triton.cdiv(T, cfg["BLOCK_M"])
        part = torch.zeros((B * tiles, triton.cdiv(x.shape[2], cfg["BLOCK_N"])), dtype=acc, device=x.device)
        dx = x.new_empty(x2.shape)
        _launch([g2], [w.t()], dx, scale=gate_acc[:, i:i + 1], rows_per_sample=T, mix=(x2, x2), grad_mode=3,
                aux=part, config=cfg, tune=False)
        dg = part.sum(1).view(B, tiles).sum(1)
        if biases is not None:
            dg = dg + gy_rows @ biases[i].to(acc)
            d_biases.append((gy_rows * gate_acc[:, i:i + 1]).sum(0).to(biases[i].dtype))
        d_gate.append(dg)
        d_feats.append(dx.view(x.shape))
        scaled = (grad * gate_acc[:, i, None, None]).to(dtype)
        d_weights.append(_rows(scaled).t() @ x2)
    return d_feats, torch.stack(d_gate, 1).to(gate.dtype), d_weights, d_biases
