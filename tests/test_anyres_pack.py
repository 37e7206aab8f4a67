"""anyres_pack: exact parity with HF LLaVA-NeXT / OneVision ``pack_image_features`` (fp32)."""

import types

import pytest
import torch

import vlmkernels  # noqa: F401  (defines torch.ops.vlmkernels.*)
from python_ref.ops import anyres_embed as ref
from tests.helpers import assert_close
from vlmkernels.anyres.pack import anyres_pack, pack_plan, pack_rows

mn = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
mo = pytest.importorskip("transformers.models.llava_onevision.modeling_llava_onevision")

TILE, SIDE = 28, 4  # tiny tower: 28px tiles, 7px patches -> 4x4 tokens per tile
PINS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84], [84, 84], [28, 28]]
# 171x152 and 333x296 needed HF's round(., 7) unpad fix; the rest cover wide/tall/odd slack
SIZES = [[171, 152], [333, 296], [45, 70], [300, 20], [20, 300], [97, 101], [13, 7], [1, 1]]
BACKENDS = ["reference", "triton"]


def _hf_pack(features, sizes, newline, onevision, max_tiles=2, pins=PINS):
    cfg = types.SimpleNamespace(
        image_grid_pinpoints=pins, vision_config=types.SimpleNamespace(image_size=TILE, patch_size=TILE // SIDE)
    )
    self = types.SimpleNamespace(config=cfg)
    n = [mn.image_size_to_num_patches(s, pins, TILE) for s in sizes]
    feats = torch.split(features, n)
    if onevision:
        return mo.LlavaOnevisionModel.pack_image_features(
            self, feats, sizes, image_newline=newline, vision_aspect_ratio=f"anyres_max_{max_tiles}")
    return mn.LlavaNextModel.pack_image_features(self, feats, sizes, "default", image_newline=newline)


def _inputs(sizes, c=7, pins=PINS):
    sizes = torch.tensor(sizes)
    n = sum(mn.image_size_to_num_patches(s, pins, TILE) for s in sizes)
    return torch.randn(n, SIDE * SIDE, c), sizes, torch.randn(c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_llava_next_exact(backend):
    f, sizes, nl = _inputs(SIZES, c=11)
    exp, exp_lens = _hf_pack(f, sizes, nl, onevision=False)
    got = anyres_pack(f, sizes, PINS, TILE, nl, backend=backend)
    assert [g.shape[0] for g in got] == exp_lens.tolist()
    for i, (g, e) in enumerate(zip(got, exp)):
        assert torch.equal(g, e), f"image {i} size {sizes[i].tolist()} differs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_onevision_exact(backend):
    # anyres_max_2 with 4x4-token tiles: every grid of >= 2x2 tiles gets the bilinear downsample
    f, sizes, nl = _inputs(SIZES, c=6)
    exp, exp_lens = _hf_pack(f, sizes, nl, onevision=True, max_tiles=2)
    got = anyres_pack(f, sizes, PINS, TILE, nl, max_area_tiles=2, backend=backend)
    assert [g.shape[0] for g in got] == exp_lens.tolist()
    for i, (g, e) in enumerate(zip(got, exp)):
        if backend == "reference":
            assert torch.equal(g, e), f"image {i} size {sizes[i].tolist()} differs"
        else:
            # Triton follows torch's bilinear formula; operation order/FMA differ by <= 1-2 ulp
            assert_close(g, e, atol=1e-6, rtol=1e-6, msg=f"image {i}")


def test_python_ref_matches_hf():
    f, sizes, nl = _inputs(SIZES, c=5)
    for ov in (False, True):
        exp, _ = _hf_pack(f, sizes, nl, onevision=ov, max_tiles=3)
        got = ref.anyres_pack(f, sizes, PINS, TILE, nl, max_area_tiles=3 if ov else None)
        assert all(torch.equal(g, e) for g, e in zip(got, exp))


def test_unpad_rule_matches_hf_unpad_image():
    # the one unpad rule (pack_plan and python_ref's llava_next/onevision token counts use it)
    from python_ref.models.llava_next import unpadded_grid

    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 2000, (300, 2), generator=g).tolist() + SIZES
    for h, w in sizes:
        for rows, cols in [(4, 8), (8, 4), (8, 8), (12, 4), (4, 12), (27, 54), (81, 27)]:
            grid = torch.arange(rows * cols).reshape(1, rows, cols)
            r0, nr, c0, nc = ref.unpad_hw((h, w), (rows, cols))
            assert torch.equal(grid[:, r0:r0 + nr, c0:c0 + nc], mn.unpad_image(grid, (h, w))), (h, w, rows, cols)
            assert unpadded_grid(h, w, rows, cols) == (nr, nc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_newline_and_single_tile(backend):
    f, sizes, nl = _inputs([[50, 31], [29, 60]], c=3)
    exp, _ = _hf_pack(f, sizes, None, onevision=False)
    got = anyres_pack(f, sizes, PINS, TILE, None, backend=backend)
    assert all(torch.equal(g, e) for g, e in zip(got, exp))
    # OneVision multi-image samples: one (global) tile per image -> [P tokens; newline]
    one = torch.randn(3, SIDE * SIDE, 3)
    got = anyres_pack(one, sizes.tolist() + [[9, 9]], PINS, TILE, nl, tiles_per_image=[1, 1, 1], backend=backend)
    for i in range(3):
        assert torch.equal(got[i], torch.cat([one[i], nl[None]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision(backend):
    f, sizes, nl = _inputs([[171, 152], [45, 70]], c=8)
    f, nl = f.to(torch.bfloat16), nl.to(torch.bfloat16)
    exp, _ = _hf_pack(f, sizes, nl, onevision=False)
    got = anyres_pack(f, sizes, PINS, TILE, nl, backend=backend)
    assert all(torch.equal(g, e) for g, e in zip(got, exp))


def test_backward_matches_hf():
    f, sizes, nl = _inputs([[171, 152], [333, 296]], c=4)
    f1, n1 = f.clone().requires_grad_(), nl.clone().requires_grad_()
    f2, n2 = f.clone().requires_grad_(), nl.clone().requires_grad_()
    w = [torch.randn(e.shape) for e in _hf_pack(f, sizes, nl, onevision=True)[0]]
    exp = _hf_pack(f1, sizes, n1, onevision=True)[0]
    sum((e * wi).sum() for e, wi in zip(exp, w)).backward()
    got = anyres_pack(f2, sizes, PINS, TILE, n2, max_area_tiles=2, backend="reference")
    sum((g * wi).sum() for g, wi in zip(got, w)).backward()
    assert_close(f2.grad, f1.grad)
    assert_close(n2.grad, n1.grad)


def test_opcheck():
    f, sizes, nl = _inputs([[171, 152], [45, 70]], c=3)
    plan, lens = pack_plan(sizes, PINS, TILE, SIDE, max_area_tiles=2)
    torch.library.opcheck(torch.ops.vlmkernels.anyres_pack.default,
                          (f.requires_grad_(), plan, nl.requires_grad_(), sum(lens), "reference"))


def test_plan_row_counts_match_hf_token_counts():
    # rows per image = P + rows*(cols+1): HF's own count for 50 random sizes
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, 400, (50, 2), generator=g)
    f = torch.zeros(sum(mn.image_size_to_num_patches(s, PINS, TILE) for s in sizes), SIDE * SIDE, 1)
    _, exp_lens = _hf_pack(f, sizes, torch.zeros(1), onevision=True, max_tiles=2)
    _, lens = pack_plan(sizes, PINS, TILE, SIDE, max_area_tiles=2)
    assert lens == exp_lens.tolist()


def test_bad_input():
    f, sizes, nl = _inputs([[45, 70]], c=3)
    with pytest.raises(ValueError, match="image sizes must be positive"):
        anyres_pack(f, [[0, 70]], PINS, TILE, nl)
    with pytest.raises(ValueError, match="tiles"):
        anyres_pack(f[:-1], sizes, PINS, TILE, nl)
    with pytest.raises(ValueError, match="square"):
        anyres_pack(torch.randn(f.shape[0], 17, 3), sizes, PINS, TILE, nl)
    with pytest.raises(ValueError, match="newline"):
        anyres_pack(f, sizes, PINS, TILE, torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        anyres_pack(f.to(torch.int32), sizes, PINS, TILE, nl)
    with pytest.raises(TypeError, match="integers"):
        anyres_pack(f, sizes.float(), PINS, TILE, nl)
    with pytest.raises(ValueError, match="grid_pinpoints"):
        anyres_pack(f, sizes, [[14, 28]], TILE, nl)
    with pytest.raises(ValueError, match="tile_size"):
        anyres_pack(f, sizes, PINS, 0, nl)


def test_empty_batch():
    out, lens = pack_rows(torch.randn(0, SIDE * SIDE, 3), torch.zeros(0, 2, dtype=torch.long), PINS, TILE,
                          torch.randn(3))
    assert out.shape == (0, 3) and lens == []


def test_compile_fullgraph_op_with_precomputed_plan():
    f, sizes, nl = _inputs([[171, 152], [45, 70]], c=3)
    plan, lens = pack_plan(sizes, PINS, TILE, SIDE, max_area_tiles=2)
    op = torch.ops.vlmkernels.anyres_pack
    fn = torch.compile(lambda x: op(x, plan, nl, sum(lens), "reference"), fullgraph=True, backend="eager")
    assert torch.equal(fn(f), op(f, plan, nl, sum(lens), "reference"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_hf(dtype):
    f, sizes, nl = _inputs(SIZES, c=160)
    f, nl = f.to(dtype), nl.to(dtype)
    for ov in (False, True):
        exp, exp_lens = _hf_pack(f, sizes, nl, onevision=ov)
        got = anyres_pack(f.cuda(), sizes, PINS, TILE, nl.cuda(), max_area_tiles=2 if ov else None)
        assert [g.shape[0] for g in got] == exp_lens.tolist()
        for g, e in zip(got, exp):
            if ov:  # bilinear rows: rounding order may differ by an ulp
                assert_close(g.cpu(), e, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)
            else:
                assert torch.equal(g.cpu(), e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_rejects_bad_plans(backend):
    f, sizes, nl = _inputs([[171, 152], [45, 70]], c=3)
    plan, lens = pack_plan(sizes, PINS, TILE, SIDE)
    op = torch.ops.vlmkernels.anyres_pack
    assert torch.equal(op(f, plan, nl, sum(lens), backend), torch.cat(anyres_pack(f, sizes, PINS, TILE, nl)))
    for col, delta in [(0, 1), (5, 50), (7, 50), (10, 1), (11, 1)]:
        bad = plan.clone()
        bad[-1, col] += delta
        with pytest.raises(ValueError, match="invalid plan"):
            op(f, bad, nl, sum(lens), backend)
    with pytest.raises(ValueError, match="invalid plan"):
        op(f, plan, nl, sum(lens) + 1, backend)
    with pytest.raises(ValueError, match="invalid plan"):
        op(f, plan, None, sum(lens), backend)  # row counts include newlines
    with pytest.raises(ValueError, match="int64"):
        op(f, plan.int(), nl, sum(lens), backend)
