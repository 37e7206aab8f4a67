"""patch_embed: parity with python_ref (fp64) and with HF CLIP/SigLIP embeddings; autograd; bad input."""

import pytest
import torch

import vlmkernels  # noqa: F401
from python_ref.ops import anyres_embed as ref
from tests.helpers import assert_close, tol
from vlmkernels.anyres.embed import patch_embed

BACKENDS = ["reference", "triton"]


def _make(n=2, c=3, h=23, w=31, p=5, d=19, dtype=torch.float32, cls=True, pos=True, bias=True, ln=True):
    px = torch.randn(n, c, h, w)
    weight = torch.randn(d, c, p, p, dtype=dtype) / p
    rows = (h // p) * (w // p) + (1 if cls else 0)
    kw = dict(
        bias=torch.randn(d, dtype=dtype) if bias else None,
        class_embedding=torch.randn(d, dtype=dtype) if cls else None,
        position_embedding=torch.randn(rows, d, dtype=dtype) if pos else None,
        pre_layernorm=(torch.randn(d, dtype=dtype), torch.randn(d, dtype=dtype), 1e-5) if ln else None,
    )
    return px, weight, kw


def _ref64(px, weight, kw):
    up = lambda t: t.double() if torch.is_tensor(t) else t  # noqa: E731
    kw64 = {k: (tuple(up(x) for x in v) if isinstance(v, tuple) else up(v)) for k, v in kw.items()}
    return ref.patch_embed(px.double(), weight.double(), **kw64)


def _tol(dtype, k):
    """(atol, rtol) of ``patch_embed`` in ``dtype`` against the float64 reference, for a K-long patch
    GEMM, on every device (CPU under the interpreter and CUDA alike).

    Whatever the dtype, products accumulate in fp32 (exact products of half inputs, ``ieee`` dots
    for fp32): an error growing like sqrt(K) fp32 ulps, hence the fp32 atol times sqrt(K). The
    result is then rounded once to ``dtype``, as the reference's is, so a value near a rounding
    boundary may land one ``dtype`` ulp away: ``tol(dtype)`` covers that (2.5 ulps for bf16).
    """
    atol, rtol = tol(dtype)
    return max(atol, tol(torch.float32)[0] * k**0.5), 4 * rtol


def _check(out, exp, dtype, k):
    atol, rtol = _tol(dtype, k)
    assert_close(out, exp.to(out.dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(),                                                  # CLIP: cls + pos + pre-LN
    dict(cls=False, ln=False),                               # SigLIP: bias + pos, no cls
    dict(bias=False, pos=False, ln=False, cls=False),        # bare conv
    dict(h=19, w=19, p=4, d=7, n=1),                         # remainder pixels ignored ("valid")
])
def test_matches_reference(backend, case):
    px, weight, kw = _make(**case)
    out = patch_embed(px, weight, **kw, backend=backend)
    _check(out, _ref64(px, weight, kw), torch.float32, weight[0].numel())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half(backend, dtype):
    px, weight, kw = _make(dtype=dtype, d=24)
    # fp32 pixels that ``dtype`` holds exactly: the kernel casts pixels to the weight dtype (as HF
    # does), and Triton's interpreter casts fp32 -> bf16 toward zero where a GPU rounds to nearest
    px = px.to(dtype).float()
    out = patch_embed(px, weight, **kw, backend=backend)
    assert out.dtype == dtype
    _check(out, _ref64(px, weight, kw), dtype, weight[0].numel())


def test_non_contiguous_pixels():
    px, weight, kw = _make(h=20, w=25)
    strided = px.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)  # channels/width strides swapped
    assert not strided.is_contiguous()
    for backend in BACKENDS:
        out = patch_embed(strided, weight, **kw, backend=backend)
        _check(out, _ref64(px, weight, kw), torch.float32, weight[0].numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hf_clip_embeddings(backend):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=7)
    tower = transformers.CLIPVisionModel(cfg).eval()
    emb, ln = tower.embeddings, tower.pre_layrnorm
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    px = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        exp = ln(emb(px))
        out = patch_embed(px, emb.patch_embedding.weight, emb.patch_embedding.bias,
                          class_embedding=emb.class_embedding, position_embedding=emb.position_embedding.weight,
                          pre_layernorm=ln, backend=backend)
    assert_close(out, exp, atol=3e-5, rtol=3e-5)


def test_matches_hf_siglip_embeddings_on_384_like_tile():
    transformers = pytest.importorskip("transformers")
    # 30 px tiles with 7 px patches: like SigLIP's 384/14, the conv reads only the top-left 28x28
    cfg = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=30, patch_size=7)
    model = transformers.SiglipVisionModel(cfg).eval()
    emb = getattr(model, "vision_model", model).embeddings  # transformers 4.x nests it
    px = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        exp = emb(px)
        for backend in BACKENDS:
            out = patch_embed(px, emb.patch_embedding.weight, emb.patch_embedding.bias,
                              position_embedding=emb.position_embedding.weight, backend=backend)
            assert_close(out, exp, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_matches_reference(backend):
    px, weight, kw = _make(n=2, h=11, w=13, p=3, d=6)
    leaves = [px, weight, kw["bias"], kw["class_embedding"], kw["position_embedding"], *kw["pre_layernorm"][:2]]

    def run(fn, ts):
        ts = [t.clone().requires_grad_() for t in ts]
        out = fn(ts[0], ts[1], bias=ts[2], class_embedding=ts[3], position_embedding=ts[4],
                 pre_layernorm=(ts[5], ts[6], 1e-5))
        return out, ts

    g = torch.randn(2, 13, 6)
    out, mine = run(lambda *a, **k: patch_embed(*a, **k, backend=backend), leaves)
    (out * g).sum().backward()
    exp, theirs = run(ref.patch_embed, [t.double() for t in leaves])
    (exp * g.double()).sum().backward()
    for name, a, b in zip(["pixels", "weight", "bias", "cls", "pos", "ln_w", "ln_b"], mine, theirs):
        assert_close(a.grad, b.grad.float(), atol=1e-4, rtol=1e-4, msg=name)


def test_gradcheck_fp64():
    px, weight, kw = _make(n=1, h=7, w=8, p=3, d=4, dtype=torch.float64)
    px = px.double()
    ln_w, ln_b, _ = kw["pre_layernorm"]
    ts = [t.requires_grad_() for t in (px, weight, kw["bias"], kw["class_embedding"], kw["position_embedding"],
                                        ln_w, ln_b)]

    def f(a, w, b, c, p, lw, lb):
        return patch_embed(a, w, b, class_embedding=c, position_embedding=p, pre_layernorm=(lw, lb, 1e-5),
                           backend="reference")

    assert torch.autograd.gradcheck(f, ts, fast_mode=True)


def test_opcheck():
    px, weight, kw = _make(n=2, h=9, w=10, p=3, d=5)
    ln_w, ln_b, eps = kw["pre_layernorm"]
    args = (px.requires_grad_(), weight.requires_grad_(), kw["bias"], kw["class_embedding"].requires_grad_(),
            kw["position_embedding"], ln_w, ln_b, eps, "reference")
    torch.library.opcheck(torch.ops.vlmkernels.patch_embed.default, args)


def test_compile_fullgraph():
    px, weight, kw = _make(n=2, h=9, w=10, p=3, d=5)
    fn = torch.compile(lambda x: patch_embed(x, weight, **kw, backend="reference"), fullgraph=True, backend="eager")
    assert_close(fn(px), patch_embed(px, weight, **kw, backend="reference"))


def test_empty_batch():
    px, weight, kw = _make(n=0)
    for backend in BACKENDS:
        assert patch_embed(px, weight, **kw, backend=backend).shape == (0, 25, 19)


def test_nan_propagates():
    px, weight, kw = _make(ln=False)
    px[0, 0, 0, 0] = float("nan")
    for backend in BACKENDS:
        out = patch_embed(px, weight, **kw, backend=backend)
        assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[1]).any()


def test_bad_input():
    px, weight, kw = _make()
    with pytest.raises(ValueError, match="channels"):
        patch_embed(px[:, :2], weight)
    with pytest.raises(TypeError, match="uint8|floating"):
        patch_embed(px.to(torch.uint8), weight)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        patch_embed(px[0], weight)
    with pytest.raises(ValueError, match="smaller than one"):
        patch_embed(px[:, :, :3], weight)
    with pytest.raises(ValueError, match="position_embedding"):
        patch_embed(px, weight, position_embedding=kw["position_embedding"][1:], class_embedding=kw["class_embedding"])
    with pytest.raises(ValueError, match="bias"):
        patch_embed(px, weight, torch.randn(3))
    with pytest.raises(ValueError, match=r"weight must be \[D, C, p, p\]"):
        patch_embed(px, weight[..., :2])
    with pytest.raises(TypeError, match="pre_layernorm"):
        patch_embed(px, weight, pre_layernorm="ln")
    with pytest.raises(TypeError, match="float64"):
        patch_embed(px.double(), weight.double(), backend="triton")


# ---- uint8 tiles ---------------------------------------------------------------------------------

from vlmkernels.anyres.embed import patch_embed_uint8  # noqa: E402

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def _u8_tiles(n=2, h=23, w=31):
    # an HWC buffer viewed as [N, C, H, W]: the layout decoders and tilers produce
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_matches_reference(backend):
    tiles = _u8_tiles()
    _, weight, kw = _make()
    out = patch_embed_uint8(tiles, weight, mean=MEAN, std=STD, **kw, backend=backend)
    exp = ref.patch_embed_uint8(tiles, weight, mean=MEAN, std=STD, **kw)
    _check(out, exp, torch.float32, weight[0].numel())
    # and the same as embedding the float tiles normalized by the HF-PIL rule
    pixels = ((tiles.double() / 255).float() - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    _check(out, patch_embed(pixels, weight, **kw, backend="reference"), torch.float32, weight[0].numel())


def test_uint8_bf16_and_grads():
    tiles = _u8_tiles(h=11, w=13)
    _, weight, kw = _make(h=11, w=13, p=3, d=16, ln=False)
    out = patch_embed_uint8(tiles, weight.bfloat16(), mean=0.5, std=0.5, backend="triton")
    exp = ref.patch_embed_uint8(tiles, weight.bfloat16(), mean=0.5, std=0.5)
    _check(out, exp, torch.bfloat16, weight[0].numel())
    w1, w2 = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    g = torch.randn(2, 13, 16)  # 3x4 patches + class row
    (patch_embed_uint8(tiles, w1, mean=MEAN, std=STD, **kw) * g).sum().backward()
    (ref.patch_embed_uint8(tiles, w2, mean=MEAN, std=STD, **kw) * g).sum().backward()
    assert_close(w1.grad, w2.grad, atol=1e-4, rtol=1e-4)


def test_uint8_opcheck_and_bad_input():
    tiles = _u8_tiles(h=9, w=10)
    _, weight, kw = _make(h=9, w=10, p=3, d=5, ln=False)
    lut = ref.normalize_lut(MEAN, STD)
    torch.library.opcheck(torch.ops.vlmkernels.patch_embed_uint8.default,
                          (tiles, lut, weight.requires_grad_(), kw["bias"], kw["class_embedding"],
                           kw["position_embedding"], None, None, None, "reference"))
    with pytest.raises(TypeError, match="uint8"):
        patch_embed_uint8(tiles.float(), weight, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="mean"):
        patch_embed_uint8(tiles, weight, mean=[0.5, 0.5], std=STD)
    with pytest.raises(ValueError, match="std"):
        patch_embed_uint8(tiles, weight, mean=MEAN, std=0.0)
    with pytest.raises(ValueError, match="channels"):
        patch_embed_uint8(tiles[:, :1], weight, mean=MEAN, std=STD)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    # CLIP-L/14-336-like geometry, scaled down in D: 24x24 patches of 14 px, K = 588; the CPU tests' tolerance
    px, weight, kw = _make(n=3, h=336, w=336, p=14, d=96, dtype=dtype)
    K = weight[0].numel()
    exp = _ref64(px.to(dtype), weight, kw)
    cuda = lambda t: t.cuda() if torch.is_tensor(t) else t  # noqa: E731
    kwc = {k: (tuple(cuda(x) for x in v) if isinstance(v, tuple) else cuda(v)) for k, v in kw.items()}
    out = patch_embed(px.cuda(), weight.cuda(), **kwc, backend="triton").cpu()
    _check(out, exp, dtype, K)
    tiles = _u8_tiles(n=2, h=336, w=336)
    out8 = patch_embed_uint8(tiles.cuda(), weight.cuda(), mean=MEAN, std=STD, **kwc, backend="triton").cpu()
    _check(out8, ref.patch_embed_uint8(tiles, weight, mean=MEAN, std=STD, **kw), dtype, K)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_op_rejects_a_short_table(backend):
    tiles = _u8_tiles(h=9, w=10)
    _, weight, _ = _make(h=9, w=10, p=3, d=5)
    with pytest.raises(ValueError, match="lut"):
        torch.ops.vlmkernels.patch_embed_uint8(tiles, torch.zeros(3, 255), weight, backend=backend)
