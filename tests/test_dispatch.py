"""The host path of the ops: C++-registered kernels reached without Python, forced backends handed
back to the Python registry, one validation with the Python copy's messages, C++ autograd (tested
against the Python formula that builds without the extension use), backend choices made once, and
Triton launches on their inputs' device."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmkernels
from vlmkernels import _ext, library, registry
from vlmkernels.moe import align as align_mod
from vlmkernels.moe import route as route_mod
from vlmkernels.moe import select as select_mod

attn_mod = sys.modules["vlmkernels.qformer.attention"]  # the package re-exports a function of that name

needs_ext = pytest.mark.skipif(_ext.C is None, reason="vlmkernels._C is not built")
OURS = ("/vlmkernels/", "/python_ref/")


@contextlib.contextmanager
def python_frames():
    """Records the files of every Python function of this package and python_ref that runs inside."""
    seen = []

    def prof(frame, event, arg):
        if event == "call" and any(p in frame.f_code.co_filename for p in OURS):
            seen.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(prof)
    try:
        yield seen
    finally:
        sys.setprofile(None)


def _route(x, backend="auto", k=3):
    return torch.ops.vlmkernels.moe_topk_route.default(x, k, "softmax", True, None, 1, 1, "top2_sum", 1.0,
                                                       torch.float32, backend)


CPP_CALLS = {
    "moe_topk_route": lambda b: _route(torch.randn(5, 13), b),
    "moe_align_block_size": lambda b: torch.ops.vlmkernels.moe_align_block_size.default(
        torch.randint(-1, 13, (5, 3), dtype=torch.int32), 13, 4, None, b),
    "topk_select_tokens": lambda b: torch.ops.vlmkernels.topk_select_tokens.default(
        torch.randn(2, 7), torch.randn(2, 7, 3), 3, b),
    "anyres_plan_llava": lambda b: torch.ops.vlmkernels.anyres_plan_llava.default(
        torch.tensor([[37, 53]]), torch.tensor([[32, 64], [64, 32]]), 32, b),
    "attention": lambda b: torch.ops.vlmkernels.attention.default(
        *_attn_qkv(), torch.rand(2, 7) > 0.3, None, None, None, None, 0.0, b),
    "attention_backward": lambda b: torch.ops.vlmkernels.attention_backward.default(
        torch.randn(2, 3, 2, 8), *_attn_qkv(), torch.randn(2, 3, 2, 8), torch.randn(2, 2, 3), None, None, None,
        None, None, 0.0, b),
}


def _attn_qkv(B=2, Lq=3, H=2, d=8, Lk=7):
    return torch.randn(B, Lq, H, d), torch.randn(B, Lk, H, d), torch.randn(B, Lk, H, d)


@needs_ext
@pytest.mark.parametrize("op", sorted(CPP_CALLS))
def test_cpp_ops_never_enter_python(op, monkeypatch):
    monkeypatch.delenv("VLMKERNELS_BACKEND", raising=False)
    assert library.cpp_kernel(op, "CPU")
    for backend in ("auto", "cpu"):
        CPP_CALLS[op](backend)  # warm: first calls may import or log
        with python_frames() as seen:
            CPP_CALLS[op](backend)
        assert not seen, f"{op} (backend={backend!r}) entered Python: {seen}"


@pytest.mark.cuda
def test_cuda_ops_never_enter_python(monkeypatch):
    monkeypatch.delenv("VLMKERNELS_BACKEND", raising=False)
    x = torch.randn(5, 64, device="cuda")
    ids = torch.randint(0, 64, (5, 8), dtype=torch.int32, device="cuda")
    calls = [lambda: _route(x, "auto"), lambda: _route(x, "cuda"),
             lambda: torch.ops.vlmkernels.moe_align_block_size.default(ids, 64, 16, None, "auto")]
    for call in calls:
        call()
        with python_frames() as seen:
            call()
        assert not seen, seen


@needs_ext
def test_cpp_autograd_never_enters_python():
    x = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    _route(x)[0].sum().backward()  # warm
    with python_frames() as seen:
        w, _ = _route(x)
        (w * torch.arange(3.0, dtype=torch.float64)).sum().backward()
    assert not seen, seen
    tokens = torch.randn(2, 7, 3, requires_grad=True)
    with python_frames() as seen:
        sel, _ = torch.ops.vlmkernels.topk_select_tokens.default(torch.randn(2, 7), tokens, 3, "auto")
        sel.sum().backward()
    assert not seen, seen
    assert tokens.grad.sum().item() == pytest.approx(2 * 3 * 3)
    # attention's C++ autograd and backward op on the default CPU path: masks, packed keys, dropout
    qkv = [t.requires_grad_() for t in _attn_qkv()]
    kpm = torch.rand(2, 7) > 0.3
    keep = torch.rand(2, 2, 3, 7) > 0.2
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    packed = [t.detach()[0, :5].clone().requires_grad_() for t in qkv[1:]]
    calls = [lambda: torch.ops.vlmkernels.attention.default(*qkv, kpm, None, None, None, None, 0.0, "auto"),
             lambda: torch.ops.vlmkernels.attention.default(*qkv, None, None, None, 0.5, keep, 0.2, "auto"),
             lambda: torch.ops.vlmkernels.attention.default(qkv[0], *packed, None, None, cu, None, None, 0.0,
                                                            "auto")]
    for call in calls:
        call()[0].sum().backward()  # warm
        with python_frames() as seen:
            out, lse = call()
            out.square().sum().backward()
        assert not seen, seen
        assert lse.grad_fn is None and not lse.requires_grad


@needs_ext
@pytest.mark.parametrize("op", sorted(CPP_CALLS))
def test_forced_python_backends_are_handed_back(op, monkeypatch):
    monkeypatch.delenv("VLMKERNELS_BACKEND", raising=False)
    with python_frames() as seen:
        CPP_CALLS[op]("reference")
    assert any("/python_ref/" in s or "_reference" in s for s in seen), seen
    # the registry's error type and message survive the trip through C++
    with pytest.raises(vlmkernels.BackendUnavailableError, match="'cuda' is unavailable"):
        CPP_CALLS[op]("cuda")
    with pytest.raises(ValueError, match="backend must be"):
        CPP_CALLS[op]("fastest")
    monkeypatch.setenv("VLMKERNELS_BACKEND", "reference")
    with python_frames() as seen:
        CPP_CALLS[op]("auto")
    assert seen, "VLMKERNELS_BACKEND=reference must reach the Python reference backend"


@needs_ext
def test_forced_reference_matches_cpp():
    x = torch.randn(9, 17)
    w_c, i_c = _route(x, "cpu")
    w_r, i_r = _route(x, "reference")
    torch.testing.assert_close(w_c, w_r)
    assert torch.equal(i_c, i_r)


# ---- one validation: the C++ checks raise what the Python copy (fakes, triton, reference) raises --

ROUTE_BAD = [
    dict(logits=torch.randn(2, 3, 4)),
    dict(logits=torch.randint(0, 4, (3, 8))),
    dict(scoring="softmin"),
    dict(group_score="min"),
    dict(top_k=0),
    dict(top_k=9),
    dict(num_groups=3),
    dict(num_groups=0),
    dict(num_groups=4, topk_groups=5),
    dict(num_groups=4, topk_groups=1, top_k=3),
    dict(bias=torch.randn(7)),
    dict(bias=torch.zeros(8, dtype=torch.int32)),
    dict(weights_dtype=torch.int64),
]


def _route_args(**over):
    args = dict(logits=torch.randn(3, 8), top_k=2, scoring="softmax", renormalize=True, bias=None, num_groups=1,
                topk_groups=1, group_score="top2_sum", scaling_factor=1.0, weights_dtype=torch.float32)
    args.update(over)
    return args


def _raised(fn):
    with pytest.raises(Exception) as e:
        fn()
    return e.type, str(e.value).splitlines()[0]


@needs_ext
@pytest.mark.parametrize("bad", ROUTE_BAD, ids=lambda d: ",".join(d))
def test_route_checks_match_the_python_copy(bad):
    args = _route_args(**bad)
    want_type, want = _raised(lambda: route_mod.check_route_args(**args))
    for backend in ("cpu", "reference"):
        got_type, got = _raised(lambda: torch.ops.vlmkernels.moe_topk_route.default(*args.values(), backend))
        assert issubclass(got_type, want_type) and got == want, (backend, got, want)


ALIGN_BAD = [
    dict(ids=torch.zeros(4, dtype=torch.int32)),
    dict(ids=torch.zeros(2, 2)),
    dict(num_experts=0),
    dict(block_size=0),
    dict(num_experts=2**30, block_size=4),
    dict(expert_map=torch.zeros(3, dtype=torch.int32)),
    dict(expert_map=torch.zeros(8)),
]


@needs_ext
@pytest.mark.parametrize("bad", ALIGN_BAD, ids=lambda d: ",".join(d))
def test_align_checks_match_the_python_copy(bad):
    args = dict(ids=torch.zeros(2, 2, dtype=torch.int32), num_experts=8, block_size=4, expert_map=None)
    args.update(bad)
    want_type, want = _raised(lambda: align_mod.check_align_args(**args))
    got_type, got = _raised(lambda: torch.ops.vlmkernels.moe_align_block_size.default(*args.values(), "cpu"))
    assert issubclass(got_type, want_type) and got == want, (got, want)


SELECT_BAD = [dict(scores=torch.zeros(2, 5, dtype=torch.int64)), dict(scores=torch.zeros(10)),
              dict(tokens=torch.zeros(2, 4, 3)), dict(k=6), dict(k=-1)]


@needs_ext
@pytest.mark.parametrize("bad", SELECT_BAD, ids=lambda d: ",".join(d))
def test_select_checks_match_the_python_copy(bad):
    args = dict(scores=torch.zeros(2, 5), tokens=torch.zeros(2, 5, 3), k=2)
    args.update(bad)
    want_type, want = _raised(lambda: select_mod.check_select_args(**args))
    got_type, got = _raised(lambda: torch.ops.vlmkernels.topk_select_tokens.default(*args.values(), "cpu"))
    assert issubclass(got_type, want_type) and got == want, (got, want)


def _attn_bad_inputs():
    """Every kind of bad input attention's Python check (_check, then the cu_seqlens_k values on CPU)
    rejects, as keyword overrides of a valid dense call."""
    q, k, v = _attn_qkv(2, 3, 2, 16, 5)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    kp, vp = k.reshape(10, 2, 16)[:5], v.reshape(10, 2, 16)[:5]
    packed = dict(k=kp, v=vp, cu_seqlens_k=cu)
    b = torch.bool
    return [
        dict(q=q[0]),
        dict(q=q.int(), k=k.int(), v=v.int()),
        dict(q=q.long(), k=k.long(), v=v.long()),
        dict(k=k[:1], v=v[:1]),
        dict(k=k[0], v=v[0]),
        dict(k=k[:, :, :1], v=v[:, :, :1]),
        dict(k=k[..., :8], v=v[..., :8]),
        dict(v=v[:, :4]),
        dict(v=v[..., :8]),
        dict(k=k.double()),
        dict(v=v.half()),
        dict(q=q.bfloat16(), k=k.bfloat16()),
        dict(key_padding_mask=torch.ones(2, 5)),
        dict(key_padding_mask=torch.ones(2, 5, dtype=torch.uint8)),
        dict(key_padding_mask=torch.ones(2, 4, dtype=b)),
        dict(key_padding_mask=torch.ones(5, dtype=b)),
        dict(attn_mask=torch.ones(2, 5, dtype=b)),
        dict(attn_mask=torch.ones(2, 3, 5, dtype=torch.uint8)),
        dict(attn_mask=torch.ones(2, 3, 5, dtype=torch.int32), key_padding_mask=torch.ones(2, 4, dtype=b)),
        dict(dropout_mask=torch.ones(2, 2, 3, 4, dtype=b), dropout_p=0.5),
        dict(dropout_mask=torch.ones(2, 2, 3, 5), dropout_p=0.5),
        dict(dropout_mask=torch.ones(2, 3, 5, dtype=b), dropout_p=0.5),
        dict(dropout_p=0.5),
        dict(dropout_p=1.0, dropout_mask=torch.ones(2, 2, 3, 5, dtype=b)),
        dict(dropout_p=-0.1),
        dict(dropout_p=1e-17),
        dict(dropout_p=2.5e20),
        dict(dropout_p=-1.5e-7),
        dict(dropout_p=float("nan")),
        dict(dropout_p=float("inf")),
        dict(dropout_p=-3.0),
        dict(dropout_p=1.0000001),
        dict(cu_seqlens_k=cu.long(), k=kp, v=vp),
        dict(cu_seqlens_k=cu.float(), k=kp, v=vp),
        dict(cu_seqlens_k=cu[:2], k=kp, v=vp),
        dict(cu_seqlens_k=cu[None], k=kp, v=vp),
        dict(cu_seqlens_k=cu),
        dict(packed, k=kp[None], v=vp[None]),
        dict(packed, key_padding_mask=torch.ones(2, 5, dtype=b)),
        dict(packed, attn_mask=torch.ones(2, 3, 5, dtype=b)),
        dict(packed, dropout_mask=torch.ones(2, 2, 3, 5, dtype=b), dropout_p=0.1),
        dict(packed, key_padding_mask=torch.ones(5)),
        dict(k=kp[:2], v=vp[:2], cu_seqlens_k=torch.tensor([0, 4, 2], dtype=torch.int32)),
        dict(packed, cu_seqlens_k=torch.tensor([0, 2, 4], dtype=torch.int32)),
        dict(packed, cu_seqlens_k=torch.tensor([1, 2, 5], dtype=torch.int32)),
        dict(packed, cu_seqlens_k=torch.tensor([0, 6, 5], dtype=torch.int32)),
        dict(packed, cu_seqlens_k=torch.tensor([0, 3, 7], dtype=torch.int32)),
        dict(packed, cu_seqlens_k=torch.tensor([0, -1, 5], dtype=torch.int32)),
        dict(k=k.to("meta"), v=v.to("meta")),
    ]


def _attn_args(**over):
    q, k, v = _attn_qkv(2, 3, 2, 16, 5)
    args = dict(q=q, k=k, v=v, key_padding_mask=None, attn_mask=None, cu_seqlens_k=None, scale=None,
                dropout_mask=None, dropout_p=0.0)
    args.update(over)
    return args


def _attn_python_check(args):
    attn_mod._check(*args.values())
    if args["cu_seqlens_k"] is not None:
        attn_mod._check_cu_seqlens_values(args["cu_seqlens_k"], args["k"].shape[0])


@needs_ext
@pytest.mark.parametrize("i", range(len(_attn_bad_inputs())))
def test_attention_checks_match_the_python_copy(i):
    bad = _attn_bad_inputs()[i]
    args = _attn_args(**bad)
    want_type, want = _raised(lambda: _attn_python_check(args))
    for backend in ("cpu", "auto", "reference"):
        got_type, got = _raised(lambda: torch.ops.vlmkernels.attention.default(*args.values(), backend))
        assert issubclass(got_type, want_type) and got == want, (backend, got, want)


def test_attention_bad_inputs_cover_every_python_raise():
    """Every raise statement of _check / _check_cu_seqlens_values is hit by some bad input above."""
    import re

    msgs = set()
    for bad in _attn_bad_inputs():
        with pytest.raises(Exception) as e:
            _attn_python_check(_attn_args(**bad))
        msgs.add(re.sub(r"[0-9]+|\(.*?\)|\{.*\}|\[.*?\]", "#", str(e.value))[:40])
    assert len(msgs) >= 20, sorted(msgs)


def _attn_bad_backward():
    q = torch.zeros(2, 3, 2, 16)
    lse = torch.zeros(2, 2, 3)
    return [
        dict(grad=q[:1]), dict(grad=q.transpose(1, 2)), dict(out=q[..., :8]), dict(lse=lse[:, :1]),
        dict(lse=lse.transpose(1, 2)), dict(grad=q.double()), dict(out=q.bfloat16()), dict(lse=lse.double()),
        dict(lse=lse.half()), dict(grad=q[:1], out=q.double()), dict(out=q.int(), lse=lse.int()),
    ]


@needs_ext
@pytest.mark.parametrize("i", range(len(_attn_bad_backward())))
def test_attention_backward_checks_match_the_python_copy(i):
    over = _attn_bad_backward()[i]
    fwd = _attn_args()
    q = fwd["q"]
    args = dict(grad=torch.randn_like(q), q=q, k=fwd["k"], v=fwd["v"], out=torch.randn_like(q),
                lse=torch.randn(2, 2, 3))
    args.update(over)
    rest = list(fwd.values())[3:]

    def python():
        attn_mod._check(args["q"], args["k"], args["v"], *rest)
        attn_mod._check_backward(args["grad"], args["q"], args["out"], args["lse"])

    want_type, want = _raised(python)
    for backend in ("cpu", "reference"):
        got_type, got = _raised(lambda: torch.ops.vlmkernels.attention_backward.default(*args.values(), *rest,
                                                                                          backend))
        assert issubclass(got_type, want_type) and got == want, (backend, got, want)
    # a bad forward argument is reported by the backward op too
    bad = _attn_args(attn_mask=torch.ones(2, 5, dtype=torch.bool))
    want_type, want = _raised(lambda: attn_mod._check(*bad.values()))
    got_type, got = _raised(lambda: torch.ops.vlmkernels.attention_backward.default(
        torch.randn_like(q), *list(bad.values())[:3], torch.randn_like(q), torch.randn(2, 2, 3),
        *list(bad.values())[3:], "cpu"))
    assert issubclass(got_type, want_type) and got == want, (got, want)


@needs_ext
def test_align_sizes_follow_the_reference_formula(device):
    """The kernels size their outputs themselves (common/moe_align.h), so no length can be too small."""
    from python_ref.ops.moe import moe_align_block_size as ref, moe_align_max_padded

    g = torch.Generator().manual_seed(0)
    for T, k, E, B in [(0, 2, 5, 4), (1, 1, 64, 16), (3, 2, 61, 7), (17, 8, 8, 1), (5, 3, 257, 64), (129, 8, 13, 128)]:
        ids = torch.randint(-2, E + 2, (T, k), generator=g, dtype=torch.int32)
        got = vlmkernels.ops.moe_align_block_size(ids.to(device), E, B)
        M = moe_align_max_padded(T * k, E, B)
        assert got[0].shape == (M,) and got[1].shape == ((M + B - 1) // B,)
        for a, b in zip(got, ref(ids, E, B)):
            assert torch.equal(a.cpu(), b)


# ---- autograd: the C++ backward against the Python formula --------------------------------------

@needs_ext
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("grouped", [False, True])
def test_cpp_route_backward_matches_python_formula(scoring, renormalize, grouped):
    g = torch.Generator().manual_seed(7)
    T, E, k = 11, 12, 3
    x = torch.randn(T, E, generator=g, dtype=torch.float64)
    x[0, 2] = float("nan")  # a non-finite score is a constant
    bias = torch.randn(E, generator=g, dtype=torch.float64) if grouped else None
    kw = dict(scoring=scoring, renormalize=renormalize, bias=bias, num_groups=4 if grouped else 1,
              topk_groups=2 if grouped else 1, scaling_factor=1.7)
    xg = x.clone().requires_grad_()
    w, ids = vlmkernels.ops.moe_topk_route(xg, k, weights_dtype=torch.float64, **kw)
    gw = torch.randn(w.shape, generator=g, dtype=torch.float64)
    (dx,) = torch.autograd.grad(w, xg, gw)
    want = route_mod.route_backward_math(x, ids, gw, scoring, renormalize, 1.7)
    torch.testing.assert_close(dx, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    finite = torch.isfinite(x).all(1)
    assert torch.autograd.gradcheck(lambda t: vlmkernels.ops.moe_topk_route(t, k, weights_dtype=torch.float64,
                                                                             **kw)[0],
                                    x[finite][:4].clone().requires_grad_())


@needs_ext
@pytest.mark.parametrize("op", ["moe_topk_route", "topk_select_tokens", "fused_moe", "anyres_pack", "attention"])
def test_autograd_is_registered_in_cpp(op):
    assert library.cpp_kernel(op, "Autograd")


def _moe_grads_against_float64():
    """fused_moe's gradients (fp32, random upstream gradient) and python_ref's in float64."""
    from python_ref.ops.moe_experts import fused_moe as ref

    g = torch.Generator().manual_seed(3)
    shapes = ((7, 6), (5, 8, 6), (5, 6, 4), (7, 2))
    leaves = [torch.randn(*s, generator=g, requires_grad=True) for s in shapes]
    ids = torch.randint(0, 5, (7, 2), generator=g)
    up = torch.randn(7, 6, generator=g)
    got = torch.autograd.grad(vlmkernels.ops.fused_moe(*leaves, ids, backend="reference"), leaves, up)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(ref(*refs, ids), refs, up.double())
    return got, want


@needs_ext
def test_cpp_autograd_of_python_ops_matches_float64_reference():
    for a, b in zip(*_moe_grads_against_float64()):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        out = vlmkernels.ops.fused_moe(x, torch.randn(2, 6, 4), torch.randn(2, 4, 3), torch.rand(3, 1),
                                       torch.zeros(3, 1, dtype=torch.long))
    assert out.grad_fn is None


def test_route_weights_need_no_grad_when_nothing_requires_it():
    w, ids = vlmkernels.ops.moe_topk_route(torch.randn(4, 9), 2)
    assert not w.requires_grad and w.grad_fn is None and ids.dtype == torch.int32


# ---- the registry decides once per process and device ----------------------------------------------

def test_selection_is_cached_and_reset(monkeypatch):
    monkeypatch.delenv("VLMKERNELS_BACKEND", raising=False)
    calls = []
    real = registry.availability
    monkeypatch.setattr(registry, "availability", lambda *a: calls.append(a) or real(*a))
    registry.reset()
    first = registry.select("fused_moe", "auto", "cpu")
    n = len(calls)
    assert n > 0
    for _ in range(3):
        assert registry.select("fused_moe", "auto", "cpu") == first
    assert len(calls) == n, "availability was re-checked on a cached choice"
    registry.reset()
    registry.select("fused_moe", "auto", "cpu")
    assert len(calls) > n


# ---- Triton launches run on their inputs' card ---------------------------------------------------

class _FakeCard:
    """Stands in for torch.cuda.device: records which card is current while kernels launch."""

    current = None

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self.prev, _FakeCard.current = _FakeCard.current, self.device
        return self

    def __exit__(self, *exc):
        _FakeCard.current = self.prev


def _triton_launchers():
    """(name, call) for every Triton launcher, on tiny CPU inputs (interpreter)."""
    from vlmkernels.triton import fused_moe, moe_align, moe_route, patch_embed

    x = torch.randn(3, 8)
    ids = torch.randint(0, 8, (3, 2), dtype=torch.int32)
    pix = torch.randn(1, 3, 8, 8)
    w = torch.randn(5, 3, 4, 4)
    image = torch.randint(0, 256, (9, 11, 3), dtype=torch.uint8)
    feats = torch.randn(2, 4, 6)  # an 8x8 image on one 8x8 pinpoint: base tile + 1 tile of 2x2 tokens
    return [
        ("moe_route", lambda: moe_route.moe_topk_route_triton(x, None, 2, 0, True, 1, 1, 0, 1.0)),
        ("fused_moe", lambda: fused_moe.fused_moe(x[:, :4], torch.randn(8, 6, 4), torch.randn(8, 4, 3),
                                                  torch.rand(3, 2), ids)),
        ("moe_align", lambda: moe_align.moe_align_block_size_triton(ids, 8, 4, None, 6 + 8 * 3)),
        ("patch_embed", lambda: patch_embed.patch_embed(pix, w, None, None, None, None, None, 1e-5)),
        ("anyres_pack", lambda: vlmkernels.ops.anyres_pack(feats, [(8, 8)], [[8, 8]], 8, None, backend="triton")),
        ("anyres_encode", lambda: vlmkernels.ops.anyres_encode(image, [[8, 8]], 8, 0.5, 0.5, w, fused=True,
                                                                backend="triton")),
    ]


@pytest.mark.skipif(not registry.triton_interpret(), reason="launch check runs the kernels under TRITON_INTERPRET=1")
def test_triton_launches_run_on_the_inputs_card(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from vlmkernels.triton import launch

    launches = []
    real_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append(_FakeCard.current)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    monkeypatch.setattr(launch, "device_of", lambda t: torch.device("cuda", 1))  # inputs "on" card 1
    monkeypatch.setattr(torch.cuda, "device", _FakeCard)
    for name, call in _triton_launchers():
        launches.clear()
        call()
        assert launches and all(d == torch.device("cuda", 1) for d in launches), (name, launches)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ops_run_on_the_second_card():
    x = torch.randn(33, 64, device="cuda:1")
    torch.cuda.set_device(0)
    for backend in ("cuda", "triton"):
        w, ids = vlmkernels.ops.moe_topk_route(x, 4, backend=backend)
        w_ref, ids_ref = vlmkernels.ops.moe_topk_route(x.cpu(), 4, backend="reference")
        assert w.device == x.device
        torch.testing.assert_close(w.cpu(), w_ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids.cpu(), ids_ref)


# ---- the C++-registered ops under torch.compile and torch.export ---------------------------------

def _router(x, bias):
    w, ids = vlmkernels.ops.moe_topk_route(x, 3, scoring="sigmoid", bias=bias, num_groups=4, topk_groups=2,
                                           weights_dtype=torch.bfloat16)
    sorted_ids, expert_ids, total = vlmkernels.ops.moe_align_block_size(ids, 12, 4)
    return w.float() * 2, ids, sorted_ids, expert_ids, total


def test_compile_fullgraph_with_autograd():
    x, bias = torch.randn(7, 12, requires_grad=True), torch.randn(12)
    g = torch.randn(7, 3)
    got = torch.compile(_router, fullgraph=True, backend="aot_eager")(x, bias)
    (got[0] * g).sum().backward()
    grad, x.grad = x.grad, None
    want = _router(x, bias)
    (want[0] * g).sum().backward()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    torch.testing.assert_close(grad, x.grad)


def test_export():
    class Router(torch.nn.Module):
        def forward(self, x, bias):
            return _router(x, bias)

    x, bias = torch.randn(7, 12), torch.randn(12)
    ep = torch.export.export(Router(), (x, bias))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"vlmkernels.moe_topk_route.default", "vlmkernels.moe_align_block_size.default"} <= targets, targets
    for a, b in zip(ep.module()(x, bias), _router(x, bias)):
        assert torch.equal(a, b)


def test_without_the_extension_every_op_falls_back_with_autograd():
    """A build without vlmkernels._C registers Python impls and the Python autograd formulas (which
    the C++ autograd of route, token select, fused_moe and anyres_pack replaces where it is built)."""
    code = """
import sys; sys.modules['vlmkernels._C'] = None
import torch, vlmkernels
from vlmkernels import _ext, library, registry
assert _ext.C is None and not library.cpp_kernel('moe_topk_route', 'CPU')
x = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
f = lambda t: vlmkernels.ops.moe_topk_route(t, 3, weights_dtype=torch.float64)[0]
assert torch.autograd.gradcheck(f, x)
assert registry.select('moe_topk_route', 'auto', 'cpu')[0] == 'reference'
ids = vlmkernels.ops.moe_topk_route(x, 3)[1]
assert int(vlmkernels.ops.moe_align_block_size(ids, 9, 4)[2]) % 4 == 0
tok = torch.randn(2, 7, 3, requires_grad=True)
vlmkernels.ops.topk_select_tokens(torch.randn(2, 7), tok, 3)[0].sum().backward()
assert tok.grad.abs().sum() > 0
from tests.test_dispatch import _moe_grads_against_float64
for a, b in zip(*_moe_grads_against_float64()):
    torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
