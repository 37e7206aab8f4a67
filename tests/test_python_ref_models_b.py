"""python_ref part B architectures (document designs, speculative pipelines): tiny forward + backward on
CPU, determinism, the document's shapes, the variants, and the published dimensions at base (meta)."""

import pytest
import torch

import python_ref
from python_ref import components as C
from python_ref.models.gpt4v import MultiScaleTiler
from python_ref.models.claude import DocumentTiler

NAMES_B = ("minigpt5", "dynamic_qformer", "leo", "florence_vl", "dynamic_vision_selector", "gemini", "gpt4v", "claude")
TEXT = C.TEXT_LEN["tiny"]


def _run(name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = python_ref.build(name, "tiny", **overrides)
    inputs = python_ref.example_inputs(name, batch_size=2, seed=seed, size="tiny", model=model)
    return model, inputs, model(**inputs)


# visual tokens each tiny model puts in front of the text
TINY_VISUAL_TOKENS = {
    "minigpt5": 4,                 # query tokens
    "dynamic_qformer": 4,          # query tokens (over the top-4 of 16 patches)
    "leo": 4,                      # the CLIP expert's 2x2 grid
    "florence_vl": 4,
    "dynamic_vision_selector": 4,
    "gemini": 4 + 2 * 4 + 4,       # image patches + 2 video frames x 4 patches + 8 mel frames / 2
    "gpt4v": (1 + 4) * 4,          # scales (1, 2): 5 tiles x 4 patches
    "claude": (1 + 2) * 4,         # thumbnail + 2x1 tiles, 4 patches each
}


@pytest.mark.parametrize("name", NAMES_B)
def test_tiny_forward_backward_deterministic(name):
    model, inputs, out = _run(name)
    assert set(inputs) >= {"input_ids", "labels"}
    assert out.logits.shape == (2, TINY_VISUAL_TOKENS[name] + TEXT, model.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) > 0.5 * len(grads)
    _, _, again = _run(name)
    assert torch.equal(out.loss.detach(), again.loss.detach()), "same seed, same loss"
    other = python_ref.example_inputs(name, batch_size=2, seed=1, size="tiny", model=model)
    assert not torch.equal(other["input_ids"], inputs["input_ids"]), "the seed must change the batch"


def test_minigpt5_gate_is_in_the_path_and_gmu_variant():
    model, inputs, out = _run("minigpt5")
    out.loss.backward()
    assert model.gate.gate.weight.grad.abs().sum() > 0
    model, _, out = _run("minigpt5", gate_variant="gmu")
    assert model.gate.variant == "gmu" and torch.isfinite(out.loss)


def test_dynamic_qformer_selection_and_predictor_gradient():
    model, inputs, out = _run("dynamic_qformer")
    assert model.num_patches == 16 and model.selector.k == 4
    idx, imp = out.extras["selected_index"], out.extras["importance"]
    assert idx.shape == (2, 4) and imp.shape == (2, 16)
    # the selection is the top-k of the predictor's importance, best first
    assert torch.equal(idx, torch.sort(imp.detach(), dim=1, descending=True, stable=True).indices[:, :4])
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query_predictor.parameters())
    model, _, out = _run("dynamic_qformer", score_scaling=False)  # the document's sketch: no gradient
    out.loss.backward()
    assert all(p.grad is None for p in model.query_predictor.parameters())


def test_leo_router_override_and_top_k():
    model, inputs, out = _run("leo")
    w = out.extras["router_weights"]
    assert model.expert_names == ("high_res", "ocr", "depth", "clip")
    assert w.shape == (2, 4) and torch.allclose(w.sum(-1), torch.ones(2))
    forced = model(**inputs, image_type="ocr").extras["router_weights"]
    assert torch.equal(forced, torch.tensor([[0.0, 1, 0, 0]] * 2))
    mixed = model(**inputs, image_type=torch.tensor([3, -1])).extras["router_weights"]
    assert torch.equal(mixed[0], torch.tensor([0.0, 0, 0, 1])) and torch.allclose(mixed[1], w[1])
    # with one expert forced, the visual tokens are exactly that expert's projection
    feats = model.expert_features(inputs["pixel_values"])
    direct = model.project_to_llm(model.expert_proj[1](feats[1]))
    torch.testing.assert_close(model.encode_images(inputs["pixel_values"], "ocr")[0], direct)
    with pytest.raises(ValueError, match="image_type"):
        model(**inputs, image_type="sonar")
    _, _, out = _run("leo", top_k=2)
    assert ((out.extras["router_weights"] > 0).sum(-1) == 2).all()


def test_leo_published_variant_interleaves_two_adapters():
    model, inputs, out = _run("leo", variant="published")
    assert not hasattr(model, "router")
    counts = inputs["num_tiles"]
    assert sum(counts) == inputs["pixel_values"].shape[0] and out.extras["num_tiles"] == counts
    per_tile = 2 * 4  # 2 encoders x 4 tokens after unshuffle
    assert out.logits.shape[1] == per_tile * max(counts) + TEXT
    visual = out.image_features
    assert [v.shape[0] for v in visual] == [per_tile * n for n in counts]
    px = inputs["pixel_values"]
    e1 = model.vision_experts["enc1"]
    from python_ref.models._doc_parts import patch_tokens, resize_images
    from python_ref.models.leo import pixel_unshuffle_tokens
    a = model.adapters[0](pixel_unshuffle_tokens(patch_tokens(e1, resize_images(px, e1.config.image_size)), 2))
    torch.testing.assert_close(visual[0].view(counts[0], per_tile, -1)[:, 0::2], a[:counts[0]])  # enc 1 at even
    with pytest.raises(ValueError, match="image_type"):
        model(**inputs, image_type="ocr")
    with pytest.raises(ValueError, match="num_tiles"):
        model(**{**inputs, "num_tiles": [counts[0], counts[1] - 1]})
    # without num_tiles every pixel_values row is a one-tile image
    single = model(px[:2], inputs["input_ids"])
    assert single.logits.shape[1] == per_tile + TEXT


def test_florence_vl_variants():
    model, _, out = _run("florence_vl")
    assert any(isinstance(m, torch.nn.LayerNorm) for m in model.multi_granularity_fusion.modules())
    model, _, out2 = _run("florence_vl", fusion_variant="dbfusion")
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.multi_granularity_fusion.modules())
    assert torch.isfinite(out2.loss)


def test_dynamic_vision_selector_top_k():
    _, _, dense = _run("dynamic_vision_selector")
    assert (dense.extras["router_weights"] > 0).all()
    _, _, out = _run("dynamic_vision_selector", top_k=2)
    w = out.extras["router_weights"]
    assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones(2))


def test_gemini_modalities_and_masks():
    model, inputs, out = _run("gemini")
    counts = model.tokens_per_modality()
    assert counts == {"image": 4, "video": 8, "audio": 4}
    mods = out.extras["modality_ids"]
    assert mods.tolist() == [1] * 4 + [2] * 8 + [3] * 4 + [0] * TEXT
    self_mask, cross_mask = model.attention_masks(mods, torch.ones(1, mods.numel(), dtype=torch.bool))
    assert not cross_mask[0, 0, :4].any() and cross_mask[0, 0, 4:16].all()  # image sees other media only
    assert not self_mask[0, 16, 17]  # text is causal
    # text only: cross-modal attention has no keys at all and must stay finite
    text_only = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
    out = model(**text_only)
    assert out.logits.shape[1] == TEXT and torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="video"):
        model(**{**inputs, "video": inputs["video"][:, :1]})


@pytest.mark.parametrize("hw", [(37, 53), (53, 37)])
def test_gpt4v_tiler_is_aspect_preserving(hw):
    tiler = MultiScaleTiler(28, (1, 2))
    img = torch.full((3, *hw), 255, dtype=torch.uint8)
    tiles = tiler(img.unsqueeze(0))
    assert tiles.shape == (1, 5, 3, 28, 28)
    pad = (0 - torch.tensor(tiler.mean)) / torch.tensor(tiler.std)
    white = (1 - torch.tensor(tiler.mean)) / torch.tensor(tiler.std)
    # scale 1: a 37x53 image fits as 28 wide x 20 high (or the transpose), centered, zero-padded
    g = tiles[0, 0]
    edge = g[:, 0, 14] if hw[0] < hw[1] else g[:, 14, 0]
    torch.testing.assert_close(edge, pad, atol=1e-6, rtol=0)
    torch.testing.assert_close(g[:, 14, 14], white, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        tiler(torch.rand(1, 3, *hw))


def test_claude_document_tiles():
    tiler = DocumentTiler(28, (2, 1))
    tiles = tiler(torch.randint(0, 256, (2, 3, 61, 40), dtype=torch.uint8))
    assert tiles.shape == (2, 3, 3, 28, 28)


def _meta(name, **kw):
    with torch.device("meta"):
        return python_ref.build(name, "base", **kw)


def test_base_dimensions_on_meta():
    m = _meta("minigpt5")
    v = m.visual_encoder.config
    assert (v.hidden_size, (v.image_size // v.patch_size) ** 2 + 1) == (1024, 257)
    assert (m.q_former.config.hidden_size, m.q_former.config.num_hidden_layers, m.num_query_tokens) == (768, 12, 32)
    assert m.llm_hidden == 4096 and m.projection.weight.shape == (4096, 768)

    m = _meta("dynamic_qformer")
    assert (m.num_patches, m.selector.k, m.vision_tower.config.hidden_size) == (576, 32, 1024)
    assert m.query_predictor[0].weight.shape == (128, 1024)

    m = _meta("leo")
    grids = [e.config.image_size // e.config.patch_size for e in m.vision_experts.values()]
    assert grids == [48, 28, 24, 24] and m.grid == 24  # fused to 576 tokens
    assert m.router.num_experts == 4 and m.router.in_dim == 4 * 1024
    m = _meta("leo", variant="published")
    assert [a[0].normalized_shape[0] for a in m.adapters] == [4096, 4096]  # 256 tokens x 4096 each
    assert m.adapters[0][1].weight.shape == (4096, 4096)

    m = _meta("florence_vl")
    assert m.multi_granularity_fusion.dims == (1024, 1024, 1152) and m.grid == 24
    assert m.multi_granularity_fusion.proj[-1].weight.shape == (4096, 1024)

    m = _meta("dynamic_vision_selector")
    assert m.proj.weight.shape == (4096, 512) and m.router.mlp[0].weight.shape == (256, 512)

    m = _meta("gemini")
    assert (m.cfg["layers"], m.cfg["hidden"], m.cfg["heads"], m.cfg["max_length"]) == (32, 4096, 32, 32768)
    assert len(m.layers) == 32 and m.position_embeddings.weight.shape == (32768, 4096)

    m = _meta("gpt4v")
    assert m.tiles_per_image == 5 and m.vision_tower.config.image_size == 336
    m = _meta("claude")
    assert m.tiles_per_image == 5 and m.llm_hidden == 4096


def test_bad_inputs_get_clear_errors():
    model, inputs, _ = _run("minigpt5")
    with pytest.raises(TypeError, match="floating"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].to(torch.uint8)})
    with pytest.raises(ValueError, match="pixel_values"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][0]})
    with pytest.raises(ValueError, match="input_ids"):
        model(**{**inputs, "input_ids": inputs["input_ids"] + model.vocab_size})
    with pytest.raises(ValueError, match="labels"):
        model(**{**inputs, "labels": inputs["labels"][:, :3]})
    model, inputs, _ = _run("claude")
    with pytest.raises(TypeError, match="uint8"):
        model(**{**inputs, "images": inputs["images"].float()})
