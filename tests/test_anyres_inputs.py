"""What users pass to AnyRes (issue 15): PIL images of any height read as HWC and in place, arrays
laid out by HF's rule, integer sizes, mean/std as arrays, bad raw-op arguments rejected alike by
every backend (before anything is allocated), and processor settings HF accepts."""

import gc
import warnings

import numpy as np
import pytest
import torch

from vlmkernels import registry
from vlmkernels.anyres import pil as pil_mod
from vlmkernels.anyres.pil import pil_hwc, pil_view
from vlmkernels.anyres.tile import RowRuns, _tile_reference, anyres_tile, check_tile_args, hwc_view, tile_views
from vlmkernels.patching import patch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format  # noqa: E402

PIL13 = int(PIL.__version__.split(".")[0]) >= 13
PINS = [[28, 56], [56, 28], [56, 56]]
MEAN, STD = [0.48, 0.45, 0.40], [0.27, 0.26, 0.28]
NEXT_KW = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=PINS)
OV_KW = dict(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=PINS)
OP = torch.ops.vlmkernels.anyres_tile.default


def _cpu_ok():
    ok, why = registry.availability("anyres_tile", "cpu", "cpu")
    if not ok:
        pytest.skip(why)


def _processors(family: str, backend_cls: str):
    """(a patched processor of the class, HF's PIL-backend oracle)."""
    base = "LlavaNextImageProcessor" if family == "next" else "LlavaOnevisionImageProcessor"
    kw = NEXT_KW if family == "next" else OV_KW
    proc = getattr(transformers, base + ("Pil" if backend_cls == "pil" else ""))(**kw)
    assert patch(proc).paths() == [""]
    return proc, getattr(transformers, base + "Pil")(**kw)


def _assert_same(got, want, exact=PIL13):
    assert torch.equal(got["image_sizes"], want["image_sizes"]), (got["image_sizes"], want["image_sizes"])
    assert got["pixel_values"].shape == want["pixel_values"].shape
    d = (got["pixel_values"] - want["pixel_values"]).abs().max()
    assert float(d) == 0 if exact else float(d) <= 0.03, float(d)


def _pil(h, w, seed=0, channels=3):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else np.ascontiguousarray(arr[..., :channels]))


# ---- 1. PIL images are HWC; arrays follow HF's inference ------------------------------------------


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("backend_cls", ["pil", "torchvision"])
def test_short_pil_images_are_not_read_channels_first(family, backend_cls):
    """Heights 1, 3 and 4 are also channel counts: a PIL image's layout must never be inferred."""
    _cpu_ok()
    proc, oracle = _processors(family, backend_cls)
    for h in (1, 3, 4):
        for channels in (3, 1, 4):  # RGB, L, RGBA
            img = _pil(h, 90, seed=h, channels=channels)
            _assert_same(proc(img, return_tensors="pt"), oracle(img, return_tensors="pt"))


AMBIGUOUS = [(3, 5, 4), (4, 7, 3), (1, 6, 1), (3, 3, 3), (4, 9, 4), (6, 5, 3), (1, 8, 9), (7, 4, 4), (2, 1, 3)]


@pytest.mark.parametrize("shape", AMBIGUOUS, ids=str)
def test_arrays_follow_hf_channel_inference(shape):
    """hwc_view takes HF's rule (infer_channel_dimension_format with 1, 3 or 4 channels; first wins)."""
    arr = np.zeros(shape, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmt = infer_channel_dimension_format(arr, num_channels=(1, 3, 4))
    want = shape[1:] + shape[:1] if fmt == ChannelDimension.FIRST else shape
    assert tuple(hwc_view(arr).shape) == want


@pytest.mark.parametrize("idf", [None, "channels_first", "channels_last"])
def test_processor_arrays_follow_hf_inference_and_input_data_format(idf):
    _cpu_ok()
    proc, oracle = _processors("next", "pil")
    rng = np.random.default_rng(1)
    shapes = [(3, 40, 4), (4, 50, 3), (3, 30, 3)] if idf is None else [(3, 40, 3), (4, 50, 4)]
    for shape in shapes:
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        for image in (arr, torch.from_numpy(arr)):
            _assert_same(proc(image, return_tensors="pt", input_data_format=idf),
                         oracle(arr, return_tensors="pt", input_data_format=idf))


# ---- 3. integer sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pins, tile, name",
    [([[64.9, 64]], 32, "grid_pinpoints"), (PINS, 32.7, "tile_size"), (PINS, 28.0, "tile_size"),
     (np.array(PINS, dtype=np.float32), 28, "grid_pinpoints"), (torch.tensor(PINS, dtype=torch.float64), 28,
     "grid_pinpoints"), (PINS, True, "tile_size"), ([[True, 28]], 28, "grid_pinpoints"), ([["56", 28]], 28,
     "grid_pinpoints")],
    ids=["float-pin", "float-tile", "integral-float-tile", "numpy-float-pins", "tensor-float-pins", "bool-tile",
         "bool-pin", "str-pin"],
)
def test_non_integer_sizes_are_rejected(pins, tile, name):
    img = torch.zeros(20, 30, 3, dtype=torch.uint8)
    with pytest.raises(TypeError, match=name):
        anyres_tile([img], pins, tile, MEAN, STD, backend="reference")


def test_integer_like_sizes_are_accepted():
    img = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want, _ = anyres_tile([img], PINS, 28, MEAN, STD, backend="reference")
    for pins, tile in [(np.array(PINS), np.int64(28)), (torch.tensor(PINS, dtype=torch.int32), torch.tensor(28)),
                       ([[np.int32(h), w] for h, w in PINS], np.uint16(28))]:
        got, _ = anyres_tile([img], pins, tile, MEAN, STD, backend="reference")
        assert torch.equal(got, want)


# ---- 4. one validation for every backend of the raw op --------------------------------------------


def _args(**bad):
    img = torch.zeros(10, 12, 3, dtype=torch.uint8)
    args = dict(images=[img], plan=torch.tensor([[28, 28, 0, 0, 1, 1, 0, 1]]), num_tiles=2, tile=28, mean=MEAN, std=STD,
                global_view=True, out_dtype=torch.float32)
    args.update(bad)
    return args


_ROW = [28, 28, 0, 0, 1, 1, 0, 1]
TILE_BAD = [
    dict(images=[torch.zeros(10, 12, 3, dtype=torch.uint8)] * 2, plan=torch.tensor([_ROW, _ROW]), num_tiles=4),
    dict(std=[0.5, 0.0, 0.5]),
    dict(mean=[0.5, 0.5]),
    dict(out_dtype=torch.int32),
    dict(out_dtype=torch.float64),
    dict(tile=70000),
    dict(tile=0),
    dict(num_tiles=-1),
    dict(plan=torch.tensor([_ROW], dtype=torch.int32)),
    dict(plan=torch.tensor([_ROW[:6]])),
    dict(plan=torch.tensor(_ROW)),
    dict(plan=torch.tensor([_ROW, _ROW]).t().contiguous().t()[:1]),
    dict(plan=torch.tensor([[28, 28, 0, 0, 0, 1, 0, 1]])),
    dict(plan=torch.tensor([[28, 28, 0, 0, 2048, 1024, 0, 1]]), num_tiles=2048 * 1024 + 1),
    dict(plan=torch.tensor([[29, 28, 0, 0, 1, 1, 0, 1]])),
    dict(plan=torch.tensor([[28, 28, -1, 0, 1, 1, 0, 1]])),
    dict(plan=torch.tensor([[0, 28, 0, 0, 1, 1, 0, 1]])),
    dict(plan=torch.tensor([[28, 28, 0, 0, 1, 1, 1, 1]])),
    dict(plan=torch.tensor([[28, 28, 0, 0, 1, 1, 2**62, 1]])),
    dict(images=[torch.zeros(10, 12, 3)]),
    dict(images=[torch.zeros(10, 12, dtype=torch.uint8)]),
    dict(images=[torch.zeros(10, 12, 2, dtype=torch.uint8)]),
    dict(images=[torch.zeros(0, 12, 3, dtype=torch.uint8)]),
    dict(images=[], plan=torch.zeros(1, 8, dtype=torch.int64)),
    dict(images=[torch.zeros(10, 12, 3, dtype=torch.uint8)] * 2),
    dict(plan=torch.tensor([[28, 28, 0, 0, 1, 1, 0, 2]])),
    dict(images=[torch.zeros(10, 12, 3, dtype=torch.uint8), torch.zeros(5, 13, 3, dtype=torch.uint8)],
         plan=torch.tensor([[28, 28, 0, 0, 1, 1, 0, 2]])),
    dict(images=[torch.zeros(10, 12, 3, dtype=torch.uint8), torch.zeros(5, 12, 1, dtype=torch.uint8)],
         plan=torch.tensor([[28, 28, 0, 0, 1, 1, 0, 2]])),
]


def _raised(fn):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as e:
        fn()
    return e.type, str(e.value).splitlines()[0]


@pytest.mark.parametrize("bad", TILE_BAD, ids=lambda d: ",".join(d))
def test_tile_checks_match_the_python_copy(bad):
    """The C++ op validates before it hands a forced Python backend over, with the messages of the
    Python copy (which the reference backend and the fake run, also without the extension)."""
    args = _args(**bad)
    want_type, want = _raised(lambda: check_tile_args(*args.values()))
    assert want.startswith("anyres_tile: ")
    assert _raised(lambda: _tile_reference(*args.values())) == (want_type, want)
    backends = ["reference"] + (["cpu"] if registry.availability("anyres_tile", "cpu", "cpu")[0] else [])
    for backend in backends:
        got_type, got = _raised(lambda: OP(*args.values(), backend))
        assert issubclass(got_type, want_type) and got == want, (backend, got, want)


def test_the_fake_runs_the_same_checks():
    """Under FakeTensorMode (torch.compile's tracing) the op's metadata checks still raise."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = _args()
    with FakeTensorMode() as mode:
        images, plan = [mode.from_tensor(im) for im in real["images"]], mode.from_tensor(real["plan"])
        args = {**real, "images": images, "plan": plan}
        assert OP(*args.values(), "auto").shape == (2, 3, 28, 28)
        for bad, match in [(dict(out_dtype=torch.int32), "out_dtype"), (dict(std=[1.0, 0.0, 1.0]), "std must be"),
                           (dict(images=[mode.from_tensor(torch.zeros(10, 12, 2, dtype=torch.uint8))]), "channels")]:
            with pytest.raises((ValueError, TypeError), match=match):
                OP(*{**args, **bad}.values(), "auto")


def test_huge_grid_fails_before_allocating():
    """A grid past the limit would ask for exabytes: the grid check must come first, on every backend."""
    img = torch.zeros(10, 10, 3, dtype=torch.uint8)
    tile = 65536
    for backend in ["reference"] + (["cpu"] if registry.availability("anyres_tile", "cpu", "cpu")[0] else []):
        with pytest.raises(ValueError, match="bad grid"):
            anyres_tile([img], [[tile * 1024, tile * 1025]], tile, MEAN, STD, backend=backend)


# ---- 5. mean / std -------------------------------------------------------------------------------


def test_mean_std_as_arrays_and_tensors():
    img = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    want, _ = anyres_tile([img], PINS, 28, MEAN, STD, backend="reference")
    for mean, std in [(np.array(MEAN), np.array(STD)), (torch.tensor(MEAN), torch.tensor(STD)),
                      (tuple(np.float32(v) for v in MEAN), np.array(STD, dtype=np.float64))]:
        got, _ = anyres_tile([img], PINS, 28, mean, std, backend="reference")
        torch.testing.assert_close(got, want)
    one, _ = anyres_tile([img], PINS, 28, np.array([0.5]), torch.tensor(0.5), backend="reference")
    torch.testing.assert_close(one, anyres_tile([img], PINS, 28, 0.5, 0.5, backend="reference")[0])


@pytest.mark.parametrize("mean, std, exc, match", [
    (None, STD, TypeError, "mean"), (MEAN, None, TypeError, "std"), ("0.5", STD, TypeError, "mean"),
    (MEAN, {"r": 1}, TypeError, "std"), ([0.5, None, 0.5], STD, TypeError, "mean"),
    (np.zeros(2), STD, ValueError, "mean"), (MEAN, [0.5, 0, 0.5], ValueError, "std must be non-zero"),
])
def test_bad_mean_std_name_the_argument(mean, std, exc, match):
    with pytest.raises(exc, match=match):
        anyres_tile([torch.zeros(10, 10, 3, dtype=torch.uint8)], PINS, 28, mean, std, backend="reference")


@pytest.mark.parametrize("backend_cls", ["pil", "torchvision"])
def test_processor_with_a_zero_std_returns_what_hf_returns(backend_cls):
    _cpu_ok()
    proc, _ = _processors("next", backend_cls)
    oracle = type(proc)(**NEXT_KW)
    img = np.random.default_rng(3).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    std = [0.5, 0.0, 0.5]
    got = proc(img, return_tensors="pt", image_std=std)["pixel_values"]
    want = oracle(img, return_tensors="pt", image_std=std)["pixel_values"]
    assert torch.isinf(want).any()
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)


# ---- 6. configurations HF accepts ------------------------------------------------------------------


def test_default_llava_next_processor_is_reported_and_warned():
    """LlavaNextImageProcessor(): 224 tiles of 336-multiple pinpoints (HF resizes the partial tiles
    again). The patch must say so, not report "patched" and fall back on every call."""
    proc = transformers.LlavaNextImageProcessor()
    with pytest.warns(UserWarning, match="not multiples of 224"):
        report = patch(proc, families=["anyres"])
    assert not report.patched and len(report.skipped) == 1
    assert "not multiples of 224" in report.skipped[0].reason and "HF's code" in report.skipped[0].reason
    img = np.random.default_rng(4).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    want = transformers.LlavaNextImageProcessor()(img, return_tensors="pt")
    assert torch.equal(proc(img, return_tensors="pt")["pixel_values"], want["pixel_values"])


# ---- 7. PIL pixels read in place -------------------------------------------------------------------


def test_pil_rgb_is_read_in_place():
    img = _pil(37, 53)
    view = pil_hwc(img)
    assert view.shape == (37, 53, 3) and view.stride() == (4 * 53, 4, 1)  # RGBX, 4th byte skipped
    assert view.untyped_storage().nbytes() == 37 * 53 * 4  # whole pixels: the tilers may read X
    assert torch.equal(view, torch.from_numpy(np.asarray(img)))
    img.putpixel((5, 7), (1, 2, 3))  # a view, not a copy
    assert view[7, 5].tolist() == [1, 2, 3]


def test_pil_view_keeps_the_image_alive():
    img = _pil(64, 48, seed=1)
    want = np.asarray(img).copy()
    view = pil_hwc(img)
    del img
    gc.collect()
    _ = [bytearray(64 * 48 * 4) for _ in range(64)]  # reuse freed memory, if any was freed
    assert torch.equal(view, torch.from_numpy(want))


def test_pil_multiblock_is_viewed_in_one_block_copy():
    """Pillow keeps this image (17 MB of RGBX) in several 16 MiB blocks: it is pasted into a
    one-block image the thread reuses, and viewed there."""
    rng = np.random.default_rng(6)
    imgs = [Image.fromarray(rng.integers(0, 256, (1800, 2400, 3), dtype=np.uint8)) for _ in range(3)]
    views = [pil_hwc(img) for img in imgs]  # alive together (one batch): one copy each
    assert len({v.data_ptr() for v in views}) == 3
    for img, view in zip(imgs, views):
        assert view.stride() == (4 * 2400, 4, 1)
        assert torch.equal(view, torch.from_numpy(np.asarray(img)))
    kept = views[-1].data_ptr()
    del views, view
    assert pil_hwc(imgs[0]).data_ptr() == kept  # no view alive: the thread's copy is reused


def _big_pil(seed):
    """2400x1800 RGB: 17 MB of RGBX, which Pillow keeps in several 16 MiB blocks."""
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (1800, 2400, 3), dtype=np.uint8))
    assert img.__arrow_c_array__ is None or not img.im.isblock()
    return img


def test_pil_multiblock_is_read_in_place_as_row_runs():
    """pil_view reads a several-block image where Pillow keeps it: one strided view per run of
    rows, the runs stacking into the image; no paste, no copy."""
    img = _big_pil(9)
    before = dict(pil_mod.COUNTS)
    view = pil_view(img)
    assert isinstance(view, RowRuns) and len(view.runs) >= 2
    assert pil_mod.COUNTS["runs"] == before.get("runs", 0) + 1
    assert pil_mod.COUNTS["paste"] == before.get("paste", 0) and pil_mod.COUNTS["copy"] == before.get("copy", 0)
    assert view.shape == (1800, 2400, 3) and all(r.stride() == (4 * 2400, 4, 1) for r in view.runs)
    assert torch.equal(view.tensor(), torch.from_numpy(np.asarray(img)))
    # Pillow's own memory: a pixel written through Pillow shows in the run holding its row
    first_of_last = 1800 - view.runs[-1].shape[0]
    img.putpixel((17, first_of_last), (1, 2, 3))
    img.putpixel((2399, 1799), (4, 5, 6))
    assert view.runs[-1][0, 17].tolist() == [1, 2, 3] and view.runs[-1][-1, -1].tolist() == [4, 5, 6]
    want = np.asarray(img).copy()
    del img
    gc.collect()
    _ = [bytearray(1 << 20) for _ in range(64)]  # reuse freed memory, if any was freed
    assert torch.equal(view.tensor(), torch.from_numpy(want))  # the runs keep the image alive


def test_pil_runs_fall_back_to_the_paste_when_the_struct_does_not_check_out(monkeypatch):
    """A row table that does not hold this image's bytes (a layout misread) is caught by the
    self-check and the image is pasted; without Pillow's struct the same."""
    img, other = _big_pil(10), _big_pil(11)
    real = pil_mod._row_pointers
    assert real(img.im, 2400, 1800) is not None
    assert real(img.im, 2401, 1800) is None and real(img.im, 2400, 1799) is None  # fields must match
    assert real(object(), 2400, 1800) is None  # a Pillow core without the Imaging capsule (Pillow < 11)
    for fake in (lambda core, w, h: real(other.im, w, h), lambda core, w, h: None):
        monkeypatch.setattr(pil_mod, "_row_pointers", fake)
        pasted = pil_mod.COUNTS["paste"]
        view = pil_view(img)
        assert isinstance(view, torch.Tensor) and pil_mod.COUNTS["paste"] == pasted + 1
        assert torch.equal(view, torch.from_numpy(np.asarray(img)))
        del view


@pytest.mark.parametrize("cuts", [(37,), (1, 2, 50), (99,)], ids=str)
@pytest.mark.parametrize("h, w", [(100, 28), (300, 40), (100, 37), (23, 300)], ids=str)
def test_row_runs_tile_as_the_image_they_stack_into(h, w, cuts):
    """Every backend reads an image given as row runs (RGBX views in place; mixed layouts joined)
    bit-exactly as the whole image: streamed, vertical-first, vertical-only and copy resizes."""
    g = torch.Generator().manual_seed(h * w)
    rgbx = torch.randint(0, 256, (h, w, 4), dtype=torch.uint8, generator=g)
    whole = rgbx[..., :3]
    bounds = [0, *[c for c in cuts if c < h], h]
    runs = [rgbx[a:b].clone()[..., :3] for a, b in zip(bounds, bounds[1:])]  # separate blocks
    mixed = [r.permute(2, 0, 1).contiguous().permute(1, 2, 0) if i % 2 else r for i, r in enumerate(runs)]
    backends = ["reference"] + (["cpu"] if registry.availability("anyres_tile", "cpu", "cpu")[0] else [])
    for backend in backends:
        want, _ = tile_views([whole, whole[:20]], PINS, 28, MEAN, STD, backend=backend)
        for parts in (runs, mixed):
            got, _ = tile_views([RowRuns(parts), whole[:20]], PINS, 28, MEAN, STD, backend=backend)
            assert torch.equal(got, want), backend


def test_patched_processor_reads_multiblock_pil_without_the_paste():
    _cpu_ok()
    proc, oracle = _processors("next", "pil")
    big = [_big_pil(s) for s in (12, 13)]
    before = dict(pil_mod.COUNTS)
    got = proc(big, return_tensors="pt")
    assert pil_mod.COUNTS["runs"] == before.get("runs", 0) + 2
    assert pil_mod.COUNTS["paste"] == before.get("paste", 0) and pil_mod.COUNTS["copy"] == before.get("copy", 0)
    _assert_same(got, oracle(big, return_tensors="pt"))


@pytest.mark.cuda
def test_row_runs_on_cuda_match_the_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    img = _big_pil(14)
    view = pil_view(img)
    assert isinstance(view, RowRuns)
    want, _ = tile_views([torch.from_numpy(np.asarray(img))], PINS, 28, MEAN, STD, backend="reference")
    got, _ = tile_views([view.to("cuda")], PINS, 28, MEAN, STD, backend="cuda")
    torch.testing.assert_close(got.cpu(), want, atol=0, rtol=0)


def test_pil_other_modes_are_converted_as_hf_does():
    from transformers.image_transforms import convert_to_rgb

    for mode in ("L", "RGBA", "P", "LA", "1", "I;16"):
        img = _pil(9, 11, seed=2).convert(mode)
        assert torch.equal(pil_hwc(img), torch.from_numpy(np.asarray(convert_to_rgb(img, return_numpy=True))))
    rgb = _pil(9, 11, seed=3)
    rgb.info["transparency"] = (1, 2, 3)
    assert torch.equal(pil_hwc(rgb), torch.from_numpy(np.asarray(convert_to_rgb(rgb, return_numpy=True))))


@pytest.mark.parametrize("h, w", [(23, 1), (23, 7), (23, 8), (23, 37), (100, 28), (300, 40), (5, 300)], ids=str)
def test_tiles_of_a_pil_view_equal_those_of_its_copy(h, w):
    """The CPU tiler reads the RGBX view in place (8-pixel shuffles and their tail, and the
    vertical-first and vertical-only resizes of (100, 28) and (300, 40)) bit-exactly."""
    _cpu_ok()
    img = _pil(h, w, seed=w)
    view, copy = pil_hwc(img), torch.from_numpy(np.asarray(img).copy())
    for backend in ("cpu", "reference"):
        got, _ = anyres_tile([view], PINS, 28, MEAN, STD, backend=backend)
        want, _ = anyres_tile([copy], PINS, 28, MEAN, STD, backend=backend)
        assert torch.equal(got, want), backend


def test_patched_processor_on_pil_matches_hf():
    _cpu_ok()
    proc, oracle = _processors("next", "torchvision")
    imgs = [_pil(90, 130, seed=3), _pil(45, 20, seed=4), _pil(4, 70, seed=5)]
    _assert_same(proc(imgs, return_tensors="pt"), oracle(imgs, return_tensors="pt"))
    big = [_pil(1800, 2400, seed=s) for s in (7, 8)]  # several blocks each, one size: one copy each
    _assert_same(proc(big, return_tensors="pt"), oracle(big, return_tensors="pt"))
