"""python_ref.fusion: the fusion-point modules against float64 formulas, their gradients and input errors."""

import pytest
import torch
import torch.nn.functional as F

from python_ref.fusion import ExpertMix, ExpertRouter, MultiGranularityFusion, SigmoidGate, TopKTokenSelector
from tests.helpers import assert_close

DTYPES = [torch.float32, torch.bfloat16]
# bf16 modules round every intermediate to bf16; compare to the float64 formula with a loose bound
LOOSE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (6e-2, 6e-2)}


def _f64(t):
    return t.detach().double()


# --- SigmoidGate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_gate_document_formula(dtype):
    gate = SigmoidGate(13, 13).to(dtype)
    a, b = torch.randn(3, 7, 13, dtype=dtype), torch.randn(3, 7, 13, dtype=dtype)
    g = torch.sigmoid(torch.cat([_f64(a), _f64(b)], -1) @ _f64(gate.gate.weight).T + _f64(gate.gate.bias))
    expected = g * _f64(a) + (1 - g) * _f64(b)
    atol, rtol = LOOSE[dtype]
    out = gate(a, b)
    assert out.dtype == dtype and out.shape == (3, 7, 13)
    assert_close(out, expected, atol=atol, rtol=rtol)


def test_sigmoid_gate_gmu_formula_with_different_widths():
    gate = SigmoidGate(11, 5, out_dim=7, variant="gmu").double()
    a, b = torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    g = torch.sigmoid(gate.gate(torch.cat([a, b], -1)))
    expected = g * torch.tanh(a @ gate.proj_a.weight.T) + (1 - g) * torch.tanh(b @ gate.proj_b.weight.T)
    assert_close(gate(a, b), expected)


@pytest.mark.parametrize("variant,dims", [("document", (6, 6, None)), ("gmu", (5, 3, 4))])
def test_sigmoid_gate_gradcheck(variant, dims):
    gate = SigmoidGate(*dims, variant=variant).double()
    a = torch.randn(2, 3, dims[0], dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dims[1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gate, (a, b))


def test_sigmoid_gate_bad_inputs():
    with pytest.raises(ValueError, match="variant='gmu'"):
        SigmoidGate(8, 6)
    with pytest.raises(ValueError, match="variant"):
        SigmoidGate(8, 8, variant="scalar")
    gate = SigmoidGate(4, 4)
    with pytest.raises(ValueError, match="equal leading dims"):
        gate(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="floating"):
        gate(torch.ones(2, 4, dtype=torch.long), torch.randn(2, 4))
    with pytest.raises(TypeError, match="same dtype"):
        gate(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64))


# --- ExpertRouter --------------------------------------------------------------------------------

def test_router_dense_is_fp32_softmax_of_mlp():
    router = ExpertRouter(9, 5, hidden=7)
    x = torch.randn(6, 9)
    expected = torch.softmax(router.mlp.double()(x.double()), -1)
    router.float()
    w = router(x)
    assert w.shape == (6, 5) and w.dtype == torch.float32
    assert_close(w, expected)
    assert_close(w.sum(-1), torch.ones(6))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_router_top_k_renormalizes(top_k):
    router = ExpertRouter(8, 5, top_k=top_k)
    x = torch.randn(7, 8)
    w = router(x)
    probs = torch.softmax(router.compute_logits(x).double(), -1)
    vals, ids = probs.topk(top_k, dim=-1)
    expected = torch.zeros_like(probs).scatter(1, ids, vals / vals.sum(-1, keepdim=True))
    assert_close(w, expected)
    assert ((w > 0).sum(-1) == top_k).all()


@pytest.mark.parametrize("top_k", [None, 2])
def test_router_image_type_override(top_k):
    router = ExpertRouter(8, 4, top_k=top_k)
    x = torch.randn(3, 8)
    free = router(x)
    w = router(x, torch.tensor([2, -1, 0]))
    assert_close(w[0], F.one_hot(torch.tensor(2), 4).float())
    assert_close(w[2], F.one_hot(torch.tensor(0), 4).float())
    assert_close(w[1], free[1])  # -1 keeps the learned routing


def test_router_gradient_and_dtype():
    router = ExpertRouter(8, 4, top_k=2).to(torch.bfloat16)
    w = router(torch.randn(3, 8, dtype=torch.bfloat16))
    assert w.dtype == torch.bfloat16
    (w * torch.randn_like(w)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def test_router_bad_inputs():
    with pytest.raises(ValueError, match="top_k"):
        ExpertRouter(4, 3, top_k=4)
    router = ExpertRouter(4, 3)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        router(torch.randn(2, 5))
    with pytest.raises(ValueError, match="image_type values"):
        router(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="image_type"):
        router(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        router(torch.randn(2, 4), torch.tensor([0]))


# --- ExpertMix -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_mix_matches_weighted_sum(dtype):
    feats = [torch.randn(3, 5, 7, dtype=dtype) for _ in range(4)]
    w = torch.softmax(torch.randn(3, 4), -1).to(dtype)
    expected = torch.einsum("be,bend->bnd", _f64(w), torch.stack([_f64(f) for f in feats], 1))
    out = ExpertMix()(feats, w)
    assert out.dtype == dtype
    atol, rtol = LOOSE[dtype]
    assert_close(out, expected, atol=atol, rtol=rtol)
    assert_close(ExpertMix()(torch.stack(feats, 1), w), out)  # list and [B, E, N, D] agree


def test_expert_mix_gradcheck():
    feats = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ExpertMix(), (feats, w))


def test_expert_mix_bad_inputs():
    mix = ExpertMix()
    with pytest.raises(ValueError, match="same shape"):
        mix([torch.randn(2, 3, 4), torch.randn(2, 3, 5)], torch.rand(2, 2))
    with pytest.raises(ValueError, match="weights"):
        mix([torch.randn(2, 3, 4)] * 2, torch.rand(2, 3))
    with pytest.raises(ValueError, match="empty"):
        mix([], torch.rand(2, 0))
    with pytest.raises(TypeError, match="floating"):
        mix([torch.ones(2, 3, 4, dtype=torch.long)], torch.rand(2, 1))


# --- MultiGranularityFusion ----------------------------------------------------------------------

def test_multi_granularity_document_formula():
    m = MultiGranularityFusion([5, 3, 7], 11, hidden=6).double()
    feats = [torch.randn(2, 4, d, dtype=torch.float64) for d in (5, 3, 7)]
    lin1, ln, _, lin2 = m.proj
    h = F.layer_norm(torch.cat(feats, -1) @ lin1.weight.T + lin1.bias, (6,), ln.weight, ln.bias, ln.eps)
    h = 0.5 * h * (1 + torch.erf(h / 2 ** 0.5))  # exact (erf) GELU
    assert_close(m(*feats), h @ lin2.weight.T + lin2.bias)
    assert_close(m(feats), m(*feats))  # a list works too


def test_multi_granularity_dbfusion_structure_and_formula():
    m = MultiGranularityFusion([4, 4, 4, 4], 9, variant="dbfusion").double()
    assert not any(isinstance(x, torch.nn.LayerNorm) for x in m.modules())
    assert sum(isinstance(x, torch.nn.Linear) for x in m.modules()) == 3
    feats = [torch.randn(3, 2, 4, dtype=torch.float64) for _ in range(4)]
    h = torch.cat(feats, -1)
    for i, lin in enumerate(x for x in m.proj if isinstance(x, torch.nn.Linear)):
        h = h @ lin.weight.T + lin.bias
        if i < 2:
            h = F.gelu(h)
    assert_close(m(*feats), h)


def test_multi_granularity_bad_inputs():
    m = MultiGranularityFusion([4, 5], 3)
    with pytest.raises(ValueError, match="expected 2"):
        m(torch.randn(1, 2, 4))
    with pytest.raises(ValueError, match=r"feats\[1\]"):
        m(torch.randn(1, 2, 4), torch.randn(1, 3, 5))
    with pytest.raises(ValueError, match="variant"):
        MultiGranularityFusion([4], 3, variant="eagle")


# --- TopKTokenSelector ---------------------------------------------------------------------------

def test_topk_selector_order_ties_and_gradient():
    torch.manual_seed(1)
    scores = torch.randint(0, 4, (3, 11)).float()  # many ties
    tokens = torch.randn(3, 11, 5, requires_grad=True)
    sel = TopKTokenSelector(6)
    selected, index = sel(scores, tokens)
    assert selected.shape == (3, 6, 5) and index.shape == (3, 6) and index.dtype == torch.long
    for b in range(3):
        expected = sorted(range(11), key=lambda i: (-scores[b, i].item(), i))[:6]
        assert index[b].tolist() == expected
    assert_close(selected, tokens[torch.arange(3)[:, None], index])
    selected.sum().backward()
    chosen = torch.zeros(3, 11).scatter(1, index, 1.0)
    assert_close(tokens.grad, chosen[..., None].expand(-1, -1, 5))


def test_topk_selector_bad_inputs():
    with pytest.raises(ValueError, match="k"):
        TopKTokenSelector(0)
    with pytest.raises(ValueError, match="exceeds"):
        TopKTokenSelector(5)(torch.randn(2, 4), torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="scores"):
        TopKTokenSelector(2)(torch.randn(2, 4), torch.randn(2, 5, 3))


# --- torch.compile ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make,args", [
    (lambda: SigmoidGate(8, 8), lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8))),
    (lambda: ExpertRouter(8, 4, top_k=2), lambda: (torch.randn(3, 8), torch.tensor([1, -1, 2]))),
    (lambda: ExpertMix(), lambda: ([torch.randn(3, 5, 4)] * 4, torch.rand(3, 4))),
    (lambda: MultiGranularityFusion([4, 5], 6), lambda: (torch.randn(2, 3, 4), torch.randn(2, 3, 5))),
    (lambda: TopKTokenSelector(2), lambda: (torch.randn(2, 5), torch.randn(2, 5, 3))),
], ids=["gate", "router", "mix", "mgf", "topk"])
def test_fusion_modules_trace_fullgraph(make, args):
    m, a = make(), args()
    compiled = torch.compile(m, fullgraph=True, backend="eager")  # graph capture only: no C++ toolchain needed
    eager, traced = m(*a), compiled(*a)
    for e, t in zip(eager if isinstance(eager, tuple) else (eager,), traced if isinstance(traced, tuple) else (traced,)):
        assert_close(t, e)
