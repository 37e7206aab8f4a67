"""qformer_cross_kv: one GEMM over every cross layer's stacked K/V == each HF layer's own key/value
Linear; the [L, 2, B, N, D] view feeds ops.attention without a copy; gradients; bad inputs; opcheck;
torch.compile."""

import pytest
import torch

import vlmkernels  # noqa: F401  (defines the ops)
from python_ref.ops.qformer import qformer_attention as ref_attention
from tests.helpers import assert_close
from vlmkernels import ops

OP = torch.ops.vlmkernels.qformer_cross_kv.default


def make_inputs(B, N, E, L, D, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, E, generator=g)
    w = torch.randn(L * 2 * D, E, generator=g) / E**0.5
    b = torch.randn(L * 2 * D, generator=g) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def per_layer_f64(x, w, b, L):
    """float64 K and V of every layer, one Linear at a time: [L, 2, B, N, D]."""
    D = w.shape[0] // (2 * L)
    out = []
    for layer in range(L):
        kv = []
        for j in range(2):
            rows = slice((2 * layer + j) * D, (2 * layer + j + 1) * D)
            y = x.double() @ w[rows].double().t()
            kv.append(y if b is None else y + b[rows].double())
        out.append(torch.stack(kv))
    return torch.stack(out)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_per_layer_projections(dtype, bias):
    B, N, E, L, D = 2, 13, 24, 3, 20
    x, w, b = make_inputs(B, N, E, L, D, dtype, bias)
    kv = ops.qformer_cross_kv(x, w, b, num_layers=L)
    assert kv.shape == (L, 2, B, N, D) and kv.dtype == dtype
    assert_close(kv, per_layer_f64(x, w, b, L), dtype=dtype)


def test_hf_modules_stacked_and_attention_reads_views_in_place():
    """Weights stacked from HF cross modules give each module's key(x)/value(x); the per-layer
    [B, N, H, d] views go straight into ops.attention (strided, no copy)."""
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention

    H, d, E = 4, 8, 20
    cfg = Blip2QFormerConfig(hidden_size=H * d, num_attention_heads=H, encoder_hidden_size=E,
                             intermediate_size=64, num_hidden_layers=4)
    mods = [Blip2QFormerMultiHeadAttention(cfg, is_cross_attention=True) for _ in range(2)]
    w, b = ops.stack_cross_kv_weights(mods)
    assert w.shape == (2 * 2 * H * d, E) and b.shape == (2 * 2 * H * d,)
    B, N, Lq = 2, 11, 5
    x = torch.randn(B, N, E)
    q = torch.randn(B, Lq, H, d)
    with torch.no_grad():
        kv = ops.qformer_cross_kv(x, w, b, num_layers=2)
        for layer, m in enumerate(mods):
            assert_close(kv[layer, 0], m.key(x))
            assert_close(kv[layer, 1], m.value(x))
            k, v = kv[layer, 0].unflatten(-1, (H, d)), kv[layer, 1].unflatten(-1, (H, d))
            assert k.data_ptr() == kv.data_ptr() + layer * 2 * H * d * kv.element_size()  # a view
            want, _ = ref_attention(q.double(), m.key(x).view(B, N, H, d).double(),
                                    m.value(x).view(B, N, H, d).double())
            for backend in ("reference", "triton"):
                assert_close(ops.attention(q, k, v, backend=backend), want, msg=f"layer {layer} {backend}")


def test_stack_cross_kv_weights_errors_and_missing_bias():
    lin = torch.nn.Linear(6, 4)

    class KV(torch.nn.Module):
        def __init__(self, bias=True):
            super().__init__()
            self.key, self.value = torch.nn.Linear(6, 4, bias=bias), torch.nn.Linear(6, 4, bias=bias)

    w, b = ops.stack_cross_kv_weights([KV(False), KV(False)])
    assert w.shape == (16, 6) and b is None
    mods = [KV(), KV(False)]
    w, b = ops.stack_cross_kv_weights(mods)
    assert torch.equal(b[8:], torch.zeros(8)) and torch.equal(b[:4], mods[0].key.bias)
    with pytest.raises(ValueError, match="modules is empty"):
        ops.stack_cross_kv_weights([])
    bad = KV()
    bad.value = lin.weight
    with pytest.raises(TypeError, match=r"modules\[1\].value"):
        ops.stack_cross_kv_weights([KV(), bad])
    wide = KV()
    wide.value = torch.nn.Linear(6, 5)
    with pytest.raises(ValueError, match="one weight shape"):
        ops.stack_cross_kv_weights([wide])


def test_backward_matches_autograd_and_gradcheck():
    B, N, E, L, D = 2, 7, 10, 2, 6
    x, w, b = make_inputs(B, N, E, L, D, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: ops.qformer_cross_kv(*a, num_layers=L), leaves)
    # frozen encoder: only the K/V weights train
    x32, w32, b32 = make_inputs(B, N, E, L, D)
    w_leaf, b_leaf = w32.clone().requires_grad_(), b32.clone().requires_grad_()
    grad = torch.randn(L, 2, B, N, D)
    ops.qformer_cross_kv(x32, w_leaf, b_leaf, num_layers=L).backward(grad)
    want = [t.double().requires_grad_() for t in (w32, b32)]
    per_layer_f64(x32, want[0], want[1], L).backward(grad.double())
    assert_close(w_leaf.grad, want[0].grad)
    assert_close(b_leaf.grad, want[1].grad)


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8)])
def test_empty(shape):
    x = torch.randn(shape)
    w, b = torch.randn(12, 8), torch.randn(12)
    kv = ops.qformer_cross_kv(x, w, b, num_layers=2)
    assert kv.shape == (2, 2, shape[0], shape[1], 3)


def test_bad_inputs_name_the_argument():
    x, w, b = make_inputs(2, 5, 8, 2, 3)
    cases = [
        (dict(encoder_states=x[0]), ValueError, "encoder_states must be 3-D"),
        (dict(weight=w[:, :7]), ValueError, "weight must be"),
        (dict(weight=w.double()), TypeError, "weight must have encoder_states' dtype"),
        (dict(bias=b[:5]), ValueError, "bias must be"),
        (dict(bias=b.half()), TypeError, "bias must have"),
        (dict(encoder_states=x.int(), weight=w.int(), bias=b.int()), TypeError, "encoder_states must be float"),
        (dict(num_layers=0), ValueError, "num_layers"),
        (dict(num_layers=5), ValueError, "num_layers=5"),
        (dict(weight=w.to("meta"), bias=b.to("meta")), ValueError, "one device"),
    ]
    for kw, exc, match in cases:
        args = dict(encoder_states=x, weight=w, bias=b, num_layers=2)
        args.update(kw)
        with pytest.raises(exc, match=match):
            ops.qformer_cross_kv(args.pop("encoder_states"), args.pop("weight"), args.pop("bias"), **args)
    with pytest.raises(ValueError, match="bias must be"):
        OP(x, w, b[:5], "reference")


def test_autocast_region_keeps_the_inputs_dtype():
    x, w, b = make_inputs(2, 5, 8, 2, 3)
    want = OP(x, w, b, "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = OP(x, w, b, "reference")
    assert got.dtype == torch.float32
    assert_close(got, want)


def test_opcheck():
    x, w, b = make_inputs(2, 5, 8, 2, 3)
    torch.library.opcheck(OP, (x, w, b, "reference"))
    torch.library.opcheck(OP, (x, w, None, "reference"))
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(OP, (*leaves, "reference"))


def test_compile_fullgraph_with_backward():
    x, w, b = make_inputs(2, 5, 8, 2, 4)

    def loss(x, w, b):
        kv = ops.qformer_cross_kv(x, w, b, num_layers=2)
        return (kv[1, 0] * kv[0, 1]).sum()

    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (x, w, b)]
    loss(*eager).backward()
    for a, e in zip(leaves, eager):
        assert_close(a.grad, e.grad)
