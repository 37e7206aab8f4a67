"""anyres_plan against HF transformers (LLaVA grid choice, resize, padding), InternVL and Qwen2-VL."""

import math
import random

import pytest
import torch

from python_ref.ops.anyres import AnyResPlan
from vlmkernels import registry
from vlmkernels.anyres.plan import anyres_plan, anyres_plan_batch

hf_utils = pytest.importorskip("transformers.image_processing_utils")

NEXT_PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_PINS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
ODD_PINS = [[28, 56], [56, 28], [56, 56], [84, 28]]  # tiny-model pinpoints, tile 28


def random_sizes(n, seed):
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 4000), (4000, 1), (9000, 9000), (1, 9000), (9000, 1), (171, 152), (333, 296), (2, 3)]
    while len(sizes) < n:
        kind = rng.random()
        if kind < 0.5:  # uniform up to 9000
            sizes.append((rng.randint(1, 9000), rng.randint(1, 9000)))
        elif kind < 0.8:  # log-uniform: many small images
            sizes.append((int(math.exp(rng.uniform(0, math.log(9000)))), int(math.exp(rng.uniform(0, math.log(9000))))))
        else:  # extreme aspect ratios
            a, b = rng.randint(1, 40), rng.randint(1000, 9000)
            sizes.append((a, b) if rng.random() < 0.5 else (b, a))
    return sizes


def hf_row(h, w, pins, tile):
    best = hf_utils.select_best_resolution((h, w), pins)
    rh, rw = hf_utils.get_patch_output_size(torch.empty(1, h, w), best, input_data_format="channels_first")
    left, rx = divmod(best[1] - rw, 2)
    top, ry = divmod(best[0] - rh, 2)
    return [best[0], best[1], rh, rw, left, top, left + rx, top + ry, best[0] // tile, best[1] // tile]


CASES = [(NEXT_PINS, 336, 1500, 0), (OV_PINS, 384, 1500, 1), (ODD_PINS, 28, 500, 2)]


@pytest.mark.parametrize("pins,tile,n,seed", CASES, ids=["next", "onevision", "tiny"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_batch_plan_matches_hf(pins, tile, n, seed, backend):
    # cpu: the C++ select_best_resolution (csrc/common/anyres_plan.h); reference: the one Python
    # copy (python_ref.ops.anyres), which vlmkernels.anyres.pack and python_ref.ops.anyres_embed import
    if not registry.availability("anyres_plan_llava", backend, "cpu")[0]:
        pytest.skip(registry.availability("anyres_plan_llava", backend, "cpu")[1])
    sizes = random_sizes(n, seed)
    got = anyres_plan_batch(sizes, pins, tile, backend=backend).tolist()
    for (h, w), row in zip(sizes, got):
        assert row == hf_row(h, w, pins, tile), (h, w)


def test_single_plan_matches_hf_and_batch():
    for h, w in random_sizes(300, 7):
        p = anyres_plan((h, w), NEXT_PINS, 336)
        ref = hf_row(h, w, NEXT_PINS, 336)
        assert isinstance(p, AnyResPlan)
        assert [*p.best_hw, *p.resized_hw, *p.padding, *p.grid] == ref
        assert p.num_tiles == ref[8] * ref[9] + 1


def test_plan_matches_hf_num_patches():
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    for h, w in random_sizes(200, 3):
        p = anyres_plan((h, w), NEXT_PINS, 336)
        assert p.num_tiles == image_size_to_num_patches((h, w), NEXT_PINS, 336)


def test_pinpoint_order_breaks_ties():
    # two candidates with the same effective and wasted resolution: the first listed wins, as in HF
    pins = [[672, 336], [336, 672]]
    for h, w in [(100, 100), (500, 500)]:
        assert anyres_plan((h, w), pins, 336).best_hw == tuple(hf_utils.select_best_resolution((h, w), pins))
        got = anyres_plan_batch([(h, w)], pins, 336).tolist()[0][:2]
        assert got == list(hf_utils.select_best_resolution((h, w), pins))


def _internvl_reference(h, w, tile, min_num, max_num, use_thumbnail):
    from transformers.models.phi4_multimodal.image_processing_phi4_multimodal import (
        Phi4MultimodalImageProcessor,
    )

    ratios = sorted(
        {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
         if min_num <= i * j <= max_num},
        key=lambda x: x[0] * x[1],
    )
    cols, rows = Phi4MultimodalImageProcessor.find_closest_aspect_ratio(None, w / h, ratios, w, h, tile)
    return (rows, cols), rows * cols + (1 if use_thumbnail and rows * cols != 1 else 0)


def test_internvl_dynamic_preprocess():
    for h, w in random_sizes(300, 11):
        p = anyres_plan((h, w), None, 448, strategy="internvl", max_tiles=12)
        grid, n = _internvl_reference(h, w, 448, 1, 12, True)
        assert p.grid == grid and p.num_tiles == n, (h, w)
        assert p.best_hw == p.resized_hw == (grid[0] * 448, grid[1] * 448) and p.padding == (0, 0, 0, 0)


def test_qwen2vl_smart_resize():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    for h, w in random_sizes(400, 13):
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError, match="aspect ratio"):
                anyres_plan((h, w), None, 28, strategy="qwen2vl")
            continue
        p = anyres_plan((h, w), None, 28, strategy="qwen2vl", max_pixels=28 * 28 * 1280)
        hb, wb = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert p.resized_hw == (hb, wb) and p.grid == (hb // 28, wb // 28) and p.num_tiles == hb * wb // 784


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (-1, 3), "ab", (1, 2, 3)])
def test_bad_size(size):
    with pytest.raises(ValueError, match="image_size"):
        anyres_plan(size, NEXT_PINS, 336)


def test_bad_args():
    with pytest.raises(ValueError, match="grid_pinpoints"):
        anyres_plan((10, 10), [], 336)
    with pytest.raises(ValueError, match="grid_pinpoints"):
        anyres_plan_batch([(10, 10)], [[336, -1]], 336)
    with pytest.raises(ValueError, match="tile_size"):
        anyres_plan((10, 10), NEXT_PINS, 0)
    with pytest.raises(ValueError, match="strategy"):
        anyres_plan((10, 10), NEXT_PINS, 336, strategy="nope")
    with pytest.raises(ValueError, match="sizes"):
        anyres_plan_batch([(10, 0)], NEXT_PINS, 336)
    with pytest.raises(ValueError, match="sizes"):
        anyres_plan_batch(torch.ones(3), NEXT_PINS, 336)


def test_empty_batch():
    assert anyres_plan_batch([], NEXT_PINS, 336).shape == (0, 10)


def test_opcheck():
    sizes = torch.tensor([[480, 640], [1, 4000], [333, 296]])
    pins = torch.tensor(NEXT_PINS)
    backends = [b for b in ("cpu", "reference") if registry.availability("anyres_plan_llava", b, "cpu")[0]]
    for b in backends:
        torch.library.opcheck(torch.ops.vlmkernels.anyres_plan_llava.default, (sizes, pins, 336, b))
