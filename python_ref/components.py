"""Shared parts for every python_ref architecture: size presets, builders for the standard
transformers blocks, the output type, the prefix-LM helper and example-batch helpers.

Sizes:
- ``"tiny"``: CPU tests (forward + backward in about a second): 1-2 layers, hidden 32, vocab 128,
  28-px images with 14-px patches (4 patches + CLS).
- ``"small"``: CPU benches: 2 layers, hidden 64-128, 56-112-px images.
- ``"base"``: the published dimensions (CLIP ViT-L/14-336, SigLIP-so400m/14-384, BLIP-2's EVA ViT-g/14,
  Vicuna-7B, OPT-2.7B, Flan-T5-XL, BLIP-2 Q-Former). Build these on the meta device for shape checks:
  ``with torch.device("meta"): python_ref.build(name, "base")``.

Every architecture builder takes ``seed=0`` (weights drawn under ``torch.random.fork_rng``, so the
caller's RNG is untouched; ``seed=None`` draws from the global RNG) and ``attn_implementation``
(default ``"sdpa"``).

Everything is built from configs with random weights: no network, no checkpoints. Tiny and small
presets set every dropout to 0 so that a seeded forward is deterministic in train mode; base keeps
the published dropout values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.utils import ModelOutput

SIZES = ("tiny", "small", "base")
IGNORE_INDEX = -100  # label value the causal-LM loss skips (HF convention)
DEFAULT_ATTN = "sdpa"  # "eager" also works everywhere; sdpa is what HF picks by default

# ---------------------------------------------------------------------------------------------
# Presets. Every entry is a plain dict of config kwargs, so callers can override any field.
# ---------------------------------------------------------------------------------------------

CLIP_VISION = {
    # 2 layers so that LLaVA's penultimate-layer feature (vision_feature_layer=-2) is a real layer
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=28, patch_size=14, projection_dim=32, attention_dropout=0.0),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  image_size=112, patch_size=14, projection_dim=128, attention_dropout=0.0),
    # openai/clip-vit-large-patch14-336: (336/14)^2 + 1 = 577 tokens x 1024
    "base": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5),
}

SIGLIP_VISION = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 image_size=28, patch_size=14, attention_dropout=0.0),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  image_size=112, patch_size=14, attention_dropout=0.0),
    # google/siglip-so400m-patch14-384: 27x27 = 729 tokens x 1152 (no CLS)
    "base": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                 image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}

# BLIP-2's EVA ViT-g/14 as HF's Blip2VisionModel: LAVIS builds 39 of EVA's 40 blocks (the penultimate
# layer's features) and its ln_vision is the model's post_layernorm in HF's converted checkpoints.
EVA_VISION = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 image_size=28, patch_size=14),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  image_size=112, patch_size=14),
    # Salesforce/blip2-* vision_config (Blip2VisionConfig defaults): 257 tokens x 1408 at 224 px
    "base": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                 image_size=224, patch_size=14),
}

LLAMA = {
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False),
    "small": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False),
    # lmsys/vicuna-7b-v1.5 (Llama-2-7B dims)
    "base": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False),
}

QWEN2 = {
    "tiny": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                 rms_norm_eps=1e-6, tie_word_embeddings=False),
    "small": dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False),
    # Qwen/Qwen2-7B-Instruct (the LLM of llava-onevision-qwen2-7b)
    "base": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False),
}

OPT = {
    "tiny": dict(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=256, word_embed_proj_dim=32, dropout=0.0,
                 attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "small": dict(vocab_size=512, hidden_size=128, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=1024, word_embed_proj_dim=128, dropout=0.0,
                  attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    # facebook/opt-2.7b (the LLM of Salesforce/blip2-opt-2.7b)
    "base": dict(vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                 num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560,
                 dropout=0.1, attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2),
}

T5 = {
    "tiny": dict(vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1,
                 num_heads=2, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "small": dict(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
                  num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    # google/flan-t5-xl (the LLM of Salesforce/blip2-flan-t5-xl)
    "base": dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                 num_heads=32, dropout_rate=0.1, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
}

QFORMER = {
    # cross_attention_frequency 1 so that the single tiny layer has cross-attention
    "tiny": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 vocab_size=128, max_position_embeddings=64, cross_attention_frequency=1,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                  vocab_size=512, max_position_embeddings=256, cross_attention_frequency=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    # Salesforce/blip2-*: BERT-base, cross-attention every 2nd layer
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 vocab_size=30522, max_position_embeddings=512, cross_attention_frequency=2,
                 hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
}
NUM_QUERY_TOKENS = {"tiny": 4, "small": 8, "base": 32}

# Text lengths used by the example batches (prompt + answer tokens).
TEXT_LEN = {"tiny": 7, "small": 32, "base": 64}

PRESETS = {"clip": CLIP_VISION, "siglip": SIGLIP_VISION, "eva": EVA_VISION, "llama": LLAMA, "qwen2": QWEN2,
           "opt": OPT, "t5": T5, "qformer": QFORMER}


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return size


def preset(kind: str, size: str, **overrides) -> dict:
    """A copy of the preset kwargs for ``kind`` (clip, siglip, eva, llama, qwen2, opt, t5, qformer) at ``size``."""
    if kind not in PRESETS:
        raise ValueError(f"kind must be one of {sorted(PRESETS)}, got {kind!r}")
    return {**PRESETS[kind][check_size(size)], **overrides}


# ---------------------------------------------------------------------------------------------
# Config and module builders
# ---------------------------------------------------------------------------------------------

VISION_TOWERS = {"clip": (CLIPVisionConfig, CLIPVisionModel), "siglip": (SiglipVisionConfig, SiglipVisionModel),
                 "eva": (Blip2VisionConfig, Blip2VisionModel)}


def vision_config(size: str = "tiny", kind: str = "clip", **overrides):
    if kind not in VISION_TOWERS:
        raise ValueError(f"vision kind must be one of {sorted(VISION_TOWERS)}, got {kind!r}")
    return VISION_TOWERS[kind][0](**preset(kind, size, **overrides))


def llm_config(size: str = "tiny", kind: str = "llama", **overrides):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "opt": OPTConfig, "t5": T5Config}.get(kind)
    if cls is None:
        raise ValueError(f"LLM kind must be 'llama', 'qwen2', 'opt' or 't5', got {kind!r}")
    return cls(**preset(kind, size, **overrides))


def qformer_config(size: str = "tiny", encoder_hidden_size: Optional[int] = None, **overrides):
    kw = preset("qformer", size, **overrides)
    if encoder_hidden_size is not None:
        kw["encoder_hidden_size"] = encoder_hidden_size
    return Blip2QFormerConfig(**kw)


def _set_attn(config, attn_implementation: Optional[str]):
    config._attn_implementation = attn_implementation or DEFAULT_ATTN
    return config


def build_vision_tower(size: str = "tiny", kind: str = "clip", attn_implementation: Optional[str] = None,
                       **overrides) -> nn.Module:
    """``CLIPVisionModel``, ``SiglipVisionModel`` or (``kind="eva"``) ``Blip2VisionModel`` with random
    weights."""
    cfg = _set_attn(vision_config(size, kind, **overrides), attn_implementation)
    return VISION_TOWERS[kind][1](cfg)


def build_llm(size: str = "tiny", kind: str = "llama", attn_implementation: Optional[str] = None,
              **overrides) -> nn.Module:
    """``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``OPTForCausalLM`` or ``T5ForConditionalGeneration``
    with random weights."""
    cfg = _set_attn(llm_config(size, kind, **overrides), attn_implementation)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "opt": OPTForCausalLM,
           "t5": T5ForConditionalGeneration}[kind]
    return cls(cfg)


def build_qformer(size: str = "tiny", encoder_hidden_size: Optional[int] = None,
                  attn_implementation: Optional[str] = None, **overrides) -> nn.Module:
    """``Blip2QFormerModel`` (its cross-attention K/V take ``encoder_hidden_size`` features)."""
    return Blip2QFormerModel(_set_attn(qformer_config(size, encoder_hidden_size, **overrides),
                                       attn_implementation))


class QueryTokens(nn.Module):
    """The Q-Former's learned queries, [1, num_queries, hidden], normal(0, 0.02) init as in LAVIS."""

    def __init__(self, num_queries: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, num_queries, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.expand(batch_size, -1, -1)


@contextlib.contextmanager
def seeded(seed: Optional[int]):
    """Seed the CPU RNG for weight init without disturbing the caller's RNG state."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def num_patches(vision_cfg) -> int:
    """Patch tokens per image (without CLS) of a CLIP/SigLIP vision config."""
    return (vision_cfg.image_size // vision_cfg.patch_size) ** 2


def select_vision_features(tower: nn.Module, pixel_values: torch.Tensor, layer: int = -2,
                           strategy: str = "default") -> torch.Tensor:
    """Run the vision tower and pick the LLaVA feature: hidden state ``layer`` (LLaVA uses the
    penultimate one), with the CLS token dropped for ``strategy="default"`` (CLIP only; SigLIP
    has no CLS) or kept for ``"full"``."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be floating point, got {pixel_values.dtype}")
    out = tower(pixel_values=pixel_values, output_hidden_states=True)
    feats = out.hidden_states[layer]
    if strategy == "default" and isinstance(tower, CLIPVisionModel):
        feats = feats[:, 1:]
    elif strategy not in ("default", "full"):
        raise ValueError(f"strategy must be 'default' or 'full', got {strategy!r}")
    return feats


# ---------------------------------------------------------------------------------------------
# Output and losses
# ---------------------------------------------------------------------------------------------

@dataclass
class VLMOutput(ModelOutput):
    """HF-style output of every python_ref architecture (index, attribute or key access).

    ``loss``: total training loss when labels are given (LM loss plus any enabled auxiliary loss);
    ``logits``: [B, L, vocab] for language models ([B_img, B_txt] for CLIP);
    ``lm_loss`` / ``aux_loss``: the parts of ``loss``;
    ``image_features``: the visual tokens fed to the LLM (after projection);
    ``labels`` / ``attention_mask``: as seen by the LLM (visual positions included);
    ``extras``: architecture-specific values (router weights, selected indices, ...).
    """

    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    image_features: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    extras: Optional[dict] = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy (position t predicts label t+1), mean over labels != -100, fp32.
    Matches HF ``ForCausalLMLoss``; returns NaN-free 0 when no label is kept."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, L]")
    shift_logits = logits[:, :-1].float().reshape(-1, logits.size(-1))
    shift_labels = labels[:, 1:].reshape(-1)
    kept = (shift_labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / kept.clamp_min(1)


def check_text_inputs(input_ids: torch.Tensor, vocab_size: int, attention_mask=None, labels=None):
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64/int32, got {input_ids.dtype}")
    if input_ids.device.type != "meta" and input_ids.numel() and (
            int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got range "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal input_ids shape {tuple(input_ids.shape)}")


def prefix_visual_tokens(embed: nn.Module, visual_embeds, input_ids: torch.Tensor,
                         attention_mask: Optional[torch.Tensor] = None,
                         labels: Optional[torch.Tensor] = None) -> dict:
    """Prefix-LM inputs: ``[visual ; text]`` embeddings, a mask of ones on the visual positions and
    labels of -100 there. ``embed`` is the LLM's input embedding; ``visual_embeds`` is [B, Nv, H], or
    a list of B [Nv_b, H] tensors when samples carry different numbers of visual tokens (dynamic
    tiling): each row is then ``[visual_b ; text_b]`` right-padded to the longest (mask 0, label -100),
    so with right-padded text a sample's logits do not depend on the rest of the batch."""
    if isinstance(visual_embeds, (list, tuple)):
        if len({v.shape[0] for v in visual_embeds}) > 1:
            return _ragged_prefix(embed, visual_embeds, input_ids, attention_mask, labels)
        visual_embeds = torch.stack(list(visual_embeds))
    if visual_embeds.dim() != 3 or visual_embeds.size(0) != input_ids.size(0):
        raise ValueError(f"visual_embeds must be [B={input_ids.size(0)}, Nv, H], got {tuple(visual_embeds.shape)}")
    text = embed(input_ids)
    if visual_embeds.size(-1) != text.size(-1):
        raise ValueError(f"visual hidden {visual_embeds.size(-1)} != LLM hidden {text.size(-1)}")
    b, nv = visual_embeds.shape[:2]
    inputs_embeds = torch.cat([visual_embeds.to(text.dtype), text], dim=1)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    vis_mask = attention_mask.new_ones(b, nv)
    out = {"inputs_embeds": inputs_embeds, "attention_mask": torch.cat([vis_mask, attention_mask], dim=1)}
    if labels is not None:
        out["labels"] = torch.cat([labels.new_full((b, nv), IGNORE_INDEX), labels], dim=1)
    return out


def _ragged_prefix(embed, visual: list, input_ids, attention_mask, labels) -> dict:
    if len(visual) != input_ids.size(0) or any(v.dim() != 2 for v in visual):
        raise ValueError(f"visual_embeds must be B={input_ids.size(0)} tensors [Nv_b, H], got "
                         f"{[tuple(v.shape) for v in visual]}")
    text = embed(input_ids)
    if any(v.size(-1) != text.size(-1) for v in visual):
        raise ValueError(f"visual hidden sizes {[v.size(-1) for v in visual]} != LLM hidden {text.size(-1)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    t = input_ids.size(1)
    length = max(v.size(0) for v in visual) + t
    rows, masks, labs = [], [], []
    for b, v in enumerate(visual):
        n, tail = v.size(0), length - v.size(0) - t
        rows.append(torch.cat([v.to(text.dtype), text[b], text.new_zeros(tail, text.size(-1))]))
        masks.append(torch.cat([attention_mask.new_ones(n), attention_mask[b], attention_mask.new_zeros(tail)]))
        if labels is not None:
            labs.append(torch.cat([labels.new_full((n,), IGNORE_INDEX), labels[b],
                                   labels.new_full((tail,), IGNORE_INDEX)]))
    out = {"inputs_embeds": torch.stack(rows), "attention_mask": torch.stack(masks)}
    if labels is not None:
        out["labels"] = torch.stack(labs)
    return out


def prefix_lm_forward(llm: nn.Module, visual_embeds, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                      aux_loss: Optional[torch.Tensor] = None, extras: Optional[dict] = None) -> VLMOutput:
    """Run a decoder-only HF LLM on ``[visual ; text]`` and compute the causal LM loss (plus
    ``aux_loss`` when given)."""
    check_text_inputs(input_ids, llm.config.vocab_size, attention_mask, labels)
    merged = prefix_visual_tokens(llm.get_input_embeddings(), visual_embeds, input_ids, attention_mask, labels)
    out = llm(inputs_embeds=merged["inputs_embeds"], attention_mask=merged["attention_mask"])
    lm_loss = causal_lm_loss(out.logits, merged["labels"]) if labels is not None else None
    loss = lm_loss
    if lm_loss is not None and aux_loss is not None:
        loss = lm_loss + aux_loss
    return VLMOutput(loss=loss, logits=out.logits, lm_loss=lm_loss, aux_loss=aux_loss,
                     image_features=visual_embeds, labels=merged.get("labels"),
                     attention_mask=merged["attention_mask"], extras=extras)


# ---------------------------------------------------------------------------------------------
# Example batches
# ---------------------------------------------------------------------------------------------

def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def random_pixel_values(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """Normalized float images (roughly what a CLIP processor emits): N(0, 1), any leading shape."""
    return torch.randn(*shape, generator=gen, dtype=dtype)


def random_uint8_images(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Raw uint8 images [..., C, H, W] in [0, 255]."""
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)


def random_token_ids(gen: torch.Generator, batch_size: int, length: int, vocab_size: int,
                     low: int = 3, exclude: tuple[int, ...] = ()) -> torch.Tensor:
    """Token ids in [low, vocab_size) (ids below ``low`` are pad/bos/eos), avoiding ``exclude``
    (e.g. an image token id) by remapping it to ``low``."""
    if vocab_size <= low + len(exclude) + 1:
        raise ValueError(f"vocab_size {vocab_size} too small for low={low} and exclude={exclude}")
    ids = torch.randint(low, vocab_size, (batch_size, length), generator=gen)
    for tok in exclude:
        ids[ids == tok] = low if low not in exclude else low + 1
    return ids


def lm_labels(input_ids: torch.Tensor, prompt_len: int = 0) -> torch.Tensor:
    """Labels that train on the answer: the first ``prompt_len`` positions are -100."""
    labels = input_ids.clone()
    labels[:, :prompt_len] = IGNORE_INDEX
    return labels


def make_example_batch(batch_size: int = 2, seed: int = 0, *, image_size: int = 28, vocab_size: int = 128,
                       text_len: int = 7, channels: int = 3, num_images: Optional[int] = None,
                       uint8: bool = False, prompt_len: int = 2, image_key: str = "pixel_values",
                       exclude_ids: tuple[int, ...] = ()) -> dict:
    """A seeded batch: ``pixel_values`` [B, C, H, W] (or [B, num_images, C, H, W]) as normalized
    floats, or uint8 when ``uint8``; ``input_ids``, ``attention_mask`` (ones) and ``labels`` (the
    first ``prompt_len`` text positions ignored)."""
    gen = generator(seed)
    shape = (batch_size, channels, image_size, image_size)
    if num_images is not None:
        shape = (batch_size, num_images, channels, image_size, image_size)
    images = random_uint8_images(gen, *shape) if uint8 else random_pixel_values(gen, *shape)
    ids = random_token_ids(gen, batch_size, text_len, vocab_size, exclude=exclude_ids)
    return {image_key: images, "input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": lm_labels(ids, prompt_len)}


def config_of(model: Optional[nn.Module], size: str, default_builder) -> Any:
    """The model whose config example inputs should match: ``model`` or a freshly built default
    (on the meta device, so that it costs nothing)."""
    if model is not None:
        return model
    with torch.device("meta"):
        return default_builder(size)


__all__ = [
    "SIZES", "IGNORE_INDEX", "PRESETS", "NUM_QUERY_TOKENS", "TEXT_LEN", "preset", "check_size",
    "vision_config", "llm_config", "qformer_config", "build_vision_tower", "build_llm", "build_qformer",
    "QueryTokens", "seeded", "freeze", "num_patches", "select_vision_features", "VLMOutput",
    "causal_lm_loss", "check_text_inputs", "prefix_visual_tokens", "prefix_lm_forward", "generator",
    "random_pixel_values", "random_uint8_images", "random_token_ids", "lm_labels", "make_example_batch",
    "config_of",
]
