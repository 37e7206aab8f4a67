"""python_ref against the published systems: every published-variant claim has its published
dimensions at base (meta device, no memory), and the HF-built systems give the logits of the HF
class they claim to be, so python_ref cannot drift from what ``patch()`` accelerates on real
checkpoints."""

import pytest
import torch

import python_ref
from python_ref import training


pytestmark = pytest.mark.usefixtures("one_thread")


def _base(name, **overrides):
    with torch.device("meta"):
        return python_ref.build(name, "base", **overrides)


# ---------------------------------------------------------------- published dims at base

def test_onevision_base_matches_hf_checkpoint():
    # llava-hf/llava-onevision-qwen2-7b-ov-hf config.json: SigLIP-so400m minus its last layer, read at -1
    cfg = _base("llava_onevision").config
    v = cfg.vision_config
    assert (v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.num_attention_heads) == (26, 1152, 4304, 16)
    assert (v.image_size, v.patch_size, v.vision_use_head) == (384, 14, False)
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")
    assert cfg.vision_aspect_ratio == "anyres_max_9"
    t = cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.vocab_size) == (3584, 28, 4, 152128)
    assert (cfg.image_token_id, cfg.video_token_id) == (151646, 151647)


def test_minigpt4_published_base_is_blip2_vit_qformer_and_linear():
    # Vision-CAIR/MiniGPT-4: LAVIS EVA ViT-g/14 (depth 39 of 40, width 1408) + ln_vision, BLIP-2's
    # Q-Former (32 queries x 768, cross-attention every 2nd layer), llama_proj = Linear(768, 4096)
    m = _base("minigpt4", variant="published")
    v = m.vision_tower.config
    assert type(m.vision_tower).__name__ == "Blip2VisionModel"
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1408, 39, 16, 6144)
    assert (v.image_size, v.patch_size) == (224, 14)
    assert isinstance(m.ln_vision, torch.nn.Identity)  # ln_vision is the tower's post_layernorm
    q = m.qformer.config
    assert (q.hidden_size, q.num_hidden_layers, q.encoder_hidden_size) == (768, 12, 1408)
    assert q.cross_attention_frequency == 2
    assert m.query_tokens.weight.shape == (1, 32, 768)
    assert isinstance(m.projection, torch.nn.Linear)
    assert (m.projection.in_features, m.projection.out_features) == (768, 4096)
    assert m.language_model.config.hidden_size == 4096 and m.language_model.config.num_hidden_layers == 32
    feats = m.get_image_features(torch.empty(1, 3, 224, 224, device="meta"))
    assert feats.shape == (1, 32, 4096)
    # both MiniGPT-4 stages train llama_proj alone: 768 * 4096 + 4096 parameters
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert set(trainable) == {"projection.weight", "projection.bias"} and sum(trainable.values()) == 768 * 4096 + 4096
    # and so do python_ref.training's MiniGPT-4 stages on this variant
    for stage, lr in (("pretrain", 1e-4), ("finetune", 3e-5)):
        groups = training.configure(m, stage=stage)
        assert [(g["name"], g["lr"]) for g in groups] == [("fusion", lr)]
        assert {n for n, p in m.named_parameters() if p.requires_grad} == {"projection.weight", "projection.bias"}


# ---------------------------------------------------------------- parity with the HF classes

def test_minigpt4_published_is_blip2_with_a_llama():
    """MiniGPT-4 as released is BLIP-2's vision side with a Linear into Llama: the same as HF's
    Blip2ForConditionalGeneration with a Llama text model, its 32 image placeholders first."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    model = python_ref.build("minigpt4", "tiny", variant="published")
    vocab = model.language_model.config.vocab_size
    image_token = vocab - 1
    q = model.query_tokens.weight.shape[1]
    config = Blip2Config(vision_config=model.vision_tower.config.to_dict(),
                         qformer_config=model.qformer.config.to_dict(),
                         text_config=model.language_model.config.to_dict(), num_query_tokens=q,
                         image_token_index=image_token)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        hf = Blip2ForConditionalGeneration(config).eval()
    sd = hf.state_dict()
    names = {"vision_model.": "vision_tower.", "language_projection.": "projection.",
             "query_tokens": "query_tokens.weight"}
    renamed = {}
    for k, v in sd.items():
        for old, new in names.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    model.load_state_dict(renamed, strict=True)
    model.eval()
    batch = python_ref.example_inputs("minigpt4", 2, seed=0, model=model)
    ids = batch["input_ids"].masked_fill(batch["input_ids"] == image_token, 3)
    with torch.no_grad():
        ours = model(pixel_values=batch["pixel_values"], input_ids=ids).logits
        hf_ids = torch.cat([torch.full((ids.size(0), q), image_token), ids], dim=1)
        theirs = hf(pixel_values=batch["pixel_values"], input_ids=hf_ids).logits
    torch.testing.assert_close(ours, theirs)


# Each HF-built system and the transformers class it claims to be, with the variants to cover.
HF_SYSTEMS = [
    ("clip", "CLIPModel", {}, {}),
    ("llava_v15", "LlavaForConditionalGeneration", {}, {}),
    ("llava_v15", "LlavaForConditionalGeneration", {"alignment_loss_weight": 0.5}, {}),
    ("llava_next", "LlavaNextForConditionalGeneration", {}, {}),
    ("llava_onevision", "LlavaOnevisionForConditionalGeneration", {}, {"mode": "single"}),
    ("llava_onevision", "LlavaOnevisionForConditionalGeneration", {}, {"mode": "multi"}),
    ("llava_onevision", "LlavaOnevisionForConditionalGeneration", {}, {"mode": "video"}),
    ("blip2", "Blip2ForConditionalGeneration", {"llm": "opt"}, {}),
    ("blip2", "Blip2ForConditionalGeneration", {"llm": "t5"}, {}),
    ("instructblip", "InstructBlipForConditionalGeneration", {"llm": "llama"}, {}),
    ("instructblip", "InstructBlipForConditionalGeneration", {"llm": "t5"}, {}),
]


def _hf_logits(name, out):
    return out.logits_per_image if name == "clip" else out.logits


@pytest.mark.parametrize("name,cls_name,build_kw,input_kw", HF_SYSTEMS,
                         ids=[f"{n}-{'-'.join(map(str, {**b, **i}.values())) or 'default'}"
                              for n, _, b, i in HF_SYSTEMS])
def test_hf_built_system_matches_its_hf_class(name, cls_name, build_kw, input_kw):
    """``build(name, "tiny")`` with the weights of a fresh ``cls(config)`` loaded gives that HF
    model's logits and (for the language models) its loss."""
    import copy

    import transformers

    from python_ref.models import llava_onevision

    hf_cls = getattr(transformers, cls_name)
    model = python_ref.build(name, "tiny", **build_kw)
    assert isinstance(model, hf_cls) and cls_name in python_ref.ARCHITECTURES[name].description
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # other weights than build()'s, so the copy is what makes them agree
        hf = hf_cls(copy.deepcopy(model.config)).eval()
    model.load_state_dict(hf.state_dict(), strict=True)  # same parameter names, nothing extra
    model.eval()
    if name == "llava_onevision":
        batch = llava_onevision.make_inputs(model, 2, seed=0, **input_kw)
    else:
        batch = python_ref.example_inputs(name, 2, seed=0, model=model)
    with torch.no_grad():
        ours = model(**batch)
        theirs = hf(**{k: v for k, v in batch.items() if name != "clip" or k != "labels"})
    torch.testing.assert_close(ours.logits, _hf_logits(name, theirs), rtol=0, atol=0)
    if name != "clip" and not build_kw.get("alignment_loss_weight"):
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)


def test_document_inventions_are_named_as_such():
    """Names that stand for the document's designs say where they differ from the published system,
    and point to the published variant the package builds."""
    arch = python_ref.ARCHITECTURES
    assert "invention" in arch["minigpt5"].description and "variant='published'" in arch["minigpt5"].description
    assert "invention" in arch["leo"].description and "variant='published'" in arch["leo"].description
    assert "projector only" in " ".join(arch["florence_vl"].variants)
    for name in ("minigpt5", "leo", "florence_vl", "dynamic_vision_selector", "minigpt4"):
        assert arch[name].source == "document"
    # the published variants named there build
    assert python_ref.build("leo", "tiny", variant="published").variant == "published"
    assert type(python_ref.build("minigpt4", "tiny", variant="published").vision_tower).__name__ == "Blip2VisionModel"


# ---------------------------------------------------------------- LEO's dynamic tiling

def _internvl_dynamic_preprocess(image, image_size, max_num):
    """InternVL's ``dynamic_preprocess`` (min_num=1, use_thumbnail=True), which LEO's loader calls
    with max_num=6, transcribed on PIL images as the oracle."""
    w, h = image.size
    aspect = w / h
    ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if 1 <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and w * h > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    tw, th = image_size * best[0], image_size * best[1]
    resized = image.resize((tw, th))
    cols = tw // image_size
    tiles = [resized.crop(((i % cols) * image_size, (i // cols) * image_size,
                           (i % cols + 1) * image_size, (i // cols + 1) * image_size))
             for i in range(best[0] * best[1])]
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


@pytest.mark.parametrize("hw", [(28, 84), (28, 400), (300, 310), (100, 37), (57, 57)])
def test_leo_tiles_are_internvl_dynamic_preprocess(hw):
    import numpy as np
    from PIL import Image

    from python_ref.models import leo
    from python_ref.ops.anyres import normalize_u8

    img = torch.randint(0, 256, (3, *hw), generator=torch.Generator().manual_seed(hw[0] * 1000 + hw[1]),
                        dtype=torch.uint8)
    tiles, counts = leo.tile_images([img], 28)
    want = _internvl_dynamic_preprocess(Image.fromarray(img.permute(1, 2, 0).numpy()), 28, leo.MAX_TILES)
    assert counts == [len(want)] and len(want) <= leo.MAX_TILES + 1
    want = torch.stack([torch.from_numpy(np.array(t)).permute(2, 0, 1) for t in want])
    torch.testing.assert_close(tiles, normalize_u8(want, leo.IMAGENET_MEAN, leo.IMAGENET_STD), rtol=0, atol=0)


def test_leo_dynamic_tiles_per_sample_do_not_depend_on_the_batch():
    model = python_ref.build("leo", "tiny", variant="published").eval()
    batch = python_ref.example_inputs("leo", 2, seed=5, model=model)
    counts = batch["num_tiles"]
    assert counts[0] != counts[1]  # a ragged batch
    with torch.no_grad():
        both = model(**batch)
        alone = model(pixel_values=batch["pixel_values"][:counts[0]], input_ids=batch["input_ids"][:1],
                      attention_mask=batch["attention_mask"][:1], labels=batch["labels"][:1], num_tiles=counts[:1])
    n = alone.logits.shape[1]
    torch.testing.assert_close(both.logits[:1, :n], alone.logits)
    assert (both.attention_mask[0, n:] == 0).all() and (both.labels[0, n:] == -100).all()


def test_leo_published_base_tiles():
    # Mozhgan91/LEO: 448-px tiles, up to 6 plus a thumbnail; each tile gives 256 InternViT + 256 SAM tokens
    m = _base("leo", variant="published")
    assert m.tile_size == 448 and m.vision_experts["enc2"].config.image_size == 1024
    from python_ref.ops.anyres import anyres_plan
    from python_ref.models.leo import MAX_TILES
    plan = anyres_plan((448, 448 * 8), None, 448, strategy="internvl", max_tiles=MAX_TILES, use_thumbnail=True)
    assert plan.grid == (1, 6) and plan.num_tiles == 7
    visual, extras = m.encode_images(torch.empty(7 + 1, 3, 448, 448, device="meta"), num_tiles=[7, 1])
    assert [tuple(v.shape) for v in visual] == [(7 * 512, 4096), (512, 4096)] and extras["num_tiles"] == [7, 1]


def test_readme_table_lists_each_recipe():
    """README's architecture table names every system's recipe stages, in training order."""
    import pathlib
    import re

    rows = {}
    for line in (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines():
        m = re.match(r"\| (\w+) \| (?:published|document)", line)
        if m:
            rows[m.group(1)] = line.rsplit(" | ", 1)[-1]
    assert set(rows) == set(python_ref.ARCHITECTURES)
    for name, cell in rows.items():
        assert re.findall(r"`([\w.]+)` \(", cell) == [s.name for s in training.recipe(name)], name


def test_other_published_variant_dims_at_base():
    # InstructBLIP Flan-T5-XL (Salesforce/instructblip-flan-t5-xl): 32 queries x 768 -> Linear -> 2048
    ib = _base("instructblip", llm="t5")
    t = ib.config.text_config
    assert (t.d_model, t.num_layers, t.num_heads, t.d_ff) == (2048, 24, 32, 5120)
    assert ib.query_tokens.shape == (1, 32, 768) and ib.language_projection.weight.shape == (2048, 768)
    assert ib.config.vision_config.num_hidden_layers == 39 and ib.config.qformer_config.vocab_size == 30523
    # Arevalo et al.'s GMU on MiniGPT-4's 1024-wide CLIP features: z = sigmoid(W_z[a;b]), tanh(W_a a), tanh(W_b b)
    gate = _base("minigpt5", gate_variant="gmu").gate
    assert gate.gate.weight.shape == (1024, 2048)
    assert gate.proj_a.weight.shape == gate.proj_b.weight.shape == (1024, 1024)
    # Florence-VL's DBFusion projector (mlp3x_gelu): Linear(in -> 4096) -> GELU -> Linear -> GELU -> Linear, no LN
    proj = _base("florence_vl", fusion_variant="dbfusion").multi_granularity_fusion.proj
    assert [type(m).__name__ for m in proj] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert [m.weight.shape for m in proj if isinstance(m, torch.nn.Linear)] == [
        (4096, 1024 + 1024 + 1152), (4096, 4096), (4096, 4096)]


# ---------------------------------------------------------------- Florence-VL on Florence-2

def test_florence_vl_published_features_are_florence2s():
    """The depth-breadth features are transformers' Florence2Model's: its projected DaViT features, and
    its encoder's outputs at the image positions when the prompt follows the image placeholders."""
    from transformers import Florence2Model

    model = python_ref.build("florence_vl", "tiny", variant="published").eval()
    cfg = model.florence_config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        hf = Florence2Model(cfg).eval()
    ours = {}
    for k, v in hf.state_dict().items():
        if k.startswith("language_model.encoder."):
            ours[k[len("language_model."):]] = v
        elif k.startswith(("vision_tower.", "multi_modal_projector.")):
            ours[k] = v
    ours["encoder.embed_tokens.weight"] = hf.language_model.shared.weight
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.startswith(("language_model.", "multi_granularity_fusion.")) for k in missing)
    batch = python_ref.example_inputs("florence_vl", 2, seed=0, model=model)
    with torch.no_grad():
        feats = model.florence_features(batch["pixel_values"], batch["task_prompt_ids"])
        image = hf.get_image_features(batch["pixel_values"]).pooler_output
        torch.testing.assert_close(feats[0], image, rtol=0, atol=0)
        n = image.shape[1]
        for prompt, feat in zip(batch["task_prompt_ids"], feats[1:]):
            ids = torch.cat([torch.full((n,), cfg.image_token_id), prompt]).expand(2, -1)
            enc = hf(input_ids=ids, pixel_values=batch["pixel_values"]).encoder_last_hidden_state
            torch.testing.assert_close(feat, enc[:, :n])


def test_florence_vl_published_trains_and_has_published_dims():
    model = python_ref.build("florence_vl", "tiny", variant="published")
    batch = python_ref.example_inputs("florence_vl", 2, seed=1, model=model)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.shape[1] == 5 + batch["input_ids"].shape[1]  # 2x2 + 1 tokens
    for part, names in training.parts(model).items():
        params = dict(model.named_parameters())
        assert any(params[n].grad is not None for n in names), part
    with pytest.raises(ValueError, match="task_prompt_ids"):
        model(**{**batch, "task_prompt_ids": batch["task_prompt_ids"][:2]})
    with pytest.raises(TypeError):
        python_ref.build("florence_vl", "tiny", variant="published", fusion_variant="document")
    # Florence-2-large at 768 px: 577 tokens x 1024 per source, 4 sources -> DBFusion into Llama's 4096
    m = _base("florence_vl", variant="published")
    v, t = m.florence_config.vision_config, m.florence_config.text_config
    assert list(v.embed_dim) == [256, 512, 1024, 2048] and list(v.depths) == [1, 1, 9, 1] and v.projection_dim == 1024
    assert (t.d_model, t.encoder_layers, t.vocab_size) == (1024, 12, 51289)
    prompts = [torch.zeros(n, dtype=torch.long, device="meta") for n in (12, 8, 11)]
    feats = m.florence_features(torch.empty(1, 3, 768, 768, device="meta"), prompts)
    assert [tuple(f.shape) for f in feats] == [(1, 577, 1024)] * 4
    proj = m.multi_granularity_fusion.proj
    assert [x.weight.shape for x in proj if isinstance(x, torch.nn.Linear)] == [(4096, 4096)] * 3
