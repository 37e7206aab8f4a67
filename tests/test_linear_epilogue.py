"""Linear + fused-epilogue ops (linear_residual_layernorm, linear_gelu, concat_linear, split_linear,
mlp_projector): every backend against python_ref in float64, forward and backward; dropout; errors;
opcheck; torch.compile; the triton backend runs under the interpreter here."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import KernelRecorder, assert_close, f64, leaves, opcheck, run_without_interpreter, tol
from vlmkernels import ops
from vlmkernels.triton import linear_epilogue as tri

ref = importlib.import_module("python_ref.ops.linear_epilogue")
BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = ["none", "gelu", "gelu_tanh"]


def rand(*shape, dtype=torch.float32, scale=1.0, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def linear_params(n, k, dtype, bias=True):
    w = rand(n, k, dtype=dtype, scale=k ** -0.5)
    return w, (rand(n, dtype=dtype) if bias else None)


def close_to_f64(got, want64, dtype, msg, factor=1.0):
    atol, rtol = tol(dtype)
    assert_close(got, want64.to(dtype) if dtype == torch.float32 else want64, atol=factor * atol,
                 rtol=factor * rtol, dtype=dtype, msg=msg)


# ---- linear_residual_layernorm ---------------------------------------------------------------------

def lrln_inputs(lead, k, n, dtype, affine=True, bias=True):
    x = rand(*lead, k, dtype=dtype)
    w, b = linear_params(n, k, dtype, bias)
    res = rand(*lead, n, dtype=dtype)
    lw = (1 + 0.3 * rand(n)).to(dtype) if affine else None
    lb = rand(n, dtype=dtype, scale=0.2) if affine else None
    return x, w, b, res, lw, lb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(5, 1), (3, 3), (37, 37), (11, 13)])
def test_lrln_forward(backend, dtype, k, n):
    args = lrln_inputs((3, 7), k, n, dtype, affine=n != 3, bias=k != 3)
    out = ops.linear_residual_layernorm(*args, 1e-5, backend=backend)
    assert out.dtype == dtype and out.shape == (3, 7, n)
    close_to_f64(out, ref.linear_residual_layernorm(*f64(args), 1e-5), dtype, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1023, 1100])  # full-row epilogue (<= 1024) and GEMM + row LayerNorm kernel
def test_lrln_wide_rows(backend, n):
    args = lrln_inputs((2,), 19, n, torch.float32)
    out = ops.linear_residual_layernorm(*args, 1e-12, backend=backend)
    close_to_f64(out, ref.linear_residual_layernorm(*f64(args), 1e-12), torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_lrln_backward(backend, p):
    args = lrln_inputs((2, 5), 9, 7, torch.float32)
    ls = leaves(args)
    torch.manual_seed(3)
    out = ops.linear_residual_layernorm(*ls, 1e-5, p, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.manual_seed(3)  # the same keep-mask, drawn the same way
    keep = None if p == 0 else torch.empty(out.shape, dtype=torch.bool).bernoulli_(1 - p)
    want = leaves(f64(args))
    ref.linear_residual_layernorm(*want, 1e-5, keep, p).backward(grad.double())
    for got, w, name in zip(ls, want, ("x", "weight", "bias", "residual", "ln_weight", "ln_bias")):
        assert_close(got.grad, w.grad.float(), atol=1e-4, rtol=1e-4, msg=f"d{name}")


def test_lrln_reference_vjp_is_autograd_and_gradcheck():
    args = lrln_inputs((2, 3), 4, 5, torch.float64)
    keep = torch.rand(2, 3, 5) > 0.4
    ls = leaves(args)
    grad = torch.randn(2, 3, 5, dtype=torch.float64)
    want = torch.autograd.grad(ref.linear_residual_layernorm(*ls, 1e-5, keep, 0.4), ls, grad)
    got = ref.linear_residual_layernorm_backward(grad, *args, 1e-5, keep, 0.4)
    for g, w in zip(got, want):
        assert_close(g, w)
    op = torch.ops.vlmkernels.linear_residual_layernorm.default
    assert torch.autograd.gradcheck(lambda *t: op(*t, 1e-5, keep, 0.4, "reference"), tuple(leaves(args)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lrln_dropout_same_mask_on_every_backend(dtype):
    args = lrln_inputs((4, 6), 8, 16, dtype)
    outs = []
    for backend in BACKENDS:
        torch.manual_seed(11)
        outs.append(ops.linear_residual_layernorm(*args, 1e-5, 0.5, backend=backend))
    assert_close(outs[0], outs[1], msg="same seed, same mask")
    torch.manual_seed(11)
    keep = torch.empty(4, 6, 16, dtype=torch.bool).bernoulli_(0.5)
    close_to_f64(outs[1], ref.linear_residual_layernorm(*f64(args), 1e-5, keep, 0.5), dtype, "mask")
    torch.manual_seed(12)
    assert not torch.equal(ops.linear_residual_layernorm(*args, 1e-5, 0.5, backend="triton"), outs[1])
    # p = 1 drops the whole projection: LayerNorm(residual)
    x, w, b, res, lw, lb = args
    out = ops.linear_residual_layernorm(*args, 1e-5, 1.0, backend="triton")
    close_to_f64(out, F.layer_norm(res.double(), (16,), lw.double(), lb.double(), 1e-5), dtype, "p=1")


def test_lrln_matches_hf_blip2_output_block():
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerOutput

    cfg = Blip2QFormerConfig(hidden_size=24, intermediate_size=40, hidden_dropout_prob=0.0)
    block = Blip2QFormerOutput(cfg).eval()
    h, res = torch.randn(2, 5, 40), torch.randn(2, 5, 24)
    want = block(h, res)
    got = ops.linear_residual_layernorm(h, block.dense.weight, block.dense.bias, res, block.LayerNorm.weight,
                                        block.LayerNorm.bias, block.LayerNorm.eps, backend="triton")
    assert_close(got, want)


def test_lrln_errors_name_the_argument():
    x, w, b, res, lw, lb = lrln_inputs((2, 3), 4, 5, torch.float32)
    cases = [
        ((x, w[:, :3], b, res, lw, lb, 1e-5), ValueError, "weight"),
        ((x, w, b[:4], res, lw, lb, 1e-5), ValueError, "bias"),
        ((x, w, b, res[..., :4], lw, lb, 1e-5), ValueError, "residual"),
        ((x, w, b, res.half(), lw, lb, 1e-5), TypeError, "residual"),
        ((x, w.double(), b, res, lw, lb, 1e-5), TypeError, "weight"),
        ((x, w, b, res, lw[:2], lb, 1e-5), ValueError, "ln_weight"),
        ((x, w, b, res, lw, lb.half(), 1e-5), TypeError, "ln_bias"),
        ((x, w, b, res, lw, lb, -1.0), ValueError, "eps"),
        ((x.long(), w, b, res, lw, lb, 1e-5), TypeError, "x"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            ops.linear_residual_layernorm(*args)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.linear_residual_layernorm(x, w, b, res, lw, lb, 1e-5, 1.5)
    with pytest.raises(ValueError, match="keep_mask"):
        torch.ops.vlmkernels.linear_residual_layernorm(x, w, b, res, lw, lb, 1e-5, torch.ones(2, 3, 5), 0.1,
                                                       "reference")


# ---- linear_gelu / concat_linear -------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", [(1, 3), (37, 5), (6, 1023)])
def test_linear_gelu(backend, dtype, k, n):
    x = rand(2, 3, k, dtype=dtype)
    w, b = linear_params(n, k, dtype, bias=n != 5)
    out = ops.linear_gelu(x, w, b, backend=backend)
    close_to_f64(out, ref.linear_gelu(*f64([x, w, b])), dtype, f"{backend}")


def test_linear_gelu_is_erf_not_tanh():
    x, (w, b) = rand(64, 4, scale=3.0), linear_params(8, 4, torch.float64)
    x = x.double()
    out = ops.linear_gelu(x, w, b, backend="triton")
    assert_close(out, F.gelu(x @ w.T + b))
    assert (out - F.gelu(x @ w.T + b, approximate="tanh")).abs().max() > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(7,), (1, 3), (3, 37, 5), (2, 4, 1, 6, 3)])
@pytest.mark.parametrize("activation", ACTS)
def test_concat_linear(backend, dtype, dims, activation):
    feats = [rand(2, 5, d, dtype=dtype) for d in dims]
    w, b = linear_params(11, sum(dims), dtype)
    out = ops.concat_linear(feats, w, b, activation, backend=backend)
    assert out.shape == (2, 5, 11) and out.dtype == dtype
    close_to_f64(out, ref.concat_linear(f64(feats), f64(w), f64(b), activation), dtype, f"{backend} {activation}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTS)
def test_concat_linear_backward(backend, activation):
    feats = [rand(3, d) for d in (4, 1, 6)]
    w, b = linear_params(5, 11, torch.float32)
    fl, (wl, bl) = leaves(feats), leaves([w, b])
    grad = torch.randn(3, 5)
    ops.concat_linear(fl, wl, bl, activation, backend=backend).backward(grad)
    f64l, (w64, b64) = leaves(f64(feats)), leaves([w.double(), b.double()])
    ref.concat_linear(f64l, w64, b64, activation).backward(grad.double())
    for got, want in zip(fl + [wl, bl], f64l + [w64, b64]):
        assert_close(got.grad, want.grad.float(), atol=1e-4, rtol=1e-4, msg=activation)


def test_concat_linear_strided_inputs_and_no_bias():
    base = rand(4, 9)
    feats = [base[:, :4], base[:, 4:].t().contiguous().t()]  # a column slice and a transposed copy
    w, _ = linear_params(6, 9, torch.float32)
    w_t = w.t().contiguous().t()
    got = ops.concat_linear(feats, w_t, None, "gelu", backend="triton")
    assert_close(got, F.gelu(base @ w.T))


# ---- split_linear ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channel_concat", "token_interleave"])
@pytest.mark.parametrize("groups", [1, 2, 5])
def test_split_linear(backend, dtype, layout, groups):
    dims = [3, 37, 1, 5, 8][:groups]
    outs = [7] * groups if layout == "token_interleave" else [7, 3, 1, 9, 4][:groups]
    feats = [rand(2, 3, d, dtype=dtype) for d in dims]
    params = [linear_params(o, d, dtype) for o, d in zip(outs, dims)]
    ws, bs = [p[0] for p in params], [p[1] for p in params]
    for activation in ACTS:
        out = ops.split_linear(feats, ws, bs, activation, layout, backend=backend)
        want = ref.split_linear(f64(feats), f64(ws), f64(bs), activation, layout)
        close_to_f64(out, want, dtype, f"{backend} {layout} {activation}")
    if layout == "token_interleave":  # LEO: torch.empty(B, N*T, D) with out[:, i::N] = group i
        expected = torch.empty(2, 3 * groups, 7, dtype=torch.float64)
        for i in range(groups):
            expected[:, i::groups] = F.gelu(f64(feats[i]) @ f64(ws[i]).T + f64(bs[i]))
        close_to_f64(ops.split_linear(feats, ws, bs, "gelu", layout, backend=backend), expected, dtype, "LEO")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channel_concat", "token_interleave"])
def test_split_linear_backward(backend, layout):
    dims, outs = [3, 5], ([4, 4] if layout == "token_interleave" else [4, 2])
    feats = [rand(2, 3, d) for d in dims]
    params = [linear_params(o, d, torch.float32) for o, d in zip(outs, dims)]
    ws = [p[0] for p in params]
    fl, wl = leaves(feats), leaves(ws)
    out = ops.split_linear(fl, wl, None, "gelu_tanh", layout, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    f64l, w64 = leaves(f64(feats)), leaves(f64(ws))
    ref.split_linear(f64l, w64, None, "gelu_tanh", layout).backward(grad.double())
    for got, want in zip(fl + wl, f64l + w64):
        assert_close(got.grad, want.grad.float(), atol=1e-4, rtol=1e-4)


# ---- mlp_projector ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_mlp_projector(backend, dtype, activation):
    x = rand(2, 5, 13, dtype=dtype)
    (w1, b1), (w2, b2) = linear_params(37, 13, dtype), linear_params(9, 37, dtype)
    out = ops.mlp_projector(x, w1, b1, w2, b2, activation, backend=backend)
    # the hidden activation is stored in x's dtype: compare with python_ref in that dtype
    assert_close(out, ref.mlp_projector(x, w1, b1, w2, b2, activation), msg=f"{backend} {activation}")
    close_to_f64(out, ref.mlp_projector(*f64([x, w1, b1, w2, b2]), activation), dtype, "f64", factor=2)


def test_mlp_projector_matches_hf_llava_projector():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    text = LlamaConfig(hidden_size=20, num_attention_heads=2, num_key_value_heads=2)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=12), text_config=text)
    proj = LlavaMultiModalProjector(cfg)
    x = torch.randn(2, 7, 12)
    got = ops.mlp_projector(x, proj.linear_1.weight, proj.linear_1.bias, proj.linear_2.weight, proj.linear_2.bias,
                            backend="triton")
    assert_close(got, proj(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_projector_backward(backend):
    x = rand(3, 4, 6)
    (w1, b1), (w2, b2) = linear_params(8, 6, torch.float32), linear_params(5, 8, torch.float32)
    ls = leaves([x, w1, b1, w2, b2])
    grad = torch.randn(3, 4, 5)
    ops.mlp_projector(*ls, "gelu", backend=backend).backward(grad)
    want = leaves(f64([x, w1, b1, w2, b2]))
    ref.mlp_projector(*want, "gelu").backward(grad.double())
    for got, w in zip(ls, want):
        assert_close(got.grad, w.grad.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op_name", ["linear_gelu", "concat_linear", "split_linear", "mlp_projector"])
def test_reference_vjps_gradcheck(op_name):
    """float64 gradcheck of each op through its autograd (backward op = python_ref's hand-written vjp)."""
    d = dict(dtype=torch.float64)
    x, y = rand(2, 3, **d), rand(2, 4, **d)
    w, b = linear_params(5, 3, torch.float64)
    w2, b2 = linear_params(5, 4, torch.float64)
    wc = rand(5, 7, **d)
    fns = {
        "linear_gelu": (lambda x, w, b: ops.linear_gelu(x, w, b, backend="reference"), (x, w, b)),
        "concat_linear": (lambda x, y, w, b: ops.concat_linear([x, y], w, b, "gelu_tanh", backend="reference"),
                          (x, y, wc, b)),
        "split_linear": (lambda x, y, w, w2, b: ops.split_linear([x, y], [w, w2], [b, b], "gelu", "token_interleave",
                                                                 backend="reference"), (x, y, w, w2, b)),
        "mlp_projector": (lambda x, w, b, w2: ops.mlp_projector(x, w, b, w2, None, backend="reference"),
                          (x, w, b, rand(4, 5, **d))),
    }
    fn, args = fns[op_name]
    assert torch.autograd.gradcheck(fn, tuple(leaves(args)))


# ---- backward ops on the triton backend (recompute epilogues) ------------------------------------

def _backward_cases(dtype):
    x, r, g = rand(2, 5, 7, dtype=dtype), rand(2, 5, 6, dtype=dtype), rand(2, 5, 6, dtype=dtype)
    w, b = linear_params(6, 7, dtype)
    lw, lb = (1 + 0.3 * rand(6)).to(dtype), rand(6, dtype=dtype)
    keep = torch.rand(2, 5, 6) > 0.3
    feats = [rand(2, 5, 3, dtype=dtype), rand(2, 5, 4, dtype=dtype)]
    ws = [linear_params(6, 3, dtype)[0], linear_params(6, 4, dtype)[0]]
    w2 = linear_params(4, 6, dtype)[0]
    V = torch.ops.vlmkernels
    return {
        "lrln": (V.linear_residual_layernorm_backward, ref.linear_residual_layernorm_backward,
                 (g, x, w, b, r, lw, lb, 1e-5, keep, 0.3)),
        "lrln_plain": (V.linear_residual_layernorm_backward, ref.linear_residual_layernorm_backward,
                       (g, x, w, None, r, None, None, 1e-5, None, 0.0)),
        "lrln_wide": (V.linear_residual_layernorm_backward, ref.linear_residual_layernorm_backward,
                      (rand(3, 1100, dtype=dtype), x[0, :3], linear_params(1100, 7, dtype)[0], None,
                       rand(3, 1100, dtype=dtype), None, None, 1e-5, None, 0.0)),
        "gelu": (V.linear_gelu_backward, lambda *a: ref.linear_activation_backward(*a, "gelu"), (g, x, w, b)),
        "concat": (V.concat_linear_backward, ref.concat_linear_backward, (g, feats, w, b, "gelu_tanh")),
        "split_ti": (V.split_linear_backward, ref.split_linear_backward,
                     (rand(2, 10, 6, dtype=dtype), feats, ws, [b, b], "gelu", "token_interleave")),
        "split_cc": (V.split_linear_backward, lambda *a: (*ref.split_linear_backward(*a)[:2], []),
                     (rand(2, 5, 12, dtype=dtype), feats, ws, None, "none", "channel_concat")),
        "mlp": (V.mlp_projector_backward, ref.mlp_projector_backward, (rand(2, 5, 4, dtype=dtype), x, w, b, w2, None,
                                                                       "gelu")),
    }


def _flatten(t):
    return [u for v in t for u in (_flatten(v) if isinstance(v, (list, tuple)) else [v])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["lrln", "lrln_plain", "lrln_wide", "gelu", "concat", "split_ti", "split_cc", "mlp"])
def test_backward_ops_triton(case, dtype):
    """The triton backward (GEMM recompute with the elementwise vjp in its epilogue, torch matmuls for the
    weight gradients) against python_ref's vjp in float64; 16-bit runs round dz once, like autograd."""
    op, vjp, args = _backward_cases(dtype)[case]
    got = _flatten(op.default(*args, "triton"))
    want = _flatten(vjp(*f64(list(args))))
    assert len(got) == len(want)
    for i, (a, e) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        scale = max(1.0, float(e.abs().max()))  # weight gradients sum over rows: compare relative to their size
        atol, rtol = tol(dtype)
        assert_close(a, e.to(dtype) if dtype == torch.float32 else e, atol=2 * atol * scale, rtol=2 * rtol,
                     dtype=dtype, msg=f"{case}[{i}]")


# ---- shared: errors, empties, opcheck, compile, TF32 ---------------------------------------------

def test_projector_errors_name_the_argument():
    x = [rand(2, 3), rand(2, 4)]
    w, b = linear_params(5, 7, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        ops.concat_linear(x, w[:, :6], b)
    with pytest.raises(ValueError, match="features must not be empty"):
        ops.concat_linear([], w, b)
    with pytest.raises(ValueError, match=r"features\[1\]"):
        ops.concat_linear([x[0], rand(3, 4)], w, b)
    with pytest.raises(TypeError, match=r"features\[1\]"):
        ops.concat_linear([x[0], x[1].double()], w, b)
    with pytest.raises(ValueError, match="activation"):
        ops.concat_linear(x, w, b, "swish")
    with pytest.raises(ValueError, match="at most 5"):
        ops.concat_linear([rand(2, 1)] * 6, rand(5, 6), b)
    ws = [rand(5, 3), rand(4, 4)]
    with pytest.raises(ValueError, match="weights must have 2 entries"):
        ops.split_linear(x, ws[:1], None)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        ops.split_linear(x, [ws[0], rand(4, 3)], None)
    with pytest.raises(ValueError, match="layout"):
        ops.split_linear(x, ws, None, "none", "rows")
    with pytest.raises(ValueError, match="equal output widths"):
        ops.split_linear(x, ws, None, "none", "token_interleave")
    with pytest.raises(ValueError, match="biases must have 2 entries"):
        ops.split_linear(x, ws, [rand(5)])
    with pytest.raises(ValueError, match="w2"):
        ops.mlp_projector(x[0], rand(6, 3), None, rand(4, 5), None)
    with pytest.raises(ValueError, match="activation"):
        ops.mlp_projector(x[0], rand(6, 3), None, rand(4, 6), None, "silu")
    with pytest.raises(ValueError, match="bias"):
        ops.linear_gelu(x[0], rand(6, 3), rand(5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    x = rand(0, 4)
    w, b = linear_params(3, 4, torch.float32)
    assert ops.linear_gelu(x, w, b, backend=backend).shape == (0, 3)
    assert ops.concat_linear([x, rand(0, 2)], rand(3, 6), b, backend=backend).shape == (0, 3)
    assert ops.split_linear([rand(2, 0, 4)] * 2, [w, w], None, "none", "token_interleave",
                            backend=backend).shape == (2, 0, 3)
    assert ops.mlp_projector(x, w, b, rand(2, 3), None, backend=backend).shape == (0, 2)
    assert ops.linear_residual_layernorm(x, w, b, rand(0, 3), None, None, 1e-5, backend=backend).shape == (0, 3)
    # K = 0: the projection is the bias alone
    assert_close(ops.linear_gelu(rand(2, 0), rand(3, 0), b, backend=backend), F.gelu(b).expand(2, 3))


def _opcheck_cases():
    x, r = rand(3, 4), rand(3, 5)
    w, b = linear_params(5, 4, torch.float32)
    lw, lb = rand(5), rand(5)
    keep = torch.rand(3, 5) > 0.5
    feats, ws = [rand(2, 3, 2), rand(2, 3, 4)], [rand(5, 2), rand(5, 4)]
    V = torch.ops.vlmkernels
    return [
        (V.linear_residual_layernorm, (x, w, b, r, lw, lb, 1e-5, keep, 0.5)),
        (V.linear_residual_layernorm_backward, (r, x, w, b, r, lw, lb, 1e-5, keep, 0.5)),
        (V.linear_gelu, (x, w, b)),
        (V.linear_gelu_backward, (r, x, w, None)),
        (V.concat_linear, ([x, rand(3, 2)], rand(5, 6), b, "gelu")),
        (V.concat_linear_backward, (r, [x, rand(3, 2)], rand(5, 6), b, "gelu_tanh")),
        (V.split_linear, (feats, ws, [b, b], "gelu", "token_interleave")),
        (V.split_linear_backward, (rand(2, 6, 5), feats, ws, None, "none", "token_interleave")),
        (V.mlp_projector, (x, w, b, rand(2, 5), None, "gelu_tanh")),
        (V.mlp_projector_backward, (rand(3, 2), x, w, b, rand(2, 5), None, "gelu")),
    ]


@pytest.mark.parametrize("case,backend", [(c, b) for c in range(10) for b in BACKENDS])
def test_opcheck(case, backend):
    opcheck(*_opcheck_cases()[case], backend)


@pytest.mark.parametrize("op_name", ["linear_residual_layernorm", "linear_gelu", "concat_linear", "split_linear",
                                     "mlp_projector"])
def test_compile_fullgraph_training_step(op_name):
    x, r = rand(3, 4), rand(3, 5)
    w, b = linear_params(5, 4, torch.float32)
    calls = {
        "linear_residual_layernorm": (lambda x, w, b, r: ops.linear_residual_layernorm(x, w, b, r, None, b, 1e-5, 0.2),
                                      (x, w, b, r)),
        "linear_gelu": (lambda x, w, b: ops.linear_gelu(x, w, b), (x, w, b)),
        "concat_linear": (lambda x, y, w, b: ops.concat_linear([x, y], w, b, "gelu"), (x, rand(3, 2), rand(5, 6), b)),
        "split_linear": (lambda x, y, w, b: ops.split_linear([x, y], [w, w[:, :2]], None, "gelu", "token_interleave"),
                         (x, rand(3, 2), w, b)),
        "mlp_projector": (lambda x, w, b: ops.mlp_projector(x, w, b, w[:, 1:].T, None), (x, w, b)),
    }
    fn, args = calls[op_name]

    def loss(*t):
        return fn(*t).square().sum()

    compiled = leaves(args)
    torch.manual_seed(5)
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled).backward()
    eager = leaves(args)
    torch.manual_seed(5)
    loss(*eager).backward()
    for a, e in zip(compiled, eager):
        assert (a.grad is None) == (e.grad is None)
        if e.grad is not None:
            assert_close(a.grad, e.grad)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_tf32_follows_torch(monkeypatch, allow_tf32):
    rec = KernelRecorder(tri._linear_epilogue_kernel)
    monkeypatch.setattr(tri, "_linear_epilogue_kernel", rec)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        ops.concat_linear([rand(3, 4), rand(3, 2)], rand(5, 6), None, "gelu", backend="triton")
        ops.linear_gelu(rand(3, 4).half(), rand(5, 4).half(), None, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert rec.calls[0]["DOT_PRECISION"] == ("tf32" if allow_tf32 else "ieee")
    assert rec.calls[0]["NSEG"] == 2 and rec.calls[0]["ACTIVATION"] == 1


def test_layernorm_epilogue_choice(monkeypatch):
    """Rows up to 1024 wide are normalized in the GEMM's epilogue (one launch); wider ones go through the
    fp32 pre-norm buffer and the row LayerNorm kernel."""
    rec = KernelRecorder(tri._linear_epilogue_kernel)
    monkeypatch.setattr(tri, "_linear_epilogue_kernel", rec)
    ops.linear_residual_layernorm(rand(2, 3), rand(768, 3), None, rand(2, 768), None, None, 1e-5, backend="triton")
    ops.linear_residual_layernorm(rand(2, 3), rand(1025, 3), None, rand(2, 1025), None, None, 1e-5, backend="triton")
    assert [c["LAYERNORM"] for c in rec.calls] == [True, False]
    assert rec.calls[0]["BLOCK_N"] == 1024 and rec.calls[1]["RESIDUAL"]


def test_kernels_compile_for_sm90():
    """The GEMM core (plain bf16/fp32 with GELU, full-row LayerNorm with dropout, the activation-vjp
    epilogue), the row LayerNorm kernel and its vjp kernel build to cubins for sm_90 without a GPU."""
    run_without_interpreter(
        "from vlmkernels.triton.linear_epilogue import aot_compile, aot_compile_row_layernorm\n"
        "for dt in ('bf16', 'fp32'):\n"
        "    assert aot_compile(dt, nseg=3, activation='gelu_tanh').asm['cubin']\n"
        "assert aot_compile('bf16', nseg=1, layernorm=True, dropout=True, activation='none').asm['cubin']\n"
        "assert aot_compile_row_layernorm('bf16').asm['cubin']\n"
        "assert aot_compile('bf16', nseg=2, activation='gelu', grad_mode=1).asm['cubin']\n"
        "assert aot_compile('bf16', nseg=2, activation='gelu', grouped=True).asm['cubin']\n"
        "from vlmkernels.triton.linear_epilogue import aot_compile_layernorm_backward\n"
        "assert aot_compile_layernorm_backward('bf16').asm['cubin']\n")


def test_autotuned_launch_path():
    """The CUDA path autotunes over TUNE_CONFIGS (the grid follows each config's tiles); run here with a
    wall-clock timer under the interpreter, with segments, per-sample scales and a strided output."""
    x, (w, b) = rand(20, 37), linear_params(30, 37, torch.float32)
    out = torch.empty(20, 45)[:, 5:35]
    tri._launch([x], [w], out, bias=b, activation="gelu", tune=True)
    assert_close(out, F.gelu(x.double() @ w.double().T + b.double()).float())
    feats, ws = [rand(3, 4, d) for d in (3, 5)], [rand(7, d) for d in (3, 5)]
    gate = torch.rand(3, 2)
    gate[1, 0] = 0
    mixed = torch.empty(12, 7)
    tri._launch([f.reshape(12, -1) for f in feats], ws, mixed, scale=gate, rows_per_sample=4, tune=True)
    want = sum(gate[:, i, None, None].double() * (f64(feats[i]) @ f64(ws[i]).T) for i in range(2))
    assert_close(mixed, want.reshape(12, 7).float())
    assert tri._linear_epilogue_tuned.best_config is not None
    # grouped (split_linear): a 2-D grid, one program column per group
    grouped = torch.empty(12, 7 + 4)
    tri._launch([f.reshape(12, -1) for f in feats], [ws[0], ws[1][:4]], grouped, groups=[7, 4], tune=True)
    want = torch.cat([f64(feats[0]) @ f64(ws[0]).T, f64(feats[1]) @ f64(ws[1][:4]).T], -1).reshape(12, 11)
    assert_close(grouped, want.float())


def test_split_linear_is_one_grouped_launch(monkeypatch):
    rec = KernelRecorder(tri._linear_epilogue_kernel)
    monkeypatch.setattr(tri, "_linear_epilogue_kernel", rec)
    feats = [rand(2, 3, d) for d in (3, 5, 4)]
    ws = [linear_params(6, d, torch.float32)[0] for d in (3, 5, 4)]
    out = ops.split_linear(feats, ws, None, "gelu", "token_interleave", backend="triton")
    assert [(c["GROUPED"], c["ACTIVATION"]) for c in rec.calls] == [(True, 1)]
    assert_close(out, ref.split_linear(f64(feats), f64(ws), None, "gelu", "token_interleave").float())
