"""patch() on HF LLaVA-NeXT / OneVision image processors: same BatchFeature as HF's PIL backend."""

import numpy as np
import pytest
import torch

from helpers import assert_close
from vlmkernels import registry
from vlmkernels.patching import patch, patch_info, unpatch

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

PIL13 = int(PIL.__version__.split(".")[0]) >= 13
NEXT_KW = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
               image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])
OV_KW = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3,
             image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 3) for j in range(1, 4)])


@pytest.fixture(autouse=True)
def _need_cpu_backend():
    ok, why = registry.availability("anyres_tile", "cpu", "cpu")
    if not ok:
        pytest.skip(why)
    if not PIL13:
        pytest.skip("the kernels follow Pillow >= 13's resize pass order (Pillow#9549); older Pillow differs")


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls that took the fused path (a fallback to HF never reaches tile_views)."""
    import vlmkernels.patching.anyres_processors as mod

    calls = []
    real = mod.tile_views

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "tile_views", spy)
    return calls


# transformers < 5.2x cannot infer the channel axis of a 4-channel numpy array (its oracle raises)
NUMPY_RGBA = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (5, 20)


def _images(seed):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (230, 311, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (170, 90, 4), dtype=np.uint8)
    gray = rng.integers(0, 256, (120, 400), dtype=np.uint8)
    return [
        Image.fromarray(rgb),                                        # PIL RGB
        Image.fromarray(rgba, mode="RGBA"),                          # PIL RGBA -> alpha onto white
        Image.fromarray(gray, mode="L"),                             # PIL grayscale
        rng.integers(0, 256, (97, 403, 3), dtype=np.uint8),          # numpy HWC
        torch.from_numpy(rng.integers(0, 256, (3, 301, 150), dtype=np.uint8)),  # torch CHW
    ] + ([rng.integers(0, 256, (60, 70, 4), dtype=np.uint8)] if NUMPY_RGBA else [])  # numpy RGBA


def _check_same(got, want, exact):
    assert set(got.keys()) == set(want.keys())
    assert got["pixel_values"].shape == want["pixel_values"].shape
    assert got["pixel_values"].dtype == want["pixel_values"].dtype == torch.float32
    assert torch.equal(got["image_sizes"], want["image_sizes"])
    d = (got["pixel_values"] - want["pixel_values"]).abs()
    assert float(d.max()) <= 0.03 and float(d.mean()) <= 1e-3, (float(d.max()), float(d.mean()))
    if exact:
        assert_close(got["pixel_values"], want["pixel_values"], atol=0, rtol=0)
    for k in set(got.keys()) - {"pixel_values", "image_sizes"}:
        assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(want[k])), k


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("backend_cls", ["pil", "torchvision"])
def test_patched_matches_hf_pil(family, backend_cls, fast_calls):
    mod = transformers
    base = "LlavaNextImageProcessor" if family == "next" else "LlavaOnevisionImageProcessor"
    kw = NEXT_KW if family == "next" else OV_KW
    proc = getattr(mod, base + ("Pil" if backend_cls == "pil" else ""))(**kw)
    oracle = getattr(mod, base + "Pil")(**kw)
    images = _images(1)
    want = oracle(images=images, return_tensors="pt")
    report = patch(proc)
    assert report.paths() == [""] and patch_info(proc)["rule"] == "hf_image_processor"
    got = proc(images=images, return_tensors="pt")
    assert fast_calls == ["auto"]
    _check_same(got, want, exact=PIL13)
    # the torchvision class's own output has the same layout (values within its 1-2 LSB of PIL)
    unpatch(proc)
    assert patch_info(proc) is None
    if backend_cls == "torchvision":
        own = proc(images=images, return_tensors="pt")
        assert own["pixel_values"].shape == got["pixel_values"].shape
        assert torch.equal(own["image_sizes"], got["image_sizes"])


def test_single_image_and_kwargs_override(fast_calls):
    proc = transformers.LlavaNextImageProcessorPil(**NEXT_KW)
    oracle = transformers.LlavaNextImageProcessorPil(**NEXT_KW)
    img = np.random.default_rng(2).integers(0, 256, (200, 500, 3), dtype=np.uint8)
    patch(proc)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    _check_same(proc(img, return_tensors="pt", image_mean=mean, image_std=std),
                oracle(img, return_tensors="pt", image_mean=mean, image_std=std), exact=PIL13)
    _check_same(proc(img, return_tensors="pt", do_normalize=False),
                oracle(img, return_tensors="pt", do_normalize=False), exact=PIL13)
    _check_same(proc.preprocess([img], return_tensors="pt"), oracle.preprocess([img], return_tensors="pt"),
                exact=PIL13)
    assert len(fast_calls) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(return_tensors=None),
        dict(return_tensors="pt", do_pad=False),
        dict(return_tensors="pt", resample=2),  # bilinear
        dict(return_tensors="pt", do_rescale=False),
    ],
    ids=["no-tensors", "no-pad", "bilinear", "no-rescale"],
)
def test_unsupported_options_fall_back(kwargs, fast_calls):
    proc = transformers.LlavaNextImageProcessorPil(**NEXT_KW)
    oracle = transformers.LlavaNextImageProcessorPil(**NEXT_KW)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)]
    patch(proc)
    got, want = proc(images=images, **kwargs), oracle(images=images, **kwargs)
    assert fast_calls == []
    for k in want:
        a, b = got[k], want[k]
        if isinstance(b, (list, tuple)):
            assert len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
        else:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_onevision_multi_image_sample_falls_back(fast_calls):
    proc = transformers.LlavaOnevisionImageProcessorPil(**OV_KW)
    oracle = transformers.LlavaOnevisionImageProcessorPil(**OV_KW)
    rng = np.random.default_rng(4)
    images = [[rng.integers(0, 256, (80, 60, 3), dtype=np.uint8), rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)]]
    patch(proc)
    got, want = proc(images=images, return_tensors="pt"), oracle(images=images, return_tensors="pt")
    assert fast_calls == []
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert torch.equal(got["batch_num_images"], want["batch_num_images"])


def test_patch_is_idempotent_and_matches_only_processors():
    proc = transformers.LlavaNextImageProcessorPil(**NEXT_KW)
    assert patch(proc).paths() == [""]
    assert patch(proc).paths() == [""]
    assert patch(proc, backend="reference").patched[0].backend == "reference"
    assert unpatch(proc) == 1 and "preprocess" not in proc.__dict__
    other = transformers.CLIPImageProcessor()
    with pytest.warns(UserWarning, match="nothing was patched"):
        assert not patch(other, families=["anyres"])


def test_onevision_nested_single_images_and_reference_backend(fast_calls):
    proc = transformers.LlavaOnevisionImageProcessor(**OV_KW)  # torchvision class
    oracle = transformers.LlavaOnevisionImageProcessorPil(**OV_KW)
    rng = np.random.default_rng(5)
    images = [[rng.integers(0, 256, (80, 130, 3), dtype=np.uint8)], [], [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)]]
    patch(proc, backend="reference")
    got, want = proc(images=images, return_tensors="pt"), oracle(images=images, return_tensors="pt")
    assert fast_calls == ["reference"]
    _check_same(got, want, exact=PIL13)
