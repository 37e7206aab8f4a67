"""anyres_tile(out_dtype=uint8) and anyres_encode (uint8 tiles -> patch_embed_uint8): parity with the
float32 path (anyres_tile float32 -> patch_embed) and with python_ref's composition, per backend;
gradients; bad input."""

import pytest
import torch

import vlmkernels  # noqa: F401
from python_ref.ops import anyres as ref
from tests.helpers import assert_close, tol
from vlmkernels import registry
from vlmkernels.anyres.embed import patch_embed
from vlmkernels.anyres.encode import anyres_encode
from vlmkernels.anyres.tile import anyres_tile

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PINS = [[28, 56], [56, 28], [56, 56], [84, 28]]
TILE, PATCH = 28, 7
P = (TILE // PATCH) ** 2


def _need(backend, op="anyres_tile", device="cpu"):
    ok, why = registry.availability(op, backend, device)
    if not ok:
        pytest.skip(why)


def _images(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    u8 = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, generator=g).to(device)  # noqa: E731
    return [
        u8(3, 37, 53),                    # CHW, wide
        u8(41, 29, 3),                    # HWC, tall
        u8(19, 23),                       # grayscale
        u8(4, 31, 17),                    # RGBA (composited onto white)
        u8(50, 70, 3)[3:46:2, 1:60],      # a strided crop
    ]


def _params(seed, d=13, cls=True, pos=True, ln=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    weight = r(d, 3, PATCH, PATCH) / PATCH
    kw = dict(
        class_embedding=r(d) if cls else None,
        position_embedding=r(P + int(cls), d) if pos else None,
        pre_layernorm=(r(d), r(d), 1e-5) if ln else None,
    )
    return weight, r(d), kw


# ---- anyres_tile(out_dtype=uint8) -----------------------------------------------------------------

@pytest.mark.parametrize("global_view", [True, False])
def test_reference_uint8_tiles_are_the_bytes_the_float_path_normalizes(global_view):
    ims = _images(1)
    u8, n = anyres_tile(ims, PINS, TILE, MEAN, STD, global_view=global_view, out_dtype=torch.uint8,
                        backend="reference")
    f32, n32 = anyres_tile(ims, PINS, TILE, MEAN, STD, global_view=global_view, backend="reference")
    assert u8.dtype == torch.uint8 and n == n32 and u8.shape == f32.shape
    assert torch.equal(ref.normalize_u8(u8, MEAN, STD), f32)
    exp, n_ref = ref.anyres_tile(ims, PINS, TILE, MEAN, STD, global_view=global_view, out_dtype=torch.uint8)
    assert n_ref == n and torch.equal(u8, exp)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_native_uint8_tiles_match_reference(backend):
    device = "cuda" if backend == "cuda" else "cpu"
    _need(backend, device=device)
    ims = _images(2, device)
    for gv in (True, False):
        got, n = anyres_tile(ims, PINS, TILE, MEAN, STD, global_view=gv, out_dtype=torch.uint8, backend=backend)
        exp, n_ref = ref.anyres_tile([im.cpu() for im in ims], PINS, TILE, MEAN, STD, global_view=gv,
                                     out_dtype=torch.uint8)
        assert n == n_ref and got.dtype == torch.uint8
        assert torch.equal(got.cpu(), exp), f"global_view={gv}: {(got.cpu() != exp).sum()} bytes differ"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_uint8_mode_ignores_mean_and_std(backend):
    _need(backend)
    ims = _images(3)[:2]
    a, _ = anyres_tile(ims, PINS, TILE, MEAN, STD, out_dtype=torch.uint8, backend=backend)
    b, _ = anyres_tile(ims, PINS, TILE, 0.5, 0.0, out_dtype=torch.uint8, backend=backend)  # std=0 is unused
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="std"):
        anyres_tile(ims, PINS, TILE, 0.5, 0.0, backend=backend)  # ...but not for float tiles


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_uint8(backend):
    _need(backend)
    im = torch.randint(0, 256, (23, 31, 3), dtype=torch.uint8)
    plan = torch.tensor([[14, 28, 7, 0, 1, 1, 0, 1]], dtype=torch.int64)  # 23x31 into a 28x28 canvas
    args = ([im], plan, 2, TILE, [0.0] * 3, [1.0] * 3, True, torch.uint8, backend)
    torch.library.opcheck(torch.ops.vlmkernels.anyres_tile.default, args)


# ---- anyres_encode ----------------------------------------------------------------------------------

ENCODE_BACKENDS = ["reference", "cpu", "triton"]
CASES = [
    dict(),                                   # CLIP: class token + positions + pre-LN
    dict(cls=False, ln=False),                # SigLIP-like: bias + positions
    dict(cls=False, pos=False, ln=False),     # bare conv + bias
]


def _float_path(ims, weight, bias, kw, backend, global_view=True):
    tile_b = {"cpu": "cpu", "reference": "reference"}.get(backend, "auto")
    embed_b = "reference" if backend != "triton" else "triton"
    tiles, n = anyres_tile(ims, PINS, TILE, MEAN, STD, global_view=global_view, backend=tile_b)
    return patch_embed(tiles, weight, bias, **kw, backend=embed_b), n


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ENCODE_BACKENDS)
def test_encode_matches_float_path_and_reference(backend, case):
    if backend == "triton":
        _need("triton", "patch_embed_uint8")
    else:
        _need(backend)
    ims = _images(10)
    weight, bias, kw = _params(11, **case)
    got, n = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, backend=backend)
    exp, n_exp = _float_path(ims, weight, bias, kw, backend)
    assert n == n_exp and got.shape == (sum(n), P + int(case.get("cls", True)), weight.shape[0])
    # same bytes, same table values, same GEMM: equal up to fp32 accumulation order
    assert_close(got, exp, atol=1e-5, rtol=1e-5)
    ref_out, n_ref = ref.anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw)
    assert n_ref == n
    atol, rtol = tol(torch.float32)
    assert_close(got, ref_out, atol=atol * 4, rtol=rtol * 4)


def test_encode_reference_is_exactly_the_float_path():
    ims = _images(12)
    weight, bias, kw = _params(13)
    got, _ = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, backend="reference")
    exp, _ = _float_path(ims, weight, bias, kw, "reference")
    assert torch.equal(got, exp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encode_half_weights(dtype):
    ims = _images(14)[:2]
    weight, bias, kw = _params(15, dtype=dtype)
    got, _ = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, backend="reference")
    assert got.dtype == dtype
    exp, _ = _float_path(ims, weight, bias, kw, "reference")
    assert_close(got, exp, dtype=dtype)


def test_encode_no_global_view_and_single_image():
    im = _images(16)[0]
    weight, bias, kw = _params(17)
    got, n = anyres_encode(im, PINS, TILE, MEAN, STD, weight, bias, **kw, global_view=False, backend="reference")
    exp, n_exp = _float_path([im], weight, bias, kw, "reference", global_view=False)
    assert n == n_exp == [n_exp[0]] and torch.equal(got, exp)


def test_encode_empty_batch():
    weight, bias, kw = _params(18)
    out, n = anyres_encode([], PINS, TILE, MEAN, STD, weight, bias, **kw, backend="reference")
    assert n == [] and out.shape == (0, P + 1, weight.shape[0])


def test_encode_gradients_match_float_path():
    ims = _images(19)[:2]
    weight, bias, kw = _params(20)
    leaves = [weight, bias, kw["class_embedding"], kw["position_embedding"], *kw["pre_layernorm"][:2]]
    grads = []
    for run in ("encode", "float"):
        for t in leaves:
            t.grad = None
            t.requires_grad_(True)
        if run == "encode":
            out, _ = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw, backend="reference")
        else:
            out, _ = _float_path(ims, weight, bias, kw, "reference")
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([t.grad.clone() for t in leaves])
    for g_enc, g_flt in zip(*grads):
        assert_close(g_enc, g_flt, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
def test_encode_cuda_matches_float_path():
    ims = _images(21, "cuda")
    weight, bias, kw = _params(22)
    mv = lambda t: t.cuda() if torch.is_tensor(t) else t  # noqa: E731
    weight, bias = weight.cuda(), bias.cuda()
    kw = {k: (tuple(mv(x) for x in v) if isinstance(v, tuple) else mv(v)) for k, v in kw.items()}
    got, n = anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, **kw)
    tiles, n_exp = anyres_tile(ims, PINS, TILE, MEAN, STD)
    exp = patch_embed(tiles, weight, bias, **kw)
    assert n == n_exp
    assert_close(got, exp, atol=1e-5, rtol=1e-5)


# ---- errors -----------------------------------------------------------------------------------------

def test_exported_as_functional_op():
    assert vlmkernels.ops.anyres_encode is anyres_encode


def test_encode_errors():
    ims = _images(23)[:1]
    weight, bias, kw = _params(24)
    with pytest.raises(ValueError, match="backend"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, backend="cudnn")
    with pytest.raises(TypeError, match="uint8"):
        anyres_encode([ims[0].float()], PINS, TILE, MEAN, STD, weight, bias, backend="reference")
    with pytest.raises(ValueError, match="empty"):
        anyres_encode([torch.zeros(0, 5, 3, dtype=torch.uint8)], PINS, TILE, MEAN, STD, weight, bias,
                      backend="reference")
    with pytest.raises(ValueError, match="channels"):
        anyres_encode([torch.zeros(5, 6, 2, dtype=torch.uint8)], PINS, TILE, MEAN, STD, weight, bias,
                      backend="reference")
    with pytest.raises(ValueError, match="position_embedding"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight, bias, position_embedding=torch.randn(P + 3, 13),
                      backend="reference")
    with pytest.raises(ValueError, match="std"):
        anyres_encode(ims, PINS, TILE, MEAN, (0.2, 0.0, 0.3), weight, bias, backend="reference")
    with pytest.raises(ValueError, match="smaller than one"):
        anyres_encode(ims, [[5, 10]], 5, MEAN, STD, weight, bias, backend="reference")
    with pytest.raises(TypeError, match="weight"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight.numpy(), bias, backend="reference")
    with pytest.raises(ValueError, match="images\\[0\\] is on cpu but weight is on meta"):
        anyres_encode(ims, PINS, TILE, MEAN, STD, weight.to("meta"), backend="reference")
    with pytest.raises(ValueError, match="pinpoint"):
        anyres_encode(ims, [[30, 56]], TILE, MEAN, STD, weight, bias, backend="reference")
