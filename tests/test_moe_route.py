"""moe_topk_route: parity of every runnable backend with python_ref, semantics against an
independent brute-force golden, autograd, opcheck and argument errors."""

from __future__ import annotations

import math

import pytest
import torch

import vlmkernels.ops as vops
from vlmkernels import _ext
from python_ref import ops as ref
from tests.helpers import TOL, assert_close

needs_ext = pytest.mark.skipif(_ext.C is None, reason="vlmkernels._C is not built")
OP = torch.ops.vlmkernels.moe_topk_route.default
# NaN rows make the Triton interpreter (numpy) warn about nan - nan; that is the tested path
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def naive_route(logits, k, scoring="softmax", renormalize=True, bias=None, num_groups=1, topk_groups=1,
                group_score="top2_sum", scaling_factor=1.0):
    """Plain-Python float64 golden, one row at a time, written from the issue's rules."""
    out_w, out_i = [], []
    for row in logits.double().tolist():
        E = len(row)
        if scoring == "softmax":
            m = max(row) if not any(math.isnan(v) for v in row) else float("nan")
            ex = [math.exp(v - m) if not math.isnan(m - v) else float("nan") for v in row]
            s = sum(ex)
            sc = [v / s for v in ex]
        else:
            sc = [1 / (1 + math.exp(-v)) if not math.isnan(v) else float("nan") for v in row]
        sc = [v if math.isfinite(v) else 0.0 for v in sc]
        key = [v + (float(bias[e]) if bias is not None else 0.0) for e, v in enumerate(sc)]
        key = [0.0 if math.isnan(v) else v for v in key]
        S = E // num_groups
        gs = []
        for g in range(num_groups):
            vals = sorted(key[g * S:(g + 1) * S], reverse=True)
            v = vals[0] if group_score == "max" else sum(vals[:2])
            gs.append(0.0 if math.isnan(v) else v)
        groups = sorted(range(num_groups), key=lambda g: (-gs[g], g))[:topk_groups]
        cand = [e for e in range(E) if e // S in groups]
        chosen = sorted(cand, key=lambda e: (-key[e], e))[:k]
        chosen = sorted(chosen, key=lambda e: (-sc[e], e))
        w = [sc[e] for e in chosen]
        d = sum(w) if renormalize and sum(w) > 0 else 1.0
        out_w.append([v / d * scaling_factor for v in w])
        out_i.append(chosen)
    return torch.tensor(out_w, dtype=torch.float64).reshape(-1, k), torch.tensor(out_i, dtype=torch.int32).reshape(-1, k)


def make_logits(T, E, dtype, *, ties=True, nan_rows=(1,)):
    """Random logits; quantised to multiples of 0.5 (exact ties) when ``ties``; some all-NaN rows."""
    x = torch.randn(T, E) * 2
    if ties:
        x = (x * 2).round() / 2
    for r in nan_rows:
        if r < T:
            x[r] = float("nan")
    return x.to(dtype)


# (E, k, scoring, bias?, num_groups, topk_groups, group_score, renormalize, scale)
CONFIGS = [
    (1, 1, "softmax", False, 1, 1, "top2_sum", True, 1.0),
    (1, 1, "sigmoid", True, 1, 1, "top2_sum", False, 2.0),
    (6, 1, "softmax", False, 1, 1, "top2_sum", True, 1.0),
    (6, 6, "softmax", False, 1, 1, "top2_sum", False, 1.0),
    (6, 3, "sigmoid", True, 3, 2, "top2_sum", True, 2.5),
    (6, 2, "softmax", False, 3, 1, "max", False, 1.0),
    (60, 8, "softmax", False, 1, 1, "top2_sum", True, 1.0),
    (60, 6, "sigmoid", True, 6, 3, "top2_sum", True, 2.5),
    (60, 4, "softmax", True, 4, 2, "max", False, 1.0),
    (60, 60, "sigmoid", False, 1, 1, "top2_sum", True, 1.0),
    (257, 8, "softmax", False, 1, 1, "top2_sum", True, 1.0),
    (257, 257, "sigmoid", True, 1, 1, "top2_sum", False, 0.5),
]


def cfg_kwargs(cfg, E):
    _, _, scoring, has_bias, G, TG, gs, renorm, scale = cfg
    bias = torch.randn(E) if has_bias else None  # continuous: no exact key ties across backends
    return dict(scoring=scoring, bias=bias, num_groups=G, topk_groups=TG, group_score=gs, renormalize=renorm,
                scaling_factor=scale)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"E{c[0]}k{c[1]}{c[2]}b{int(c[3])}g{c[4]}-{c[5]}{c[6]}")
def test_reference_matches_naive_golden(cfg):
    E, k = cfg[0], cfg[1]
    logits = make_logits(9, E, torch.float64)
    kw = cfg_kwargs(cfg, E)
    w, ids = ref.moe_topk_route(logits, k, weights_dtype=torch.float64, **kw)
    gw, gids = naive_route(logits, k, **kw)
    assert torch.equal(ids, gids)
    assert_close(w, gw, msg=f"{cfg}")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"E{c[0]}k{c[1]}{c[2]}b{int(c[3])}g{c[4]}-{c[5]}{c[6]}")
def test_cpu_matches_reference(cfg, dtype):
    E, k = cfg[0], cfg[1]
    logits = make_logits(37, E, dtype, nan_rows=(1, 20))
    kw = cfg_kwargs(cfg, E)
    w, ids = vops.moe_topk_route(logits, k, backend="cpu", **kw)
    rw, rids = ref.moe_topk_route(logits, k, **kw)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, rids), f"ids differ at {(ids != rids).nonzero()[:5].tolist()}"
    assert_close(w, rw, dtype=torch.float32)


@needs_ext
def test_cpu_float64_and_weights_dtype():
    logits = make_logits(11, 60, torch.float64)
    bias = torch.randn(60, dtype=torch.float64)
    kw = dict(bias=bias, num_groups=6, topk_groups=2, scoring="sigmoid", scaling_factor=2.5)
    w, ids = vops.moe_topk_route(logits, 6, backend="cpu", weights_dtype=torch.float64, **kw)
    rw, rids = ref.moe_topk_route(logits, 6, weights_dtype=torch.float64, **kw)
    assert torch.equal(ids, rids)
    assert_close(w, rw)
    wb, _ = vops.moe_topk_route(logits.float(), 6, backend="cpu", weights_dtype=torch.bfloat16, **kw)
    assert wb.dtype == torch.bfloat16
    assert_close(wb, rw.float())


# Triton runs under the interpreter here: few, tiny cases.
TRITON_CASES = [
    (6, 3, "softmax", False, 1, 1, "top2_sum", True, 1.0),
    (16, 4, "sigmoid", True, 4, 2, "top2_sum", True, 2.5),
    (6, 2, "softmax", True, 3, 2, "max", False, 1.0),
]


@pytest.mark.parametrize("cfg", TRITON_CASES, ids=lambda c: f"E{c[0]}k{c[1]}{c[2]}g{c[4]}{c[6]}")
def test_triton_matches_reference(cfg, device):
    E, k = cfg[0], cfg[1]
    dtype = torch.bfloat16 if cfg[1] == 4 else torch.float32
    logits = make_logits(5, E, dtype).to(device)
    kw = cfg_kwargs(cfg, E)
    if kw["bias"] is not None:
        kw["bias"] = kw["bias"].to(device)
    w, ids = vops.moe_topk_route(logits, k, backend="triton", **kw)
    rw, rids = ref.moe_topk_route(logits, k, **kw)
    assert torch.equal(ids, rids)
    assert_close(w, rw, dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("E", [1, 6, 8, 60, 64, 128, 257, 512, 1024])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_reference(E, backend):
    for cfg in [c for c in CONFIGS if c[0] == E] or [(E, min(8, E), "softmax", False, 1, 1, "top2_sum", True, 1.0),
                                                     (E, min(8, E), "sigmoid", True, 8 if E % 8 == 0 else 1,
                                                      4 if E % 8 == 0 else 1, "top2_sum", True, 2.5)]:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            logits = make_logits(301, E, dtype, nan_rows=(1, 200)).cuda()
            kw = cfg_kwargs(cfg, E)
            if kw["bias"] is not None:
                kw["bias"] = kw["bias"].cuda()
            w, ids = vops.moe_topk_route(logits, cfg[1], backend=backend, **kw)
            rw, rids = ref.moe_topk_route(logits, cfg[1], **kw)
            assert torch.equal(ids, rids), f"{cfg} {dtype}"
            assert_close(w, rw, dtype=torch.float32, msg=f"{cfg} {dtype}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext), "triton"])
def test_semantics(backend):
    E, k = 8, 3
    # NaN row: experts 0..k-1, zero weights; equal logits: lowest ids; ordering by weight then id
    logits = torch.tensor([[float("nan")] * E, [1.0] * E, [0.0, 2, 2, 1, 2, 0, 0, 0]])
    w, ids = vops.moe_topk_route(logits, k, backend=backend)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 4]]
    assert w[0].tolist() == [0.0, 0.0, 0.0]
    assert_close(w[1], torch.full((3,), 1 / 3))
    # Inf logits: a softmax row with +inf or only -inf is NaN in torch -> scores 0 -> experts 0..k-1
    inf = float("inf")
    w, ids = vops.moe_topk_route(torch.tensor([[-inf] * 4, [0, 1, inf, 2]]), 2, backend=backend)
    assert ids.tolist() == [[0, 1], [0, 1]] and w.abs().sum() == 0
    w, ids = vops.moe_topk_route(torch.tensor([[-inf, 0, inf, 1]]), 2, scoring="sigmoid", renormalize=False,
                                 backend=backend)
    assert ids.tolist() == [[2, 3]] and w.tolist()[0][0] == 1.0
    # bias steers selection, weight stays the unbiased score; order is by that weight
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 10.0, 0.0])
    w, ids = vops.moe_topk_route(x, 2, scoring="sigmoid", renormalize=False, bias=bias, backend=backend)
    assert ids.tolist() == [[0, 2]]
    assert_close(w, torch.sigmoid(x)[:, [0, 2]])
    # groups: only the best group by top-2 sum is eligible, although expert 0 alone is largest
    x = torch.tensor([[5.0, -9, -9, 2, 2, 2]])
    kw = dict(scoring="sigmoid", num_groups=2, topk_groups=1, backend=backend)
    _, ids = vops.moe_topk_route(x, 2, group_score="top2_sum", **kw)
    assert ids.tolist() == [[3, 4]]
    _, ids = vops.moe_topk_route(x, 2, group_score="max", **kw)
    assert ids.tolist() == [[0, 1]]
    # renormalize + scale
    w, _ = vops.moe_topk_route(torch.randn(4, 16), 4, scaling_factor=2.5, backend=backend)
    assert_close(w.sum(-1), torch.full((4,), 2.5))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_empty_and_noncontiguous(backend):
    w, ids = vops.moe_topk_route(torch.randn(0, 8), 2, backend=backend)
    assert w.shape == (0, 2) and ids.shape == (0, 2) and ids.dtype == torch.int32
    base = torch.randn(60, 13)
    w, ids = vops.moe_topk_route(base.t(), 5, backend=backend)
    rw, rids = ref.moe_topk_route(base.t().contiguous(), 5)
    assert torch.equal(ids, rids)
    assert_close(w, rw)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("kw", [
    dict(), dict(renormalize=False, scaling_factor=2.0), dict(scoring="sigmoid"),
    dict(scoring="sigmoid", renormalize=False, bias="fixed", num_groups=4, topk_groups=2),
    dict(num_groups=4, topk_groups=3, group_score="max", scaling_factor=1.5),
])
def test_gradcheck_float64(backend, kw):
    kw = dict(kw)
    if kw.get("bias") == "fixed":
        kw["bias"] = torch.randn(12, dtype=torch.float64)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(5, 3, dtype=torch.float64)
    f = lambda t: vops.moe_topk_route(t, 3, backend=backend, weights_dtype=torch.float64, **kw)[0] * mix
    assert torch.autograd.gradcheck(f, (x,))


@needs_ext
def test_backward_matches_reference_autograd():
    x = torch.randn(7, 10)
    bias = torch.randn(10)
    g = torch.randn(7, 4)
    for scoring in ("softmax", "sigmoid"):
        a = x.clone().requires_grad_()
        (vops.moe_topk_route(a, 4, scoring=scoring, bias=bias, scaling_factor=2.0, backend="cpu")[0] * g).sum().backward()
        b = x.clone().requires_grad_()
        (ref.moe_topk_route(b, 4, scoring=scoring, bias=bias, scaling_factor=2.0)[0] * g).sum().backward()
        assert_close(a.grad, b.grad)
    # NaN row: zero gradient, no NaN leaking into the other rows
    c = x.clone()
    c[2] = float("nan")
    c.requires_grad_()
    vops.moe_topk_route(c, 4, backend="reference")[0].mul(g).sum().backward()
    assert torch.isfinite(c.grad).all() and (c.grad[2] == 0).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext)])
def test_opcheck(backend):
    x = torch.randn(6, 12, requires_grad=True)
    torch.library.opcheck(OP, (x, 3, "softmax", True, None, 1, 1, "top2_sum", 1.0, torch.float32, backend))
    torch.library.opcheck(OP, (x, 2, "sigmoid", False, torch.randn(12), 4, 2, "max", 2.5, torch.bfloat16, backend))


def test_compile_fullgraph():
    def f(x, bias):
        w, ids = vops.moe_topk_route(x, 2, scoring="sigmoid", bias=bias, num_groups=2, topk_groups=1)
        return w * 2, ids

    x, bias = torch.randn(5, 8), torch.randn(8)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, bias)
    want = f(x, bias)
    assert torch.equal(got[1], want[1])
    assert_close(got[0], want[0])


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_ext), "triton"])
def test_errors(backend):
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="top_k"):
        vops.moe_topk_route(x, 7, backend=backend)
    with pytest.raises(ValueError, match="top_k"):
        vops.moe_topk_route(x, 0, backend=backend)
    with pytest.raises(ValueError, match="divisible"):
        vops.moe_topk_route(x, 2, num_groups=4, backend=backend)
    with pytest.raises(ValueError, match="too few eligible"):
        vops.moe_topk_route(x, 3, num_groups=3, topk_groups=1, backend=backend)
    with pytest.raises(ValueError, match="bias"):
        vops.moe_topk_route(x, 2, bias=torch.zeros(5), backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        vops.moe_topk_route(torch.randn(2, 3, 6), 2, backend=backend)
    with pytest.raises(TypeError, match="logits"):
        vops.moe_topk_route(torch.ones(4, 6, dtype=torch.int64), 2, backend=backend)
    with pytest.raises(ValueError, match="scoring"):
        vops.moe_topk_route(x, 2, scoring="relu", backend=backend)
    with pytest.raises(ValueError, match="group_score"):
        vops.moe_topk_route(x, 2, group_score="mean", backend=backend)
    with pytest.raises(ValueError, match="topk_groups"):
        vops.moe_topk_route(x, 2, num_groups=2, topk_groups=3, backend=backend)
    # values torch's argument parser rejects (or takes: a bool) without naming what is wrong
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=6\], got top_k=18446744073709551616"):
        vops.moe_topk_route(x, 2**64, backend=backend)
    for bad in (2.5, True, "2", None):
        with pytest.raises(TypeError, match="top_k must be an int"):
            vops.moe_topk_route(x, bad, backend=backend)
    import numpy as np

    assert vops.moe_topk_route(x, np.int64(2), backend=backend)[1].shape == (4, 2)


def test_bad_backend_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("VLMKERNELS_BACKEND", "garbage")
    with pytest.raises(ValueError, match="VLMKERNELS_BACKEND.*'garbage'"):
        vops.moe_topk_route(torch.randn(4, 6), 2)


def test_triton_rejects_wide_rows():
    with pytest.raises(ValueError, match="1024"):
        vops.moe_topk_route(torch.randn(1, 1025), 2, backend="triton")


def test_cuda_launchers_compiled():
    """Where the extension was built with CUDA (nvcc present), the MoE launchers must be in it."""
    if not _ext.has_cuda():
        pytest.skip("vlmkernels._C was built without CUDA")
    assert hasattr(_ext.C, "moe_topk_route_cuda") and hasattr(_ext.C, "moe_align_block_size_cuda")


@needs_ext
@pytest.mark.parametrize("E,k", [(8, 2), (64, 8), (67, 1), (67, 9), (130, 16)])
def test_cpu_softmax_fast_path_edges(E, k):
    """The C++ softmax fast path (no bias/groups): vector tails, k > 8, ties, -inf entries, and
    logits spread wide enough that exp underflows into denormals and to exact 0 (ties among zeros)."""
    x = (torch.randn(41, E) * 2 * 2).round() / 2
    x[3] = torch.randn(E) * 60  # wide spread: most exps underflow
    x[4] = -1e4
    x[4, E // 2] = 0.0  # one finite winner, every other score exactly 0
    x[5, ::3] = float("-inf")
    x[6] = 0.0  # all tied
    x[7, 1] = float("inf")  # non-finite: generic path, all scores 0
    x[8] = -torch.arange(E, dtype=torch.float32) * 3.0 - 80.0  # denormal range
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        w, ids = vops.moe_topk_route(xd, k, backend="cpu")
        rw, rids = ref.moe_topk_route(xd, k)
        assert torch.equal(ids, rids), f"{dtype}: ids differ at {(ids != rids).nonzero()[:5].tolist()}"
        assert_close(w, rw, dtype=torch.float32)
