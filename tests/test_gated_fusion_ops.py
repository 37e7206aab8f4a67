"""gated_fusion, expert_mix, vision_router: every backend against python_ref in float64, forward and
backward (zero gates, top-k near-ties), errors, opcheck, torch.compile; triton under the interpreter."""

import importlib

import pytest
import torch

from tests.helpers import KernelRecorder, assert_close, f64, leaves, opcheck, run_without_interpreter
from vlmkernels import ops
from vlmkernels.triton import linear_epilogue as tri

ref = importlib.import_module("python_ref.ops.fusion_gates")
BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype)


def close_to_f64(got, want64, dtype, msg):
    assert_close(got, want64.to(dtype) if dtype == torch.float32 else want64, dtype=dtype, msg=msg)


# ---- gated_fusion ----------------------------------------------------------------------------------

def gate_inputs(lead, d, dtype, bias=True):
    a, b = rand(*lead, d, dtype=dtype), rand(*lead, d, dtype=dtype)
    w = rand(d, 2 * d, dtype=dtype, scale=(2 * d) ** -0.5)
    return a, b, w, (rand(d, dtype=dtype) if bias else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 37])
def test_gated_fusion_forward(backend, dtype, d):
    args = gate_inputs((2, 5), d, dtype, bias=d != 3)
    out = ops.gated_fusion(*args, backend=backend)
    assert out.shape == (2, 5, d) and out.dtype == dtype
    a, b, w, c = f64(args)
    g = torch.sigmoid(torch.cat([a, b], -1) @ w.T + (0 if c is None else c))
    close_to_f64(out, g * a + (1 - g) * b, dtype, f"{backend} {dtype}")


def test_gated_fusion_wide_rows_triton():
    args = gate_inputs((3,), 1023, torch.float32)
    assert_close(ops.gated_fusion(*args, backend="triton"), ref.gated_fusion(*f64(args)).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_fusion_gmu_mix_values(backend):
    """The published GMU: a gate to out_dim over [a; b] of different widths mixing tanh projections."""
    a, b = rand(2, 3, 11), rand(2, 3, 5)
    w, c = rand(7, 16, scale=0.25), rand(7)
    ha, hb = torch.tanh(rand(2, 3, 7)), torch.tanh(rand(2, 3, 7))
    out = ops.gated_fusion(a, b, w, c, mix_a=ha, mix_b=hb, backend=backend)
    g = torch.sigmoid(torch.cat([a, b], -1).double() @ w.double().T + c.double())
    assert_close(out, (g * ha.double() + (1 - g) * hb.double()).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", [False, True])
def test_gated_fusion_backward(backend, mix):
    a, b, w, c = gate_inputs((2, 3), 6, torch.float32)
    extra = [torch.tanh(rand(2, 3, 6)), torch.tanh(rand(2, 3, 6))] if mix else [None, None]
    ls = leaves([a, b, w, c, *extra])
    out = ops.gated_fusion(*ls[:4], mix_a=ls[4], mix_b=ls[5], backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    want = leaves(f64([a, b, w, c, *extra]))
    ref.gated_fusion(*want).backward(grad.double())
    for got, w64 in zip(ls, want):
        if w64 is not None:
            assert_close(got.grad, w64.grad.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", [False, True])
def test_gated_fusion_backward_op_triton(dtype, mix):
    """The recompute GEMM stores dz and d va in its epilogue; compared with python_ref's vjp in float64."""
    a, b, w, c = gate_inputs((2, 5), 6, dtype)
    extra = [rand(2, 5, 6, dtype=dtype), rand(2, 5, 6, dtype=dtype)] if mix else [None, None]
    grad = rand(2, 5, 6, dtype=dtype)
    got = torch.ops.vlmkernels.gated_fusion_backward(grad, a, b, w, c, *extra, "triton")
    want = ref.gated_fusion_backward(*f64([grad, a, b, w, c, *extra]))
    for i, (x, e) in enumerate(zip(got, want)):
        assert x.dtype == dtype
        assert_close(x, e.to(dtype) if dtype == torch.float32 else e, dtype=dtype, msg=f"grad {i}")


def test_gated_fusion_gradcheck():
    a, b, w, c = gate_inputs((2,), 3, torch.float64)
    ha, hb = rand(2, 3, dtype=torch.float64), rand(2, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.gated_fusion(*t, backend="reference"), tuple(leaves([a, b, w, c])))
    assert torch.autograd.gradcheck(lambda a, b, w, c, ha, hb: ops.gated_fusion(a, b, w, c, mix_a=ha, mix_b=hb,
                                                                              backend="reference"),
                                    tuple(leaves([a, b, w, c, ha, hb])))


def test_gated_fusion_errors_name_the_argument():
    a, b, w, c = gate_inputs((2,), 4, torch.float32)
    with pytest.raises(ValueError, match="equal leading dims"):
        ops.gated_fusion(a, rand(3, 4), w, c)
    with pytest.raises(ValueError, match="weight"):
        ops.gated_fusion(a, b, w[:, :7], c)
    with pytest.raises(ValueError, match="D_a, D_b and weight's D_out"):
        ops.gated_fusion(a, b, rand(3, 8), None)
    with pytest.raises(ValueError, match="bias"):
        ops.gated_fusion(a, b, w, c[:3])
    with pytest.raises(TypeError, match="b must have dtype"):
        ops.gated_fusion(a, b.half(), w, c)
    with pytest.raises(ValueError, match="mix_a and mix_b"):
        ops.gated_fusion(a, b, w, c, mix_a=a)
    with pytest.raises(ValueError, match="mix_b"):
        ops.gated_fusion(a, b, w, c, mix_a=a, mix_b=rand(2, 5))


# ---- expert_mix ------------------------------------------------------------------------------------

def mix_inputs(B, T, dims, d_out, dtype, bias=True, zeros=()):
    feats = [rand(B, T, d, dtype=dtype) for d in dims]
    ws = [rand(d_out, d, dtype=dtype, scale=d ** -0.5) for d in dims]
    bs = [rand(d_out, dtype=dtype) for _ in dims] if bias else None
    gate = torch.rand(B, len(dims)).softmax(-1)
    for b, i in zeros:
        gate[b, i] = 0.0
    return feats, gate, ws, bs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(3,), (1, 37), (5, 3, 8), (2, 7, 1, 4, 9)])
def test_expert_mix_forward(backend, dtype, dims):
    feats, gate, ws, bs = mix_inputs(3, 5, dims, 11, dtype, bias=len(dims) != 3, zeros=[(0, 0), (2, len(dims) - 1)])
    out = ops.expert_mix(feats, gate, ws, bs, backend=backend)
    assert out.shape == (3, 5, 11) and out.dtype == dtype
    close_to_f64(out, ref.expert_mix(f64(feats), f64(gate), f64(ws), f64(bs)), dtype, f"{backend} N={len(dims)}")


def test_expert_mix_large_out_and_bf16_gate():
    feats, gate, ws, bs = mix_inputs(2, 3, (4, 6), 1023, torch.float32)
    out = ops.expert_mix(feats, gate.bfloat16(), ws, bs, backend="triton")
    assert_close(out, ref.expert_mix(f64(feats), gate.bfloat16().double(), f64(ws), f64(bs)).float())


def test_expert_mix_zero_gate_skips_the_segment():
    """A sample whose gate for an expert is 0 never reads that expert's features: NaN there stays out."""
    feats, gate, ws, bs = mix_inputs(3, 4, (5, 6, 7), 8, torch.float32, zeros=[(1, 2), (0, 0)])
    poisoned = [f.clone() for f in feats]
    poisoned[2][1] = float("nan")
    poisoned[0][0] = float("inf")
    out = ops.expert_mix(poisoned, gate, ws, bs, backend="triton")
    assert torch.isfinite(out).all()
    assert_close(out, ref.expert_mix(f64(feats), f64(gate), f64(ws), f64(bs)).float())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_expert_mix_backward_with_zero_gates(backend, bias):
    feats, gate, ws, bs = mix_inputs(3, 4, (5, 2, 6), 7, torch.float32, bias=bias, zeros=[(1, 0), (2, 2), (2, 1)])
    fl, (gl,), wl = leaves(feats), leaves([gate]), leaves(ws)
    bl = leaves(bs) if bias else None
    out = ops.expert_mix(fl, gl, wl, bl, backend=backend)
    grad = torch.randn_like(out)
    out.backward(grad)
    f64l, (g64,), w64 = leaves(f64(feats)), leaves([gate.double()]), leaves(f64(ws))
    b64 = leaves(f64(bs)) if bias else None
    ref.expert_mix(f64l, g64, w64, b64).backward(grad.double())
    pairs = list(zip(fl + [gl] + wl + (bl or []), f64l + [g64] + w64 + (b64 or [])))
    for got, want in pairs:
        assert_close(got.grad, want.grad.float(), atol=1e-4, rtol=1e-4)
    # a skipped (sample, expert): no gradient to that sample's features; the gate still gets <grad, Y_i>
    assert not fl[0].grad[1].any() and not fl[2].grad[2].any() and gl.grad[1, 0] != 0
    # ... and that sample adds nothing to the expert's weight gradient
    g_other = grad.double()[[0, 2]] * gate.double()[[0, 2], 0, None, None]
    assert_close(wl[0].grad, (g_other.reshape(-1, 7).T @ f64(feats[0])[[0, 2]].reshape(-1, 5)).float(),
                 atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_expert_mix_backward_op_triton(dtype, bias):
    """One ``grad W_i`` GEMM per expert, its epilogue storing ``d x_i`` and per-tile partial sums for
    ``d gate``; against python_ref's vjp in float64 (zero gates included)."""
    feats, gate, ws, bs = mix_inputs(3, 37, (3, 40, 1), 9, dtype, bias=bias, zeros=[(1, 0), (2, 1)])
    grad = rand(3, 37, 9, dtype=dtype)
    got = torch.ops.vlmkernels.expert_mix_backward(grad, feats, gate, ws, bs, "triton")
    want = ref.expert_mix_backward(*f64([grad, feats, gate, ws, bs]))
    flat_got = [*got[0], got[1], *got[2], *got[3]]
    flat_want = [*want[0], want[1], *want[2], *(want[3] if bias else [])]
    assert len(flat_got) == len(flat_want)
    for i, (x, e) in enumerate(zip(flat_got, flat_want)):
        scale = max(1.0, float(e.abs().max()))  # sums over rows: compare relative to their size
        atol, rtol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]
        assert_close(x, e.to(x.dtype) if x.dtype == torch.float32 else e, atol=2 * atol * scale, rtol=2 * rtol,
                     dtype=x.dtype, msg=f"grad {i}")
    assert not got[0][0][1].any() and not got[0][1][2].any()


def test_expert_mix_gradcheck():
    feats, gate, ws, bs = mix_inputs(2, 3, (2, 3), 4, torch.float64, zeros=[(0, 1)])
    gate = gate.double()

    def fn(x0, x1, g, w0, w1, b0, b1):
        return ops.expert_mix([x0, x1], g, [w0, w1], [b0, b1], backend="reference")

    assert torch.autograd.gradcheck(fn, tuple(leaves([*feats, gate, *ws, *bs])))


def test_expert_mix_errors_name_the_argument():
    feats, gate, ws, bs = mix_inputs(2, 3, (4, 5), 6, torch.float32)
    cases = [
        (([], gate, ws, bs), ValueError, "features must not be empty"),
        ((feats, gate, ws[:1], bs), ValueError, "weights must have 2 entries"),
        ((feats, gate, ws, bs[:1]), ValueError, "biases must have 2 entries"),
        ((feats, gate[:, :1], ws, bs), ValueError, r"gate must be \[B=2, N=2\]"),
        ((feats, gate[0], ws, bs), ValueError, "gate must be 2-D"),
        (([feats[0], rand(2, 4, 5)], gate, ws, bs), ValueError, r"features\[1\]"),
        ((feats, gate, [ws[0], rand(6, 4)], bs), ValueError, r"weights\[1\]"),
        ((feats, gate, [ws[0], rand(7, 5)], bs), ValueError, r"weights\[1\]"),
        ((feats, gate, ws, [bs[0], rand(5)]), ValueError, r"biases\[1\]"),
        (([feats[0], feats[1].half()], gate, ws, bs), TypeError, r"features\[1\]"),
        ((feats, gate, [ws[0], ws[1].double()], bs), TypeError, r"weights\[1\]"),
        (([feats[0][0]] * 2, gate, ws, bs), ValueError, r"features\[0\] must be 3-D"),
        (([rand(2, 3, 1)] * 6, torch.rand(2, 6), [rand(6, 1)] * 6, None), ValueError, "at most 5"),
        ((feats, gate.long(), ws, bs), TypeError, "gate"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            ops.expert_mix(*args)


# ---- vision_router ---------------------------------------------------------------------------------

def router_inputs(B, C, H, N, dtype=torch.float32, bias=True):
    return (rand(B, C, dtype=dtype), rand(H, C, dtype=dtype, scale=C ** -0.5), rand(H, dtype=dtype) if bias else None,
            rand(N, H, dtype=dtype, scale=H ** -0.5), rand(N, dtype=dtype) if bias else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_vision_router_forward(backend, dtype, top_k, activation):
    args = router_inputs(6, 9, 7, 5, dtype, bias=top_k != 1)
    gate = ops.vision_router(*args, top_k=top_k, activation=activation, backend=backend)
    assert gate.shape == (6, 5) and gate.dtype == dtype
    want = ref.vision_router(*args, top_k, activation)  # same dtype: logits rounded like nn.Linear layers
    assert_close(gate, want, msg=f"{backend} {dtype}")
    assert_close(gate.double().sum(-1), torch.ones(6, dtype=torch.float64), dtype=dtype)
    if top_k is not None:
        assert ((gate != 0).sum(-1) <= top_k).all()


def test_vision_router_matches_expert_router_module():
    from python_ref.fusion import ExpertRouter

    router = ExpertRouter(9, 5, hidden=7, top_k=2)
    x = torch.randn(6, 9)
    l1, l2 = router.mlp[0], router.mlp[2]
    image_type = torch.tensor([-1, 3, -1, 0, -1, -1])
    got = ops.vision_router(x, l1.weight, l1.bias, l2.weight, l2.bias, top_k=2, activation="relu",
                            image_type=image_type, backend="triton")
    assert_close(got, router(x, image_type))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_router_ties_go_to_the_lowest_index(backend):
    """Experts 1 and 3 have identical logits (equal weight rows and biases), every backend computes them
    the same way: the MoE router's rule keeps the lower index."""
    pooled, w1, b1, w2, b2 = router_inputs(8, 6, 5, 4)
    w2[3], b2[3] = w2[1], b2[1]
    b2[1] += 20.0
    b2[3] += 20.0  # make the tied pair the two best experts
    gate = ops.vision_router(pooled, w1, b1, w2, b2, top_k=1, backend=backend)
    assert (gate[:, 1] == 1).all() and not gate[:, 3].any()


def test_vision_router_near_ties_match_python_ref():
    pooled, w1, b1, w2, b2 = router_inputs(16, 6, 5, 4)
    w2[2] = w2[0]
    b2[2] = b2[0] + 1e-6  # a near-tie: one fp32 ulp-scale apart
    for top_k in (1, 2, 3):
        got = ops.vision_router(pooled, w1, b1, w2, b2, top_k=top_k, backend="reference")
        assert_close(got, ref.vision_router(pooled, w1, b1, w2, b2, top_k, "gelu"), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [None, 2])
def test_vision_router_backward(backend, top_k):
    args = router_inputs(5, 6, 7, 4)
    ls = leaves(args)
    image_type = torch.tensor([-1, 2, -1, -1, 0])
    gate = ops.vision_router(*ls, top_k=top_k, image_type=image_type, backend=backend)
    grad = torch.randn_like(gate)
    gate.backward(grad)
    want = leaves(f64(args))
    ref.vision_router(*want, top_k, "gelu", image_type).backward(grad.double())
    for got, w in zip(ls, want):
        assert_close(got.grad, w.grad.float(), atol=1e-4, rtol=1e-4)
    assert not ls[0].grad[1].any()  # a forced row is a constant


@pytest.mark.parametrize("top_k", [None, 2])
def test_vision_router_gradcheck(top_k):
    args = router_inputs(3, 4, 5, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.vision_router(*t, top_k=top_k, backend="reference"),
                                    tuple(leaves(args)))


def test_vision_router_errors_name_the_argument():
    pooled, w1, b1, w2, b2 = router_inputs(3, 4, 5, 3)
    cases = [
        ((pooled[0], w1, b1, w2, b2), {}, ValueError, "pooled must be 2-D"),
        ((pooled, w1[:, :3], b1, w2, b2), {}, ValueError, "w1"),
        ((pooled, w1, b1, w2[:, :4], b2), {}, ValueError, "w2"),
        ((pooled, w1, b1, w2, b2[:2]), {}, ValueError, "b2"),
        ((pooled, w1, b1.half(), w2, b2), {}, TypeError, "b1"),
        ((pooled, w1, b1, w2, b2), dict(top_k=4), ValueError, "top_k"),
        ((pooled, w1, b1, w2, b2), dict(activation="tanh"), ValueError, "activation"),
        ((pooled, w1, b1, w2, b2), dict(image_type=torch.zeros(2, dtype=torch.long)), ValueError, "image_type"),
        ((pooled, w1, b1, w2, b2), dict(image_type=torch.tensor([0, 3, -1])), ValueError, "image_type values"),
    ]
    for args, kw, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            ops.vision_router(*args, **kw)


# ---- opcheck, compile, kernel launch details --------------------------------------------------------

def _opcheck_cases():
    a, b, w, c = gate_inputs((2, 3), 4, torch.float32)
    feats, gate, ws, bs = mix_inputs(2, 3, (2, 4), 5, torch.float32, zeros=[(1, 0)])
    router = router_inputs(4, 5, 6, 3)
    V = torch.ops.vlmkernels
    return [
        (V.gated_fusion, (a, b, w, c, None, None)),
        (V.gated_fusion_backward, (a, a, b, w, c, None, None)),
        (V.expert_mix, (feats, gate, ws, bs)),
        (V.expert_mix_backward, (rand(2, 3, 5), feats, gate, ws, None)),
        (V.vision_router, (*router, 2, "gelu", torch.tensor([-1, 0, -1, 2]))),
        (V.vision_router_backward, (rand(4, 3), torch.rand(4, 3), *router, None, "relu", None)),
        (V.vision_router_backward, (rand(4, 3), torch.tensor([[0.3, 0.0, 0.7]] * 4), *router, 2, "gelu", None)),
    ]


# every case on both backends but vision_router_backward (reference only: the routing part is tiny)
@pytest.mark.parametrize("case,backend", [(c, b) for c in range(7) for b in BACKENDS if c < 5 or b == "reference"])
def test_opcheck(case, backend):
    opcheck(*_opcheck_cases()[case], backend)


@pytest.mark.parametrize("op_name", ["gated_fusion", "expert_mix", "vision_router"])
def test_compile_fullgraph_training_step(op_name):
    a, b, w, c = gate_inputs((2, 3), 4, torch.float32)
    feats, gate, ws, bs = mix_inputs(2, 3, (2, 4), 5, torch.float32, zeros=[(1, 0)])
    router = router_inputs(4, 5, 6, 3)
    calls = {
        "gated_fusion": (lambda a, b, w, c: ops.gated_fusion(a, b, w, c), (a, b, w, c)),
        "expert_mix": (lambda x0, x1, g, w0, w1: ops.expert_mix([x0, x1], g, [w0, w1]), (*feats, gate, *ws)),
        "vision_router": (lambda *t: ops.vision_router(*t, top_k=2), router),
    }
    fn, args = calls[op_name]
    weights = torch.randn(fn(*args).shape)

    def loss(*t):
        return (fn(*t) * weights).sum()

    compiled, eager = leaves(args), leaves(args)
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled).backward()
    loss(*eager).backward()
    for x, e in zip(compiled, eager):
        assert_close(x.grad, e.grad)


def test_one_launch_per_fused_op(monkeypatch):
    """gated_fusion and expert_mix are one GEMM launch each (K split over the inputs; no concat)."""
    rec = KernelRecorder(tri._linear_epilogue_kernel)
    monkeypatch.setattr(tri, "_linear_epilogue_kernel", rec)
    ops.gated_fusion(*gate_inputs((2, 3), 4, torch.float32), backend="triton")
    ops.expert_mix(*mix_inputs(2, 3, (2, 4, 3), 5, torch.float32), backend="triton")
    assert [(c["NSEG"], c["GATE_MIX"], c["SCALED"]) for c in rec.calls] == [(2, True, False), (3, False, True)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    a, b, w, c = gate_inputs((0,), 4, torch.float32)
    assert ops.gated_fusion(a, b, w, c, backend=backend).shape == (0, 4)
    feats, gate, ws, bs = mix_inputs(0, 3, (2, 4), 5, torch.float32)
    assert ops.expert_mix(feats, gate, ws, bs, backend=backend).shape == (0, 3, 5)
    feats, gate, ws, bs = mix_inputs(2, 0, (2, 4), 5, torch.float32)
    assert ops.expert_mix(feats, gate, ws, bs, backend=backend).shape == (2, 0, 5)
    assert ops.vision_router(*router_inputs(0, 4, 5, 3), top_k=2, backend=backend).shape == (0, 3)


def test_kernels_compile_for_sm90():
    """expert_mix's variant (5 scaled segments) and gated_fusion's (sigmoid mix epilogue, and its vjp
    epilogue) build for sm_90."""
    run_without_interpreter(
        "from vlmkernels.triton.linear_epilogue import aot_compile\n"
        "assert aot_compile('bf16', nseg=5, scaled=True, activation='none').asm['cubin']\n"
        "assert aot_compile('fp16', nseg=2, gate_mix=True, activation='none').asm['cubin']\n"
        "assert aot_compile('bf16', nseg=2, activation='none', grad_mode=2).asm['cubin']\n"
        "assert aot_compile('bf16', nseg=1, activation='none', grad_mode=3).asm['cubin']\n")


def test_mixed_devices_are_rejected_naming_the_tensors():
    a, b, w, c = gate_inputs((2,), 4, torch.float32)
    with pytest.raises(ValueError, match="one device"):
        ops.gated_fusion(a, b, w.to("meta"), c)
    feats, gate, ws, bs = mix_inputs(2, 3, (4, 5), 6, torch.float32)
    with pytest.raises(ValueError, match=r"one device.*weights\[1\]"):
        ops.expert_mix(feats, gate, [ws[0], ws[1].to("meta")], bs)
    with pytest.raises(ValueError, match="one device"):
        ops.split_linear(feats, ws, [bs[0], bs[1].to("meta")])
