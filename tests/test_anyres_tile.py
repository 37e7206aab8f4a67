"""anyres_tile: C++ CPU vs the pure-PyTorch reference (bit-exact), reference vs Pillow, and both vs
HF's PIL-backend processors (LlavaNextImageProcessorPil / LlavaOnevisionImageProcessorPil)."""

import random

import numpy as np
import pytest
import torch

from helpers import assert_close
from python_ref.ops import anyres as ref
from vlmkernels import registry
from vlmkernels.anyres.tile import anyres_tile, hwc_view, tile_views

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

PIL13 = int(PIL.__version__.split(".")[0]) >= 13  # Pillow 13 picks the pass order (Pillow#9549)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SMALL_PINS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
SMALL = 28


def cpu_ok():
    ok, why = registry.availability("anyres_tile", "cpu", "cpu")
    if not ok:
        pytest.skip(why)


def rand_u8(*shape, gen=None):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


# ---- the resampler itself ------------------------------------------------------------------------


def test_reference_resize_is_pillow_exact():
    if not PIL13:
        pytest.skip("the reference follows Pillow >= 13's pass order")
    rng = random.Random(5)
    g = torch.Generator().manual_seed(5)
    cases = [(97, 131, 11, 29), (40, 40, 97, 13), (13, 50, 130, 7), (200, 37, 19, 41), (1, 300, 1, 29), (300, 1, 7, 1)]
    cases += [tuple(rng.randint(1, 160) for _ in range(4)) for _ in range(30)]
    for h, w, oh, ow in cases:
        img = rand_u8(h, w, 3, gen=g)
        want = np.asarray(Image.fromarray(img.numpy()).resize((ow, oh), Image.BICUBIC))
        got = ref.resize_bicubic_u8(img.permute(2, 0, 1), oh, ow).permute(1, 2, 0).numpy()
        assert np.array_equal(got, want), (h, w, oh, ow)


# ---- C++ CPU vs reference -------------------------------------------------------------------------


def _layouts(g):
    hwc = rand_u8(45, 70, 3, gen=g)
    return {
        "hwc": hwc,
        "chw": rand_u8(3, 61, 37, gen=g),
        "gray2d": rand_u8(53, 29, gen=g),
        "gray_hwc": rand_u8(31, 67, 1, gen=g),
        "gray_chw": rand_u8(1, 31, 67, gen=g),
        "rgba_hwc": rand_u8(41, 43, 4, gen=g),
        "rgba_chw": rand_u8(4, 23, 89, gen=g),
        "crop_view": rand_u8(80, 90, 3, gen=g)[7:60:2, 5:77],  # non-contiguous rows and columns
        "transposed": rand_u8(3, 50, 40, gen=g).permute(2, 1, 0),  # HWC view with odd strides
        "tiny": rand_u8(1, 1, 3, gen=g),
        "tall": rand_u8(173, 2, 3, gen=g),
        "wide": rand_u8(2, 199, 3, gen=g),
        "exact": rand_u8(56, 56, 3, gen=g),  # no resize of the grid (sizes equal)
    }


@pytest.mark.parametrize("global_view", [True, False])
def test_cpu_matches_reference_layouts(global_view):
    cpu_ok()
    g = torch.Generator().manual_seed(1)
    imgs = _layouts(g)
    names, images = list(imgs), list(imgs.values())
    got, n_got = anyres_tile(images, SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, global_view=global_view, backend="cpu")
    want, n_want = anyres_tile(images, SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, global_view=global_view,
                               backend="reference")
    assert n_got == n_want
    assert_close(got, want, atol=0, rtol=0, msg=f"layouts {names}")
    # and the op path equals the direct python_ref functional (which plans on its own)
    direct, n_direct = ref.anyres_tile(images, SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, global_view=global_view)
    assert n_direct == n_got
    assert_close(got, direct, atol=0, rtol=0)


def test_cpu_matches_reference_random_sizes():
    cpu_ok()
    rng = random.Random(2)
    g = torch.Generator().manual_seed(2)
    images = [rand_u8(rng.randint(1, 300), rng.randint(1, 300), 3, gen=g) for _ in range(12)]
    # planar CHW images (widened to tap pairs straight from their rows), also as cropped views
    # whose rows are longer than the image
    images += [rand_u8(3, rng.randint(1, 300), rng.randint(1, 300), gen=g) for _ in range(6)]
    images += [rand_u8(3, rng.randint(2, 200), rng.randint(20, 300), gen=g)[:, 1:, 3:-7] for _ in range(3)]
    got, n_got = anyres_tile(images, SMALL_PINS, SMALL, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), backend="cpu")
    want, n_want = anyres_tile(images, SMALL_PINS, SMALL, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), backend="reference")
    assert n_got == n_want and got.shape[0] == sum(n_got)
    assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_low_precision_outputs(dtype):
    cpu_ok()
    g = torch.Generator().manual_seed(3)
    images = [rand_u8(47, 83, 3, gen=g), rand_u8(3, 29, 31, gen=g)]
    got, _ = anyres_tile(images, SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, out_dtype=dtype, backend="cpu")
    want, _ = anyres_tile(images, SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, backend="reference")
    assert got.dtype == dtype
    assert_close(got, want.to(dtype), atol=0, rtol=0)  # same float32 value, same rounding


def test_pad_to_max_layout():
    cpu_ok()
    g = torch.Generator().manual_seed(4)
    views = [hwc_view(rand_u8(30, 90, 3, gen=g)), hwc_view(rand_u8(50, 50, 3, gen=g))]
    for backend in ("cpu", "reference"):
        out, counts = tile_views(views, SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, pad_to_max=True, backend=backend)
        m = max(counts)
        assert out.shape[0] == 2 * m
        flat, _ = anyres_tile([v for v in views], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, backend="reference")
        assert_close(out[:counts[0]], flat[:counts[0]], atol=0, rtol=0)
        assert_close(out[m:m + counts[1]], flat[counts[0]:], atol=0, rtol=0)
        assert bool((out[counts[0]:m] == 0).all()) and bool((out[m + counts[1]:] == 0).all())


def test_pad_pixels_and_tile_order():
    # a wide image leaves top/bottom padding; padding normalizes to -mean/std, the global view is first
    cpu_ok()
    img = torch.full((10, 100, 3), 255, dtype=torch.uint8)
    out, counts = anyres_tile([img], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, backend="cpu")
    plan = ref.anyres_plan((10, 100), SMALL_PINS, SMALL)
    assert counts == [plan.num_tiles]
    pad = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    top = plan.padding[1]
    assert top > 0
    assert_close(out[1, :, 0, 0], pad.float(), atol=1e-6, rtol=0)
    white = (1.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert_close(out[0, :, 0, 0], white.float(), atol=1e-6, rtol=0)  # global view: no padding


# ---- vs HF PIL backend ---------------------------------------------------------------------------


def _hf_compare(proc, images, pins, tile, mean, std):
    if not PIL13:
        pytest.skip("the kernels follow Pillow >= 13's resize pass order (Pillow#9549); older Pillow differs")
    # HF rejects 2-D arrays; a 2-D image goes in as a PIL "L" image (converted to RGB by replication)
    hf_in = [Image.fromarray(im.numpy()) if im.dim() == 2 else im.numpy() for im in images]
    hf = proc(images=hf_in, return_tensors="pt")
    got, counts = anyres_tile(images, pins, tile, mean, std, backend="cpu")
    want = hf["pixel_values"]
    start = 0
    for i, n in enumerate(counts):
        assert want[i, :n].shape == got[start:start + n].shape
        d = (want[i, :n] - got[start:start + n]).abs()
        assert float(d.max()) <= 0.03 and float(d.mean()) <= 1e-3, (i, float(d.max()), float(d.mean()))
        if PIL13:
            assert_close(got[start:start + n], want[i, :n], atol=0, rtol=0, msg=f"image {i}")
        assert bool((want[i, n:] == 0).all())
        start += n
    return hf, counts


def test_matches_hf_llava_next_pil():
    cpu_ok()
    from transformers import LlavaNextImageProcessorPil

    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_grid_pinpoints=NEXT_PINS)
    g = torch.Generator().manual_seed(6)
    images = [rand_u8(480, 640, 3, gen=g), rand_u8(700, 211, 3, gen=g), rand_u8(333, 296, 3, gen=g)]
    hf, counts = _hf_compare(proc, images, NEXT_PINS, 336, CLIP_MEAN, CLIP_STD)
    assert hf["image_sizes"].tolist() == [list(im.shape[:2]) for im in images]
    assert hf["pixel_values"].shape[1] == max(counts)


def test_matches_hf_onevision_pil_gray_and_rgba():
    cpu_ok()
    from transformers import LlavaOnevisionImageProcessorPil

    pins = [[384 * i, 384 * j] for i in range(1, 3) for j in range(1, 3)]
    proc = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=pins)
    g = torch.Generator().manual_seed(7)
    images = [rand_u8(3, 301, 517, gen=g), rand_u8(290, 170, 4, gen=g), rand_u8(250, 260, gen=g)]
    _hf_compare(proc, images, pins, 384, (0.5,) * 3, (0.5,) * 3)


# ---- errors and opcheck --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image,exc,match",
    [
        (torch.zeros(0, 10, 3, dtype=torch.uint8), ValueError, "empty"),
        (torch.zeros(10, 0, dtype=torch.uint8), ValueError, "empty"),
        (torch.zeros(3, 10, 10, dtype=torch.float32), TypeError, "uint8"),
        (torch.zeros(10, 10, 2, dtype=torch.uint8), ValueError, "channels"),
        (torch.zeros(5, 10, 10, dtype=torch.uint8), ValueError, "channels"),
        (torch.zeros(1, 3, 10, 10, dtype=torch.uint8), ValueError, "shape"),
        ("not an image", TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(image, exc, match):
    with pytest.raises(exc, match=match):
        anyres_tile([image], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD)


def test_bad_arguments():
    img = torch.zeros(10, 10, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="mean"):
        anyres_tile([img], SMALL_PINS, SMALL, (0.5, 0.5), CLIP_STD)
    with pytest.raises(ValueError, match="std"):
        anyres_tile([img], SMALL_PINS, SMALL, CLIP_MEAN, (0.5, 0.0, 0.5))
    with pytest.raises(ValueError, match="multiple of tile_size"):
        anyres_tile([img], [[30, 56]], SMALL, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="resample"):
        anyres_tile([img], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, resample="bilinear")
    with pytest.raises(TypeError, match="out_dtype"):
        anyres_tile([img], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="tile_size"):
        anyres_tile([img], SMALL_PINS, 0, CLIP_MEAN, CLIP_STD)


def test_cpu_kernel_rejects_bad_plan():
    cpu_ok()
    op = torch.ops.vlmkernels.anyres_tile
    img = torch.zeros(10, 10, 3, dtype=torch.uint8)
    ok = torch.tensor([[28, 28, 0, 0, 1, 1, 0, 1]])
    for bad, match in [
        (torch.tensor([[28, 28, 0, 0, 1, 1, 1, 1]]), "exceed num_tiles"),
        (torch.tensor([[29, 28, 0, 0, 1, 1, 0, 1]]), "does not fit"),
        (torch.tensor([[28, 28, 0, 0, 0, 1, 0, 1]]), "grid"),
        (ok.int(), "int64"),
        (ok[:, :6], "plan"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            op([img], bad, 2, SMALL, list(CLIP_MEAN), list(CLIP_STD), True, torch.float32, "cpu")
    with pytest.raises(ValueError, match="overlap"):
        op([img, img], torch.cat([ok, ok]), 4, SMALL, list(CLIP_MEAN), list(CLIP_STD), True, torch.float32, "cpu")


def test_empty_batch():
    out, counts = anyres_tile([], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD)
    assert out.shape == (0, 3, SMALL, SMALL) and counts == []


def test_opcheck():
    g = torch.Generator().manual_seed(8)
    images = [rand_u8(20, 33, 3, gen=g), rand_u8(3, 17, 9, gen=g).permute(1, 2, 0)]
    plan = torch.tensor([[14, 28, 7, 0, 1, 1, 0, 1], [28, 15, 0, 6, 1, 1, 2, 1]])
    args = (images, plan, 5, SMALL, list(CLIP_MEAN), list(CLIP_STD), True, torch.float32)
    # an image given as two row runs (the plan's parts column)
    runs = [rand_u8(12, 33, 4, gen=g)[..., :3], rand_u8(8, 33, 3, gen=g)]
    plan2 = torch.tensor([[14, 28, 7, 0, 1, 1, 0, 2], [28, 15, 0, 6, 1, 1, 2, 1]])
    args2 = (runs + images[1:], plan2, 5, SMALL, list(CLIP_MEAN), list(CLIP_STD), True, torch.float32)
    for backend in ("cpu", "reference"):
        if registry.availability("anyres_tile", backend, "cpu")[0]:
            torch.library.opcheck(torch.ops.vlmkernels.anyres_tile.default, (*args, backend))
            torch.library.opcheck(torch.ops.vlmkernels.anyres_tile.default, (*args2, backend))


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(9)
    imgs = list(_layouts(g).values()) + [rand_u8(700, 500, 3, gen=g)]
    want, n_want = anyres_tile(imgs, SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, backend="cpu")
    got, n_got = anyres_tile([im.cuda() for im in imgs], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD, backend="cuda")
    assert n_got == n_want
    assert_close(got.cpu(), want, atol=0, rtol=0)
    bf, _ = anyres_tile([im.cuda() for im in imgs], SMALL_PINS, SMALL, CLIP_MEAN, CLIP_STD,
                        out_dtype=torch.bfloat16, backend="cuda")
    assert_close(bf.cpu(), want.bfloat16(), atol=0, rtol=0)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_thread_splits_and_wide_downscales(threads):
    # Row counts that split into partial 4-block steps per thread (blocks past the image are
    # computed, not stored), output widths that are not multiples of 8 (the column tail) and
    # downscales with 100+ taps per output pixel (the non-unrolled tap loop), each exact against
    # the reference.
    cpu_ok()
    g = torch.Generator().manual_seed(11)
    images = [rand_u8(137, 411, 3, gen=g), rand_u8(3, 97, 1003, gen=g), rand_u8(251, 23, 3, gen=g)]
    pins = [[28, 56], [56, 28], [84, 28], [28, 84]]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, n_got = anyres_tile(images, pins, 28, CLIP_MEAN, CLIP_STD, backend="cpu")
    finally:
        torch.set_num_threads(before)
    want, n_want = anyres_tile(images, pins, 28, CLIP_MEAN, CLIP_STD, backend="reference")
    assert n_got == n_want
    assert_close(got, want, atol=0, rtol=0)


def test_cpu_concurrent_callers():
    # per-thread scratch buffers: two Python threads tiling different images at once get the
    # same results as one after the other
    import threading

    cpu_ok()
    g = torch.Generator().manual_seed(12)
    jobs = [[rand_u8(211, 157, 3, gen=g)], [rand_u8(3, 89, 301, gen=g), rand_u8(64, 64, gen=g)]]
    pins = [[28, 56], [56, 28], [56, 56]]
    want = [anyres_tile(j, pins, 28, CLIP_MEAN, CLIP_STD, backend="cpu")[0] for j in jobs]
    got = [None] * len(jobs)

    def run(i):
        for _ in range(5):
            got[i] = anyres_tile(jobs[i], pins, 28, CLIP_MEAN, CLIP_STD, backend="cpu")[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g_, w in zip(got, want):
        assert_close(g_, w, atol=0, rtol=0)


@pytest.mark.parametrize("simd", ["0", "avx2"])
def test_cpu_simd_levels_match_reference(simd):
    # VLMKERNELS_CPU_SIMD (read when the extension loads, hence a fresh interpreter): "0" runs the
    # scalar loops non-x86 builds use, "avx2" the AVX2 loops an AVX-512 machine skips (the default
    # path is checked everywhere else): interleaved, planar, gray and RGBA images, up- and
    # downscales, 16-row blocks and 64-column steps cut short, exact against the reference
    import os
    import subprocess
    import sys
    import textwrap

    cpu_ok()
    code = textwrap.dedent("""
        import torch
        from vlmkernels.anyres.tile import anyres_tile
        g = torch.Generator().manual_seed(21)
        u8 = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, generator=g)
        images = [u8(137, 411, 3), u8(3, 97, 301), u8(45, 61), u8(33, 29, 4), u8(3, 251, 23), u8(1, 1, 3),
                  u8(3, 53, 1013)]
        pins = [[28, 56], [56, 28], [84, 28], [28, 84]]
        for dtype in (torch.float32, torch.bfloat16, torch.uint8):
            got, n = anyres_tile(images, pins, 28, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), out_dtype=dtype, backend="cpu")
            want, m = anyres_tile(images, pins, 28, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), out_dtype=dtype,
                                  backend="reference")
            assert n == m and torch.equal(got, want), dtype
        print("ok")
    """)
    env = dict(os.environ, VLMKERNELS_CPU_SIMD=simd)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
