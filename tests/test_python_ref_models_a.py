"""python_ref architectures, part A: the shared components and the HF-based systems (clip, the
LLaVA family, BLIP-2, InstructBLIP, MiniGPT-4). Tiny models train on CPU; "base" builds on the
meta device with the published dimensions; the document's shapes are asserted."""

import math

import pytest
import torch
import torch.nn.functional as F

import python_ref
from python_ref import components as C
from python_ref.models import llava_next, llava_onevision, llava_v15
from tests.helpers import assert_close

ARCHS = ("clip", "llava_v1", "llava_v15", "llava_next", "llava_onevision", "blip2", "instructblip", "minigpt4")
SOURCES = {"clip": "published", "llava_v1": "document", "llava_v15": "published", "llava_next": "published",
           "llava_onevision": "published", "blip2": "published", "instructblip": "published",
           "minigpt4": "document"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_step(model, batch):
    out = model(**batch)
    out.loss.backward()
    return out


def _expected_logits_shape(name, model, batch):
    if name == "clip":
        return (batch["pixel_values"].size(0), batch["input_ids"].size(0))
    vocab = model.config.text_config.vocab_size if hasattr(model, "config") else \
        model.language_model.config.vocab_size
    if name in ("blip2", "instructblip") and model.config.text_config.is_encoder_decoder:
        return tuple(batch["labels"].shape) + (vocab,)
    length = batch["input_ids"].size(1) + (C.NUM_QUERY_TOKENS["tiny"] if name == "minigpt4" else 0)
    return (batch["input_ids"].size(0), length, vocab)


# ---------------------------------------------------------------- tiny: train on CPU, determinism

@pytest.mark.parametrize("name", ARCHS)
def test_tiny_forward_backward_deterministic(name):
    arch = python_ref.ARCHITECTURES[name]
    assert arch.source == SOURCES[name] and arch.variants and arch.description
    model = python_ref.build(name, "tiny")
    batch = python_ref.example_inputs(name, batch_size=2, seed=3, model=model)
    assert "labels" in batch
    out = _train_step(model, batch)
    assert torch.isfinite(out.loss), out.loss
    assert tuple(out.logits.shape) == _expected_logits_shape(name, model, batch)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the model"
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    # same seed -> same weights, same batch, bitwise-same loss; another seed -> another batch
    again = python_ref.build(name, "tiny")
    batch2 = python_ref.example_inputs(name, batch_size=2, seed=3, model=again)
    for k, v in batch.items():
        assert torch.equal(v, batch2[k]), k
    assert torch.equal(again(**batch2).loss, out.loss)
    other = python_ref.example_inputs(name, batch_size=2, seed=4, model=again)
    assert not torch.equal(other["pixel_values"], batch["pixel_values"])


def test_example_inputs_without_model_match_build():
    for name in ("llava_next", "blip2", "minigpt4", "clip"):
        model = python_ref.build(name, "tiny")
        a = python_ref.example_inputs(name, 1, seed=7)
        b = python_ref.example_inputs(name, 1, seed=7, model=model)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---------------------------------------------------------------- published variants and modes

@pytest.mark.parametrize("name,llm", [("blip2", "t5"), ("instructblip", "t5")])
def test_blip_family_llm_variants(name, llm):
    model = python_ref.build(name, "tiny", llm=llm)
    assert model.config.text_config.model_type == llm
    batch = python_ref.example_inputs(name, 2, seed=1, model=model)
    q = model.config.num_query_tokens
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [q, q]
    out = _train_step(model, batch)
    assert torch.isfinite(out.loss)
    assert model.query_tokens.grad is not None and model.language_projection.weight.grad is not None
    if name == "instructblip":  # the instruction changes the visual tokens
        feats = []
        for seed in (0, 1):
            qids = torch.randint(1, model.config.qformer_config.vocab_size, batch["qformer_input_ids"].shape,
                                 generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                feats.append(model(**{**batch, "qformer_input_ids": qids}).logits)
        assert not torch.allclose(feats[0], feats[1])


def test_bad_build_overrides_are_rejected():
    with pytest.raises(ValueError, match="llm"):
        python_ref.build("blip2", "tiny", llm="gpt2")
    with pytest.raises(ValueError, match="llm"):
        python_ref.build("instructblip", "tiny", llm="opt")
    for name in ("clip", "llava_v15", "llava_next", "llava_onevision", "blip2", "instructblip"):
        with pytest.raises(TypeError, match="num_query_tokenz|image_token_idx|projection_dimm"):
            python_ref.build(name, "tiny", **{"clip": {"projection_dimm": 3}, "blip2": {"num_query_tokenz": 3},
                                             "instructblip": {"num_query_tokenz": 3}}.get(name, {"image_token_idx": 3}))
    with pytest.raises(TypeError, match="llava_v15"):
        python_ref.build("llava_v1", "tiny", alignment_loss_weight=0.1)
    # a real field passes through to the HF config
    assert python_ref.build("blip2", "tiny", num_query_tokens=3).query_tokens.shape[1] == 3


def test_llava_next_tiles_tokens_and_multi_image():
    model = python_ref.build("llava_next", "tiny")
    cfg = model.config
    # The document: a 2x-tile image -> global view + 2x2 tiles = 5 tiles.
    batch = llava_next.make_inputs(model, 2, seed=0, image_sizes=[(56, 56), (90, 17)])
    assert batch["pixel_values"].shape[1:] == (5, 3, 28, 28)
    assert batch["image_sizes"].tolist() == [[56, 56], [90, 17]]
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert llava_next.image_token_count(cfg, 56, 56) == side * side + (2 * side) ** 2 + 2 * side
    counts = (batch["input_ids"] == cfg.image_token_id).sum(1).tolist()
    assert counts == [llava_next.image_token_count(cfg, 56, 56), llava_next.image_token_count(cfg, 90, 17)]
    _train_step(model, batch)  # HF raises if placeholder and feature counts disagree
    multi = llava_next.make_inputs(model, 2, seed=1, images_per_sample=3)
    assert multi["pixel_values"].size(0) == 6
    assert torch.isfinite(_train_step(model, multi).loss)


@pytest.mark.parametrize("mode", ["single", "multi", "video"])
def test_llava_onevision_modes(mode):
    model = python_ref.build("llava_onevision", "tiny")
    cfg = model.config
    # (168, 168) -> a 6x6 grid whose 12x12 features exceed anyres_max_9 and get shrunk bilinearly
    sizes = {"single": [(168, 168), (30, 160)], "multi": None, "video": None}[mode]
    batch = llava_onevision.make_inputs(model, 2, seed=2, mode=mode, image_sizes=sizes)
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    if mode == "video":
        assert batch["pixel_values_videos"].shape == (2, llava_onevision.NUM_FRAMES, 3, 28, 28)
        expected = [llava_onevision.NUM_FRAMES * math.ceil(side / 2) ** 2 + 1] * 2
        token = cfg.video_token_id
    elif mode == "multi":
        assert batch["pixel_values"].shape[:2] == (4, 1) and batch["batch_num_images"].tolist() == [2, 2]
        expected = [2 * (side * side + 1)] * 2
        token = cfg.image_token_id
    else:
        assert batch["pixel_values"].shape[1] == 37  # global + 6x6
        ratio = math.sqrt(144 / (9 * side * side))
        shrunk = int(12 // ratio)
        assert llava_onevision.image_token_count(cfg, 168, 168) == side * side + shrunk * shrunk + shrunk
        expected = [llava_onevision.image_token_count(cfg, h, w) for h, w in sizes]
        token = cfg.image_token_id
    assert (batch["input_ids"] == token).sum(1).tolist() == expected
    assert torch.isfinite(_train_step(model, batch).loss)


def test_sample_frames_linspace():
    video = torch.arange(40).view(40, 1, 1, 1).expand(40, 3, 2, 2)
    frames = llava_onevision.sample_frames(video)
    idx = frames[:, 0, 0, 0].tolist()
    assert len(idx) == 16 and idx[0] == 0 and idx[-1] == 39
    assert idx == torch.linspace(0, 39, 16).long().tolist()
    with pytest.raises(ValueError, match="video"):
        llava_onevision.sample_frames(video[:, 0])
    with pytest.raises(ValueError, match="mode"):
        llava_onevision.make_inputs(None, mode="audio")


def test_llava_v15_alignment_loss_variant():
    plain = python_ref.build("llava_v15", "tiny")
    model = python_ref.build("llava_v15", "tiny", alignment_loss_weight=0.5)
    assert model.state_dict().keys() == plain.state_dict().keys()
    batch = python_ref.example_inputs("llava_v15", 3, seed=5, model=model)
    out = _train_step(model, batch)
    lm = plain(**batch).loss
    assert_close(out["lm_loss"], lm, atol=1e-6, rtol=1e-6)
    assert out["aux_loss"] > 0
    assert_close(out.loss, lm + out["aux_loss"], atol=1e-6, rtol=1e-6)
    # the alignment loss alone reaches the projector
    model.zero_grad()
    model(**batch)["aux_loss"].backward()
    assert model.model.multi_modal_projector.linear_2.weight.grad.abs().sum() > 0
    # the document's definition, checked on a hand-made case: perfectly aligned -> 0
    e = torch.eye(3, 8, dtype=torch.float64)
    assert float(llava_v15.document_alignment_loss(e, 2 * e)) == 0.0
    assert_close(llava_v15.document_alignment_loss(e, e.roll(1, 0)), torch.tensor(6 / 9.0))


def test_llava_projectors():
    v1 = python_ref.build("llava_v1", "tiny")
    proj = v1.model.multi_modal_projector
    assert [type(m).__name__ for m in proj.children()] == ["Linear"]
    v15 = python_ref.build("llava_v15", "tiny")
    p = v15.model.multi_modal_projector
    x = torch.randn(5, p.linear_1.in_features, dtype=torch.float64)
    p = p.double()
    expected = F.linear(F.gelu(F.linear(x, p.linear_1.weight, p.linear_1.bias), approximate="none"),
                        p.linear_2.weight, p.linear_2.bias)
    assert_close(p(x), expected)  # erf GELU, not tanh


def test_minigpt4_only_projection_trains():
    model = python_ref.build("minigpt4", "tiny")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projection.") for n in trainable)
    batch = python_ref.example_inputs("minigpt4", 2, seed=0, model=model)
    out = _train_step(model, batch)
    assert out.image_features.shape == (2, C.NUM_QUERY_TOKENS["tiny"], model.language_model.config.hidden_size)
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    # visual positions are never trained on
    assert (out.labels[:, :C.NUM_QUERY_TOKENS["tiny"]] == C.IGNORE_INDEX).all()
    published = python_ref.build("minigpt4", "tiny", variant="published", freeze=False)
    assert isinstance(published.projection, torch.nn.Linear)
    assert all(p.requires_grad for p in published.parameters())
    out = _train_step(published, python_ref.example_inputs("minigpt4", 2, seed=0, model=published))
    assert torch.isfinite(out.loss) and published.vision_tower.embeddings.patch_embedding.weight.grad is not None
    with pytest.raises(ValueError, match="variant"):
        python_ref.build("minigpt4", "tiny", variant="mlp")
    with pytest.raises(ValueError, match="pixel_values"):
        model(batch["pixel_values"][0], batch["input_ids"])
    with pytest.raises(TypeError, match="overrides"):
        python_ref.build("minigpt4", "tiny", bogus=1)


def test_clip_contrastive_loss_and_labels():
    model = python_ref.build("clip", "tiny")
    batch = python_ref.example_inputs("clip", 3, seed=0, model=model)
    out = model(**batch)
    logits = out.logits.double()
    t = torch.arange(3)
    expected = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))
    assert_close(out.loss.double(), expected, atol=1e-6, rtol=1e-6)
    assert_close(out.extras["logits_per_text"], out.logits.T)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=batch["pixel_values"])
    img = getattr(img, "pooler_output", img)  # a ModelOutput in transformers >= 5, a tensor before
    assert_close(F.normalize(img, dim=-1), out.extras["image_embeds"], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(model(**{**batch, "labels": None}, return_loss=True).loss)
    assert model(**{**batch, "labels": None}).loss is None
    with pytest.raises(ValueError, match="labels"):
        model(**{**batch, "labels": torch.arange(2)})


# ---------------------------------------------------------------- components

def test_causal_lm_loss_matches_hf_and_prefix_masks():
    llm = C.build_llm("tiny", "llama")
    batch = C.make_example_batch(2, seed=0, vocab_size=llm.config.vocab_size, text_len=9, prompt_len=3)
    hf = llm(input_ids=batch["input_ids"], labels=batch["labels"])
    assert_close(C.causal_lm_loss(hf.logits, batch["labels"]), hf.loss, atol=1e-6, rtol=1e-6)
    visual = torch.randn(2, 4, llm.config.hidden_size)
    merged = C.prefix_visual_tokens(llm.get_input_embeddings(), visual, batch["input_ids"],
                                    batch["attention_mask"], batch["labels"])
    assert merged["inputs_embeds"].shape == (2, 13, llm.config.hidden_size)
    assert torch.equal(merged["inputs_embeds"][:, :4], visual)
    assert (merged["labels"][:, :4] == C.IGNORE_INDEX).all() and torch.equal(merged["labels"][:, 4:], batch["labels"])
    assert merged["attention_mask"].sum().item() == 26
    all_ignored = torch.full((2, 5), C.IGNORE_INDEX)
    assert float(C.causal_lm_loss(torch.randn(2, 5, 7), all_ignored)) == 0.0


def test_component_input_errors():
    llm = C.build_llm("tiny", "llama")
    ids = torch.tensor([[3, 4, 200]])
    with pytest.raises(ValueError, match="input_ids"):
        C.prefix_lm_forward(llm, torch.randn(1, 2, 32), ids)
    with pytest.raises(TypeError, match="input_ids"):
        C.prefix_lm_forward(llm, torch.randn(1, 2, 32), ids.float())
    with pytest.raises(ValueError, match="visual hidden"):
        C.prefix_lm_forward(llm, torch.randn(1, 2, 31), ids.clamp_max(100))
    with pytest.raises(ValueError, match="labels"):
        C.prefix_lm_forward(llm, torch.randn(1, 2, 32), ids.clamp_max(100), labels=torch.zeros(1, 2).long())
    with pytest.raises(ValueError, match="size"):
        python_ref.build("clip", "huge")
    with pytest.raises(ValueError, match="kind"):
        C.build_llm("tiny", "gpt2")


def test_select_vision_features_and_freeze():
    clip = C.build_vision_tower("tiny", "clip")
    siglip = C.build_vision_tower("tiny", "siglip")
    px = C.random_pixel_values(C.generator(0), 2, 3, 28, 28)
    n = C.num_patches(clip.config)
    assert n == 4
    assert C.select_vision_features(clip, px).shape == (2, n, 32)  # penultimate layer, CLS dropped
    assert C.select_vision_features(clip, px, strategy="full").shape == (2, n + 1, 32)
    assert C.select_vision_features(siglip, px, layer=-1).shape == (2, n, 32)  # SigLIP has no CLS
    with pytest.raises(ValueError, match="pixel_values"):
        C.select_vision_features(clip, px[0])
    with pytest.raises(TypeError, match="pixel_values"):
        C.select_vision_features(clip, px.to(torch.uint8))
    with pytest.raises(ValueError, match="strategy"):
        C.select_vision_features(clip, px, strategy="cls")
    assert not any(p.requires_grad for p in C.freeze(clip).parameters())
    with C.seeded(5):
        a = torch.rand(3)
    torch.manual_seed(0)
    with C.seeded(5):
        b = torch.rand(3)
    assert torch.equal(a, b) and not torch.equal(torch.rand(3), b)


def test_make_example_batch_seeded_and_uint8():
    a = C.make_example_batch(2, seed=11, uint8=True, num_images=3, exclude_ids=(5,))
    b = C.make_example_batch(2, seed=11, uint8=True, num_images=3, exclude_ids=(5,))
    assert a["pixel_values"].dtype == torch.uint8 and a["pixel_values"].shape == (2, 3, 3, 28, 28)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (a["input_ids"] == 5).any() and a["input_ids"].min() >= 3
    assert (a["labels"][:, :2] == C.IGNORE_INDEX).all()
    assert C.make_example_batch(1, seed=0)["pixel_values"].dtype == torch.float32


@pytest.mark.slow
def test_small_size_trains():
    for name in ARCHS:
        model = python_ref.build(name, "small")
        out = _train_step(model, python_ref.example_inputs(name, 2, seed=0, size="small", model=model))
        assert torch.isfinite(out.loss), name


# ---------------------------------------------------------------- base: published dims on meta

def _meta(*shape):
    return torch.empty(*shape, device="meta")


def _vision_tokens(tower, image_size):
    """[1, tokens, hidden] out of the patch+position embeddings (the layers keep the shape); the
    embeddings sit under ``.vision_model`` in some transformers versions."""
    return getattr(tower, "vision_model", tower).embeddings(_meta(1, 3, image_size, image_size))


@pytest.fixture(scope="module")
def base_models():
    with torch.device("meta"):
        return {name: python_ref.build(name, "base") for name in ARCHS}


def test_base_builds_on_meta(base_models):
    for name, model in base_models.items():
        assert all(p.device.type == "meta" for p in model.parameters()), name


def test_base_clip_dims(base_models):
    m = base_models["clip"]
    assert _vision_tokens(m, 336).shape == (1, 577, 1024)  # CLIP ViT-L/14-336: 24x24 patches + CLS
    assert m.config.vision_config.num_hidden_layers == 24
    assert m.config.text_config.hidden_size == 768 and m.config.projection_dim == 768


def _llava_tokens(model, image_size):
    return model.model.multi_modal_projector(_vision_tokens(model.model.vision_tower, image_size)[:, 1:])


def test_base_llava_dims(base_models):
    v15 = base_models["llava_v15"]
    assert _llava_tokens(v15, 336).shape == (1, 576, 4096)  # 577 CLIP-L/336 tokens minus CLS -> Vicuna 4096
    assert llava_v15.image_tokens_per_image(v15.config) == 576
    tc = v15.config.text_config
    assert (tc.hidden_size, tc.num_hidden_layers, tc.intermediate_size) == (4096, 32, 11008)
    v1 = base_models["llava_v1"]
    assert _llava_tokens(v1, 224).shape == (1, 256, 4096)  # the document: 256 patches at 224x224
    nxt = base_models["llava_next"]
    assert nxt.config.image_grid_pinpoints == llava_next.BASE_PINPOINTS
    assert llava_next.grid_shape(672, 672, nxt.config.image_grid_pinpoints, 336) == (2, 2)  # + global = 5 tiles
    assert llava_next.image_token_count(nxt.config, 672, 672) == 576 + 48 * 48 + 48 == 2928
    ov = base_models["llava_onevision"]
    assert _vision_tokens(ov.model.vision_tower, 384).shape == (1, 729, 1152)
    assert ov.config.text_config.hidden_size == 3584
    assert llava_onevision.image_token_count(ov.config, 2304, 2304) == 729 + 81 * 81 + 81 == 7371
    assert llava_onevision.multi_image_token_count(ov.config) == 730
    assert llava_onevision.video_token_count(ov.config) == 16 * 14 * 14 + 1


def test_base_qformer_dims(base_models):
    for name, llm_hidden in (("blip2", 2560), ("instructblip", 4096)):
        m = base_models[name]
        assert m.query_tokens.shape == (1, 32, 768)
        qc = m.config.qformer_config
        assert (qc.hidden_size, qc.num_hidden_layers, qc.num_attention_heads) == (768, 12, 12)
        assert _vision_tokens(m.vision_model, 224).shape == (1, 257, 1408)  # EVA ViT-g/14 at 224
        assert m.config.vision_config.num_hidden_layers == 39
        n_cross = sum(hasattr(layer, "crossattention") for layer in m.qformer.encoder.layer)
        assert n_cross == 6
        assert (m.language_projection.in_features, m.language_projection.out_features) == (768, llm_hidden)
    with torch.device("meta"):
        t5 = python_ref.build("blip2", "base", llm="t5")
    assert t5.config.text_config.d_model == 2048 and t5.language_projection.out_features == 2048
    g = base_models["minigpt4"]
    feats = g.get_image_features(_meta(1, 3, 224, 224))
    assert feats.shape == (1, 32, 4096)  # 32 queries, Vicuna-7B hidden
    assert g.qformer.config.hidden_size == 768 and g.qformer.config.encoder_hidden_size == 1024
    assert [m.out_features for m in g.projection if isinstance(m, torch.nn.Linear)] == [2048, 4096]
