"""anyres_encode(fused=True): the one-kernel tile-and-encode (Triton under the interpreter, and its
PyTorch reference) against the two-kernel path and python_ref; the C++ taps binding; the op
(opcheck, gradients); bad input."""

import pytest
import torch

import vlmkernels
from python_ref.ops import anyres as ref
from tests.helpers import assert_close, run_without_interpreter, tol
from tests.test_anyres_encode import _images as _two_kernel_images
from tests.test_anyres_encode import _params
from vlmkernels import _ext, registry
from vlmkernels.anyres.encode import anyres_encode
from vlmkernels.anyres.encode_fused import axis_rows, build_tables
from vlmkernels.anyres.tile import hwc_view
from vlmkernels.triton.anyres_encode import D_VFIRST, NDESC

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PINS = [[28, 56], [56, 28], [56, 56], [84, 28]]
TILE, PATCH = 28, 7
P = (TILE // PATCH) ** 2
OP = torch.ops.vlmkernels.anyres_encode_fused.default


def _need(backend, op="anyres_encode_fused", device="cpu"):
    ok, why = registry.availability(op, backend, device)
    if not ok:
        pytest.skip(why)


def _images(seed, device="cpu"):
    # the two-kernel tests' layouts (upscale/downscale, CHW/HWC, gray, RGBA and strided crops are
    # host-side copies here) plus one that shrinks in height much more than width: vertical pass first
    g = torch.Generator().manual_seed(seed + 1000)
    tall = torch.randint(0, 256, (97, 23, 3), dtype=torch.uint8, generator=g).to(device)
    return _two_kernel_images(seed, device) + [tall]


# ---- tap tables ---------------------------------------------------------------------------------------

SIZES = [(37, 28), (28, 37), (53, 28), (1, 5), (5, 1), (97, 84), (23, 19), (336, 336), (4032, 336), (7, 672)]


@pytest.mark.parametrize("in_size,out_size", SIZES)
def test_cpp_taps_equal_python_ref(in_size, out_size):
    if _ext.C is None:
        pytest.skip("vlmkernels._C is not built")
    xmin, weights = _ext.C.anyres_taps_cpu(in_size, out_size)
    exp_xmin, count, exp_w = ref.pil_bicubic_coefficients(in_size, out_size)
    assert xmin.dtype == weights.dtype == torch.int32
    assert torch.equal(xmin.long(), exp_xmin) and torch.equal(weights, exp_w)
    # taps past Pillow's count carry weight 0 (the kernel may read them masked)
    past = torch.arange(weights.shape[1])[None, :] >= count[:, None]
    assert not weights[past].any()


def test_cpp_taps_errors():
    if _ext.C is None:
        pytest.skip("vlmkernels._C is not built")
    for bad in ((0, 5), (5, 0), (-3, 4), (1 << 24, 4)):
        with pytest.raises(ValueError, match="_size"):
            _ext.C.anyres_taps_cpu(*bad)


def test_unchanged_axis_is_one_identity_tap():
    rows = axis_rows(19, 19)
    assert rows.shape == (19, 2)
    assert torch.equal(rows[:, 0], torch.arange(19, dtype=torch.int32)) and bool((rows[:, 1] == 1 << 22).all())


# ---- tables -> tiles ------------------------------------------------------------------------------

@pytest.mark.parametrize("global_view", [True, False])
def test_tables_describe_the_tilers_bytes(global_view):
    """The reference materialization of the descriptors equals anyres_tile's uint8 tiles bit for bit."""
    ims = _images(1)
    src, desc, taps, counts = build_tables([hwc_view(im) for im in ims], PINS, TILE, global_view)
    assert desc.shape == (sum(counts), NDESC) and bool((desc[:, D_VFIRST] == 1).any())
    got = torch.ops.vlmkernels.anyres_encode_fused_tiles(src, desc, taps, TILE)
    exp, n = ref.anyres_tile(ims, PINS, TILE, MEAN, STD, global_view=global_view, out_dtype=torch.uint8)
    assert counts == n and torch.equal(got, exp), f"{(got != exp).sum()} bytes differ"


def test_single_contiguous_image_is_read_in_place():
    im = _images(2)[1]  # HWC, contiguous
    src, *_ = build_tables([hwc_view(im)], PINS, TILE, True)
    assert src.data_ptr() == im.data_ptr()


# ---- the fused op vs the two-kernel path -------------------------------------------------------------

CASES = [
    dict(),                                   # CLIP: class token + positions + pre-LN
    dict(cls=False, ln=False),                # SigLIP-like: bias + positions
    dict(cls=False, pos=False, ln=False),     # bare conv + bias
]


def _check_parity(ims, weight, bias, kw, global_view, atol=None, rtol=None):
    got, n = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, global_view=global_view,
                           fused=True, backend="triton")
    two, n_two = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, global_view=global_view,
                               backend="triton")
    assert n == n_two and got.shape == two.shape and got.dtype == weight.dtype
    # same bytes, same table values, same GEMM blocks in M/D: equal up to accumulation order
    assert_close(got, two, atol=atol or 1e-5, rtol=rtol or 1e-5, msg="fused vs two-kernel:")
    ref_out, n_ref = ref.anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, global_view=global_view)
    assert n_ref == n
    a, r = tol(weight.dtype)
    assert_close(got, ref_out, atol=a * 4, rtol=r * 4, dtype=weight.dtype, msg="fused vs python_ref:")


def test_fused_triton_clip_all_layouts_global_view():
    _need("triton")
    weight, bias, kw = _params(11)
    _check_parity(_images(10), weight, bias, kw, global_view=True)


def test_fused_triton_siglip_no_global_view():
    _need("triton")
    weight, bias, kw = _params(13, cls=False, ln=False)
    ims = _images(12)
    _check_parity([ims[0], ims[2], ims[5]], weight, bias, kw, global_view=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_triton_half_weights_bare_conv(dtype):
    _need("triton")
    weight, bias, kw = _params(15, d=17, cls=False, pos=False, ln=False, dtype=dtype)
    ims = _images(14)
    a, r = tol(dtype)
    _check_parity([ims[3], ims[4]], weight, bias, kw, global_view=True, atol=a, rtol=r)


def test_fused_triton_clip_bf16_one_image():
    _need("triton")
    weight, bias, kw = _params(17, dtype=torch.bfloat16)
    a, r = tol(torch.bfloat16)
    _check_parity(_images(16)[1], weight, bias, kw, global_view=True, atol=a, rtol=r)


@pytest.mark.parametrize("case", CASES)
def test_fused_reference_is_exactly_the_two_kernel_reference(case):
    ims = _images(18)
    weight, bias, kw = _params(19, **case)
    got, n = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, fused=True, backend="reference")
    exp, n_exp = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, backend="reference")
    assert n == n_exp and torch.equal(got, exp)


def test_fused_empty_batch():
    weight, bias, kw = _params(20)
    for backend in ("reference", "triton"):
        out, n = anyres_encode([], PINS, TILE, MEAN, STD, weight, bias, **kw, fused=True, backend=backend)
        assert n == [] and out.shape == (0, P + 1, weight.shape[0])


def test_fused_auto_is_the_two_kernel_path(monkeypatch):
    import vlmkernels.anyres.encode as enc

    calls = []
    monkeypatch.setattr(enc, "anyres_encode_fused", lambda *a, **k: calls.append(1))
    weight, bias, kw = _params(21)
    anyres_encode(_images(22)[:1], PINS, TILE, MEAN, STD, weight, bias, **kw, backend="reference")
    anyres_encode(_images(22)[:1], PINS, TILE, MEAN, STD, weight, bias, **kw, fused=False, backend="reference")
    assert calls == []


# ---- the op: opcheck, autograd -------------------------------------------------------------------------

def _op_args(backend, requires_grad=False):
    ims = [torch.randint(0, 256, (23, 31, 3), dtype=torch.uint8)]
    src, desc, taps, _ = build_tables([hwc_view(im) for im in ims], [[28, 28]], TILE, True)
    weight, bias, kw = _params(23, d=16)
    lut = torch.rand(3, 256)
    if requires_grad:
        weight.requires_grad_(True)
        bias.requires_grad_(True)
    ln_w, ln_b, eps = kw["pre_layernorm"]
    return (src, desc, taps, lut, TILE, weight, bias, kw["class_embedding"], kw["position_embedding"],
            ln_w, ln_b, eps, backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    _need(backend)
    torch.library.opcheck(OP, _op_args(backend, requires_grad=True))


def test_opcheck_tiles_op():
    src, desc, taps = _op_args("reference")[:3]
    torch.library.opcheck(torch.ops.vlmkernels.anyres_encode_fused_tiles.default, (src, desc, taps, TILE, "auto"))


def test_gradients_match_two_kernel_path():
    ims = _images(24)[:3]
    weight, bias, kw = _params(25)
    leaves = [weight, bias, kw["class_embedding"], kw["position_embedding"], *kw["pre_layernorm"][:2]]
    grads = []
    for fused in (True, False):
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        out, _ = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, fused=fused, backend="reference")
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad.clone() for t in leaves])
    for g_fused, g_two in zip(*grads):
        assert_close(g_fused, g_two, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_fused_cuda_matches_two_kernel_path():
    ims = _images(26, "cuda")
    weight, bias, kw = _params(27)
    mv = lambda t: t.cuda() if torch.is_tensor(t) else t  # noqa: E731
    weight, bias = weight.cuda(), bias.cuda()
    kw = {k: (tuple(mv(x) for x in v) if isinstance(v, tuple) else mv(v)) for k, v in kw.items()}
    for gv in (True, False):
        got, n = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, global_view=gv, fused=True)
        exp, n_exp = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, global_view=gv)
        assert n == n_exp
        assert_close(got, exp, atol=1e-5, rtol=1e-5)


# ---- errors -----------------------------------------------------------------------------------------

def test_fused_errors():
    ims = _images(28)[:1]
    weight, bias, kw = _params(29)
    with pytest.raises(ValueError, match="fused=True: backend"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, fused=True, backend="cpu")
    with pytest.raises(TypeError, match="fused"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, fused="yes")
    with pytest.raises(TypeError, match="uint8"):
        anyres_encode([ims[0].float()], PINS, TILE, MEAN, STD, weight, bias, fused=True)
    with pytest.raises(ValueError, match="empty"):
        anyres_encode([torch.zeros(0, 5, 3, dtype=torch.uint8)], PINS, TILE, MEAN, STD, weight, fused=True)
    with pytest.raises(ValueError, match="channels"):
        anyres_encode([torch.zeros(5, 6, 2, dtype=torch.uint8)], PINS, TILE, MEAN, STD, weight, fused=True)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight[:, :1], bias, fused=True)
    with pytest.raises(ValueError, match="position_embedding"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, position_embedding=torch.randn(P + 3, 13), fused=True)
    with pytest.raises(ValueError, match="std"):
        anyres_encode(ims, PINS, TILE, MEAN, (0.2, 0.0, 0.3), weight, bias, fused=True)
    with pytest.raises(ValueError, match="smaller than one"):
        anyres_encode(ims, [[5, 10]], 5, MEAN, STD, weight, bias, fused=True)
    with pytest.raises(ValueError, match="pinpoint"):
        anyres_encode(ims, [[30, 56]], TILE, MEAN, STD, weight, bias, fused=True)
    with pytest.raises(ValueError, match="images\\[0\\] is on cpu but weight is on meta"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight.to("meta"), fused=True)
    with pytest.raises(TypeError, match="float64"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight.double(), fused=True, backend="triton")


def test_op_rejects_tables_that_read_out_of_bounds():
    args = list(_op_args("reference"))
    src, desc, taps = args[:3]
    bad = [
        (dict(src=src[:10]), "past the end of src"),
        (dict(src=src.float()), "src must be"),
        (dict(desc=desc[:, :5].contiguous()), "desc must be"),
        (dict(desc=desc.to(torch.int32)), "desc must be"),
        (dict(taps=taps[:7]), "past the end of taps"),
        (dict(taps=torch.where(torch.arange(taps.numel()) == 0, -4, taps).to(torch.int32)), "xmin"),
        (dict(lut=torch.rand(3, 255)), "lut"),
    ]
    d = desc.clone()
    d[0, 0] = -1
    bad.append((dict(desc=d), "negative"))
    d = desc.clone()
    d[0, 11] = 0
    bad.append((dict(desc=d), "positive"))
    names = ["src", "desc", "taps", "lut"]
    for change, match in bad:
        call = list(args)
        for k, v in change.items():
            call[names.index(k)] = v
        for backend in ("reference", "triton"):
            call[-1] = backend
            with pytest.raises((ValueError, TypeError), match=match):
                OP(*call)


def test_exported_functional_takes_fused():
    assert vlmkernels.ops.anyres_encode is anyres_encode
    assert "anyres_encode_fused" in vlmkernels.schemas.SERVED_BY


def test_kernels_compile_for_sm90():
    """The one-kernel tile-and-encode and the (uint8 / float) patch GEMM build to sm_90 cubins."""
    run_without_interpreter(
        "from vlmkernels.triton import anyres_encode, patch_embed\n"
        "assert anyres_encode.aot_compile(dtype='bf16').asm['cubin']\n"
        "assert patch_embed.aot_compile(from_u8=True, dtype='bf16').asm['cubin']\n"
        "assert patch_embed.aot_compile(from_u8=False, dtype='fp32').asm['cubin']\n")
