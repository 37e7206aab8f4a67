"""patch() on tiny HF LLaVA-NeXT / LLaVA-OneVision models (random weights, offline): logits and
gradients are kept, the report names what was patched, unpatch restores."""

import pytest
import torch

import python_ref.registry
import vlmkernels
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches  # noqa: E402

IMG_TOKEN = 300


def _next_model():
    cfg = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=28, patch_size=7),
        text_config=transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
        image_token_index=IMG_TOKEN, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56], [84, 28]],
    )
    return transformers.LlavaNextForConditionalGeneration(cfg).eval()


def _ov_model():
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, image_size=30, patch_size=7,
                                                      vision_use_head=False),
        text_config=transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
        image_token_index=IMG_TOKEN, video_token_index=301,
        image_grid_pinpoints=[[30 * i, 30 * j] for i in (1, 2, 3) for j in (1, 2, 3)],
        # anyres_max_2 with 4x4-token tiles: big grids take the bilinear downsample branch
        vision_aspect_ratio="anyres_max_2",
    )
    return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()


def _inputs(model, sizes):
    cfg = model.config
    tile = cfg.vision_config.image_size
    sizes = torch.tensor(sizes)
    n = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, tile) for s in sizes]
    pv = torch.randn(len(sizes), max(n), 3, tile, tile)
    with torch.no_grad():
        feats = model.model.get_image_features(pv, sizes).pooler_output
    ids = [torch.tensor([1, 2])]
    for f in feats:
        ids += [torch.full((f.shape[0],), IMG_TOKEN), torch.tensor([3])]
    return dict(input_ids=torch.cat(ids)[None], pixel_values=pv, image_sizes=sizes)


SIZES = [[171, 152], [45, 70], [70, 20]]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_patched_logits_match(kind, backend):
    model = _next_model() if kind == "next" else _ov_model()
    inputs = _inputs(model, SIZES if kind == "next" else [[171, 152], [333, 296], [45, 70]])
    with torch.no_grad():
        exp = model(**inputs).logits
        report = vlmkernels.patch(model, families=["anyres"], backend=backend)
        got = model(**inputs).logits
    emb = "clip_vision_embeddings" if kind == "next" else "siglip_vision_embeddings"
    rules = {e.rule: e.path.replace("vision_model.", "") for e in report.patched}  # 4.x nests the tower
    expected = {f"llava_{kind}_model": "model", emb: "model.vision_tower.embeddings"}
    if kind == "next":  # CLIP's pre-LayerNorm is fused into patch_embed
        expected["clip_pre_layernorm_fused"] = "model.vision_tower.pre_layrnorm"
    assert rules == expected
    assert_close(got, exp, atol=2e-5, rtol=2e-5)
    assert vlmkernels.unpatch(model) == len(expected)
    assert "pack_image_features" not in model.model.__dict__
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, exp)


@pytest.mark.parametrize("kind", ["next", "onevision"])
def test_auto_on_cpu_keeps_hf_code_and_forced_backends_run_ours(kind, monkeypatch):
    """On CPU, HF's pack is faster than ours (bench e2e llava_next 0.97x fwd+bwd): backend="auto" keeps
    HF's code for CPU tensors, a forced backend runs the ops."""
    from vlmkernels.patching import anyres_models

    calls = []
    for name in ("pack_rows", "patch_embed"):
        real = getattr(anyres_models, name)
        monkeypatch.setattr(anyres_models, name, lambda *a, _n=name, _r=real, **k: calls.append(_n) or _r(*a, **k))
    model = _next_model() if kind == "next" else _ov_model()
    inputs = _inputs(model, SIZES)
    with torch.no_grad():
        exp = model(**inputs).logits
        vlmkernels.patch(model, families=["anyres"], backend="auto")
        got = model(**inputs).logits
    assert calls == [] and torch.equal(got, exp)
    vlmkernels.unpatch(model)
    vlmkernels.patch(model, families=["anyres"], backend="reference")
    with torch.no_grad():
        model(**inputs)
    assert set(calls) == {"pack_rows", "patch_embed"}


def test_patched_gradients_match():
    model = _next_model().train()
    inputs = _inputs(model, SIZES)
    params = [model.model.image_newline, model.model.vision_tower.embeddings.patch_embedding.weight,
              model.model.vision_tower.embeddings.class_embedding,
              model.model.vision_tower.embeddings.position_embedding.weight,
              model.model.vision_tower.pre_layrnorm.weight, model.model.vision_tower.pre_layrnorm.bias]

    def grads():
        model.zero_grad()
        model(**inputs).logits.square().mean().backward()
        return [p.grad.clone() for p in params]

    exp = grads()
    vlmkernels.patch(model, families=["anyres"], backend="reference")
    names = ["image_newline", "patch weight", "class", "position", "pre-LN weight", "pre-LN bias"]
    for g, e, name in zip(grads(), exp, names):
        assert_close(g, e, atol=1e-5, rtol=1e-4, msg=name)


def test_onevision_multi_image_sample_keeps_one_tile():
    model = _ov_model()
    sizes = torch.tensor([[45, 70], [70, 45]])
    pv = torch.randn(2, 1, 3, 30, 30)
    with torch.no_grad():
        exp = model.model.get_image_features(pv, sizes, batch_num_images=torch.tensor([2])).pooler_output
        vlmkernels.patch(model, families=["anyres"], backend="reference")
        got = model.model.get_image_features(pv, sizes, batch_num_images=torch.tensor([2])).pooler_output
    assert len(got) == 2
    for g, e in zip(got, exp):
        assert_close(g, e, atol=2e-5, rtol=2e-5)


def test_interpolate_pos_encoding_uses_original():
    model = _next_model()
    tower = model.model.vision_tower
    px = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        exp = tower(px, interpolate_pos_encoding=True).last_hidden_state
        vlmkernels.patch(model, families=["anyres"], backend="reference")
        got = tower(px, interpolate_pos_encoding=True).last_hidden_state
        with pytest.raises(ValueError, match="doesn't match model"):
            tower(px)
    assert torch.equal(got, exp)


def test_compile_fullgraph_patched_embeddings():
    model = _next_model()
    emb = model.model.vision_tower.embeddings
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        exp = model.model.vision_tower.pre_layrnorm(emb(px))
        vlmkernels.patch(model, families=["anyres"], backend="reference")
        # the patched embeddings now carry the tower's pre-LayerNorm too
        got = torch.compile(emb, fullgraph=True, backend="eager")(px)
    assert_close(got, exp, atol=1e-5, rtol=1e-5)


# the anyres rules that patch() must apply to each python_ref architecture: every architecture is
# listed, so a new one fails here until its expected rules are written down
CLIP = {"clip_vision_embeddings"}
PYTHON_REF_RULES = {
    "clip": CLIP, "llava_v1": CLIP, "llava_v15": CLIP,
    "llava_next": {"llava_next_model", "clip_vision_embeddings", "clip_pre_layernorm_fused"},
    "llava_onevision": {"llava_onevision_model", "siglip_vision_embeddings"},
    "blip2": set(), "instructblip": set(),  # BLIP vision embeddings: no anyres rule
    "minigpt4": CLIP, "minigpt5": CLIP, "dynamic_qformer": CLIP, "leo": CLIP,
    "florence_vl": {"clip_vision_embeddings", "siglip_vision_embeddings"},
    "dynamic_vision_selector": CLIP,
    "gemini": set(),  # its own native patch projection
    "gpt4v": {"python_ref_multiscale_tiler", "clip_vision_embeddings"},
    "claude": {"python_ref_document_tiler", "clip_vision_embeddings"},
}


def test_every_python_ref_architecture_is_listed():
    assert set(PYTHON_REF_RULES) == set(python_ref.registry.NAMES)


@pytest.mark.parametrize("name", python_ref.registry.NAMES)
def test_python_ref_models(name):
    registry = python_ref.registry
    model = registry.build(name, size="tiny").eval()
    inputs = registry.example_inputs(name, batch_size=2, size="tiny", model=model)
    expected = PYTHON_REF_RULES[name]
    with torch.no_grad():
        exp = model(**inputs)
        if expected:
            report = vlmkernels.patch(model, families=["anyres"], backend="reference")
        else:
            with pytest.warns(UserWarning, match="nothing was patched"):
                report = vlmkernels.patch(model, families=["anyres"], backend="reference")
        got = model(**inputs)
    assert {e.rule for e in report.patched} == expected and not report.skipped, report
    exp = exp.logits if hasattr(exp, "logits") else exp
    got = got.logits if hasattr(got, "logits") else got
    assert_close(got, exp, atol=2e-5, rtol=2e-5)


def test_joined_features_skip_the_copy_only_when_safe():
    from vlmkernels.patching.anyres_models import _joined

    x = torch.randn(7, 4, 3, requires_grad=True)
    y = torch.nn.functional.linear(x, torch.eye(3))  # a view of a 2-D matmul, as HF's projector gives
    pieces = torch.split(y, [2, 5])
    j = _joined(list(pieces))
    assert torch.equal(j, y) and j.data_ptr() == y.data_ptr()
    (j * torch.arange(3.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(3.0).expand(7, 4, 3))
    r = _joined([pieces[1], pieces[0]])  # reordered: must copy
    assert r.data_ptr() != y.data_ptr() and torch.equal(r, torch.cat([pieces[1], pieces[0]]))
    z = torch.randn(6, 4, 3)
    assert torch.equal(_joined([z[:2], z[3:]]), torch.cat([z[:2], z[3:]]))  # a gap: copy


def test_state_dict_and_deepcopy_survive_patching():
    import copy

    model = _next_model()
    inputs = _inputs(model, [[45, 70]])
    keys = list(model.state_dict())
    with torch.no_grad():
        exp = model(**inputs).logits
        vlmkernels.patch(model, families=["anyres"], backend="reference")
        assert list(model.state_dict()) == keys
        clone = copy.deepcopy(model)
        assert_close(clone(**inputs).logits, exp, atol=2e-5, rtol=2e-5)
        # the clone's patched methods are bound to the clone, not to the original
        assert clone.model.pack_image_features.__self__ is clone.model


def test_pre_layernorm_applied_exactly_once():
    model = _next_model()
    tower = model.model.vision_tower
    torch.nn.init.normal_(tower.pre_layrnorm.weight)
    torch.nn.init.normal_(tower.pre_layrnorm.bias)
    px = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        exp = tower(px, output_hidden_states=True)
        # patching the tower alone (no LLaVA model rule) leaves the LN to HF
        report = vlmkernels.patch(tower, families=["anyres"], backend="reference")
        assert [e.rule for e in report.patched] == ["clip_vision_embeddings"]
        vlmkernels.unpatch(tower)
        vlmkernels.patch(model, families=["anyres"], backend="reference")
        got = tower(px, output_hidden_states=True)
        # hidden_states[0] is the encoder input, i.e. after the pre-LN
        for g, e in zip(got.hidden_states, exp.hidden_states):
            assert_close(g, e, atol=2e-5, rtol=2e-5)
        assert_close(got.last_hidden_state, exp.last_hidden_state, atol=2e-5, rtol=2e-5)
        # interpolate_pos_encoding falls back to HF's embeddings but still applies the LN once
        big = torch.randn(1, 3, 42, 42)
        vlmkernels.unpatch(model)
        exp_big = tower(big, interpolate_pos_encoding=True).last_hidden_state
        vlmkernels.patch(model, families=["anyres"], backend="reference")
        assert_close(tower(big, interpolate_pos_encoding=True).last_hidden_state, exp_big, atol=2e-5, rtol=2e-5)
