"""A patched object behaves like the original wherever a user touches it (README, "Patch a model"):
copies (copy, deepcopy, pickle, torch.save) stay patched, run the patched code and unpatch exactly;
what HF serializes (processor JSON, save_pretrained, model config) never sees the patch; unpatch of
anything takes it like patch does."""

import copy
import io
import json
import pickle
import warnings

import numpy as np
import pytest
import torch

import vlmkernels
from vlmkernels.patching import patch_info

transformers = pytest.importorskip("transformers")

PATCH_KEYS = ("_vlmkernels_patch", "__reduce_ex__", "__setstate__", "to_dict")


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda o: pickle.loads(pickle.dumps(o)),
    "torch.save": _torch_roundtrip,
}


def _tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, max_position_embeddings=64))


def _tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=61, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=64))


def _hf(build):
    def make():
        torch.manual_seed(0)
        model = build().eval()
        return model, {"input_ids": torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))}
    return make


def _python_ref(name, **kw):
    def make():
        import python_ref

        torch.manual_seed(0)
        model = python_ref.build(name, "tiny", **kw).eval()
        return model, python_ref.example_inputs(name, model=model)
    return make


# backend "reference" runs our ops on CPU tensors (auto keeps HF's MoE code there)
MODELS = {
    "mixtral": (_hf(_tiny_mixtral), "reference"),
    "qwen3_moe": (_hf(_tiny_qwen3_moe), "reference"),
    "dynamic_qformer": (_python_ref("dynamic_qformer"), "auto"),
    "leo": (_python_ref("leo", top_k=2), "auto"),
    # CLIP tower: the pre-LayerNorm fusion depends on its embeddings being patched
    "llava_next": (_python_ref("llava_next"), "auto"),
}


def _infos(model):
    return {name: patch_info(m) for name, m in model.named_modules() if patch_info(m) is not None}


def _bound(model):
    """name -> (module, its instance forward) for every module with an instance-level forward."""
    return {name: (m, m.__dict__["forward"]) for name, m in model.named_modules() if "forward" in m.__dict__}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("name", list(MODELS))
def test_a_copied_model_stays_patched_and_unpatches_exactly(name, how):
    make, backend = MODELS[name]
    model, inputs = make()
    reference, _ = make()  # the same weights, never patched
    report = vlmkernels.patch(model, backend=backend)
    assert report
    # copy before the first forward: HF hooks installed by a forward do not pickle (patched or not)
    clone = COPIES[how](model)

    assert _infos(clone) == _infos(model) and _infos(clone)
    originals, copies = _bound(model), _bound(clone)
    assert copies.keys() == originals.keys()
    for path, (module, fwd) in copies.items():
        assert fwd.__self__ is module, f"{path}: forward bound to another module"
        assert fwd.__func__.__code__ is originals[path][1].__func__.__code__, f"{path}: not the patched code"
    expected = _run(reference, inputs)
    torch.testing.assert_close(_run(clone, inputs), _run(model, inputs), rtol=0, atol=0)
    torch.testing.assert_close(_run(clone, inputs), expected, rtol=1e-5, atol=1e-5)

    assert vlmkernels.unpatch(clone) == len(report.patched)
    for path, m in clone.named_modules():
        leftover = [k for k in ("forward", "pack_image_features", *PATCH_KEYS) if k in m.__dict__]
        assert not leftover, f"{path}: {leftover} left after unpatch"
    assert torch.equal(_run(clone, inputs), expected), "the unpatched copy must run the original code"
    assert _infos(model), "unpatching the copy unpatched the original"


def test_a_pickled_model_whose_rule_declines_comes_back_unpatched(monkeypatch):
    import vlmkernels.patching.moe as moe_rules
    from vlmkernels.patching import SkipPatch

    model, inputs = MODELS["mixtral"][0]()
    vlmkernels.patch(model, backend="reference")
    data = pickle.dumps(model)

    def unavailable(op, backend, like=None):
        raise SkipPatch(f"backend {backend!r} is not available here")

    monkeypatch.setattr(moe_rules, "require_backend", unavailable)
    loaded = pickle.loads(data)
    assert _infos(loaded) == {}
    assert not any(k in m.__dict__ for m in loaded.modules() for k in ("forward", *PATCH_KEYS))
    torch.testing.assert_close(_run(loaded, inputs), _run(model, inputs), rtol=1e-5, atol=1e-5)


def test_a_patched_models_config_and_save_pretrained_are_the_unpatched_ones(tmp_path):
    model, inputs = MODELS["mixtral"][0]()
    plain, _ = MODELS["mixtral"][0]()
    vlmkernels.patch(model, backend="reference")
    assert model.config.to_dict() == plain.config.to_dict()
    model.save_pretrained(tmp_path / "patched")
    plain.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "patched" / "config.json").read_text()) == \
        json.loads((tmp_path / "plain" / "config.json").read_text())
    reloaded = type(model).from_pretrained(tmp_path / "patched").eval()
    assert _infos(reloaded) == {}
    torch.testing.assert_close(_run(reloaded, inputs), _run(plain, inputs), rtol=0, atol=0)


# ---- image processors ---------------------------------------------------------------------------

def _processor():
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])


IMAGE = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)


def _pixels(proc):
    return proc(IMAGE, return_tensors="pt")["pixel_values"]


def test_a_patched_processor_prints_and_saves_what_the_unpatched_one_does(tmp_path):
    plain, proc = _processor(), _processor()
    assert vlmkernels.patch(proc)
    assert repr(proc) == repr(plain)
    assert proc.to_dict() == plain.to_dict()
    assert proc.to_json_string() == plain.to_json_string()
    proc.save_pretrained(tmp_path / "patched")
    plain.save_pretrained(tmp_path / "plain")
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(p.name for p in (tmp_path / "patched").iterdir()) == files
    for f in files:
        assert (tmp_path / "patched" / f).read_bytes() == (tmp_path / "plain" / f).read_bytes()
    reloaded = type(plain).from_pretrained(tmp_path / "patched")
    assert patch_info(reloaded) is None and reloaded.to_dict() == plain.to_dict()
    assert patch_info(proc) is not None, "serializing must not unpatch"


@pytest.mark.parametrize("how", ["copy", *COPIES])
def test_a_copied_processor_stays_patched_and_unpatches_exactly(how):
    plain, proc = _processor(), _processor()
    vlmkernels.patch(proc)
    clone = (copy.copy if how == "copy" else COPIES[how])(proc)
    assert patch_info(clone) == patch_info(proc)
    assert clone.preprocess.__self__ is clone
    assert clone.preprocess.__func__.__code__ is proc.preprocess.__func__.__code__
    assert torch.equal(_pixels(clone), _pixels(proc))
    assert clone.to_json_string() == plain.to_json_string()
    assert vlmkernels.unpatch(clone) == 1
    assert patch_info(clone) is None and patch_info(proc) is not None
    assert not [k for k in ("preprocess", *PATCH_KEYS) if k in clone.__dict__]
    assert clone.__dict__ == plain.__dict__
    torch.testing.assert_close(_pixels(clone), _pixels(plain))


# ---- unpatch of anything ------------------------------------------------------------------------

@pytest.mark.parametrize("obj", [42, None, "model", torch.nn.Linear(2, 2)])
def test_unpatch_takes_anything_like_patch(obj):
    with pytest.warns(UserWarning, match="nothing was patched"):
        assert vlmkernels.unpatch(obj) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not vlmkernels.patch(obj)
