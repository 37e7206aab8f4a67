"""patch() on python_ref's uint8 tilers (gpt4v's MultiScaleTiler, claude's DocumentTiler): the patched
tilers give the original tiles bit for bit, the tiny models keep their logits, the report lists the
tilers, unpatch restores the original forward."""

import pytest
import torch

import python_ref.registry as refreg
import vlmkernels
from tests.helpers import assert_close
from vlmkernels import registry as kernel_registry

TILER_RULES = {"gpt4v": ("MultiScaleTiler", "python_ref_multiscale_tiler"),
               "claude": ("DocumentTiler", "python_ref_document_tiler")}
_MODELS = {}


def _model(name):
    # one tiny build per module run (the LLM + CLIP build dominates the cost); tests unpatch after use
    if name not in _MODELS:
        model = refreg.build(name, size="tiny").eval()
        _MODELS[name] = (model, refreg.example_inputs(name, batch_size=2, size="tiny", model=model))
    return _MODELS[name]


def _cpu_ok():
    ok, why = kernel_registry.availability("anyres_tile", "cpu", "cpu")
    if not ok:
        pytest.skip(why)


def _mixed_images(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, s, dtype=torch.uint8, generator=g) for s in ((3, 37, 53), (3, 61, 19), (3, 28, 28))]


# "auto" on CPU tensors: the C++ tiler (when built) and the reference patch embedding
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", list(TILER_RULES))
def test_patched_model_keeps_tiles_and_logits(name, backend):
    model, inputs = _model(name)
    cls_name, rule = TILER_RULES[name]
    try:
        with torch.no_grad():
            exp_tiles = model.tiler(inputs["images"])
            exp = model(**inputs).logits
            mixed = _mixed_images(3)
            exp_mixed = model.tiler(mixed)  # a list of differently sized images
            report = vlmkernels.patch(model, families=["anyres"], backend=backend)
            got_tiles = model.tiler(inputs["images"])
            got = model(**inputs).logits
            got_mixed = model.tiler(mixed)
        tilers = [e for e in report.patched if e.cls == cls_name]
        assert [(e.path, e.rule, e.backend) for e in tilers] == [("tiler", rule, backend)], str(report)
        assert torch.equal(got_tiles, exp_tiles)
        assert torch.equal(got_mixed, exp_mixed)
        assert got_tiles.dtype == torch.float32 and got_tiles.shape[1] == model.tiles_per_image
        assert_close(got, exp, atol=2e-5, rtol=2e-5)
    finally:
        vlmkernels.unpatch(model)
    assert "forward" not in model.tiler.__dict__
    with torch.no_grad():
        assert torch.equal(model.tiler(inputs["images"]), exp_tiles)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_tiler_only_patch_is_exact_on_three_scales(backend):
    from python_ref.models.gpt4v import MultiScaleTiler

    if backend == "cpu":
        _cpu_ok()
    tiler = MultiScaleTiler(28, scales=(3, 1, 2))
    images = _mixed_images(4)
    exp = tiler(images)
    report = vlmkernels.patch(tiler, families=["anyres"], backend=backend)
    try:
        assert [e.rule for e in report.patched] == ["python_ref_multiscale_tiler"]
        assert torch.equal(tiler(images), exp)
    finally:
        assert vlmkernels.unpatch(tiler) == 1


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_document_tiler_only_patch_is_exact(backend):
    from python_ref.models.claude import DocumentTiler

    if backend == "cpu":
        _cpu_ok()
    tiler = DocumentTiler(28, grid=(2, 3))
    images = _mixed_images(5)
    exp = tiler(images)
    vlmkernels.patch(tiler, families=["anyres"], backend=backend)
    try:
        assert torch.equal(tiler(images), exp)
    finally:
        vlmkernels.unpatch(tiler)


def test_patched_tiler_keeps_input_errors():
    from python_ref.models.claude import DocumentTiler

    tiler = DocumentTiler(28, grid=(1, 3))
    vlmkernels.patch(tiler, families=["anyres"], backend="reference")
    try:
        with pytest.raises(TypeError, match="uint8"):
            tiler(torch.rand(1, 3, 30, 30))
        with pytest.raises(ValueError, match="empty"):
            tiler([])
    finally:
        vlmkernels.unpatch(tiler)


def test_backend_without_a_tiler_is_skipped_not_faked():
    from python_ref.models.claude import DocumentTiler

    tiler = DocumentTiler(28)
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(tiler, families=["anyres"], backend="triton")
    assert [e.rule for e in report.skipped] == ["python_ref_document_tiler"]
    assert "triton" in report.skipped[0].reason and "forward" not in tiler.__dict__


def test_only_python_ref_classes_match():
    class MultiScaleTiler(torch.nn.Module):  # same name, not python_ref's
        def forward(self, images):
            return images

    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(MultiScaleTiler(), families=["anyres"])
    assert not report.patched and not report.skipped


def test_patched_tiler_compiles_fullgraph():
    from python_ref.models.gpt4v import MultiScaleTiler

    tiler = MultiScaleTiler(28, scales=(1, 2))
    images = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    exp = tiler(images)
    vlmkernels.patch(tiler, families=["anyres"], backend="reference")
    try:
        torch._dynamo.reset()
        got = torch.compile(tiler, fullgraph=True, backend="eager")(images)
        assert torch.equal(got, exp)
    finally:
        vlmkernels.unpatch(tiler)
