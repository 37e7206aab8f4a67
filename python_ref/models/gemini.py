"""Gemini-style native multimodal transformer, as the design document sketches it (not Google's code).

Every modality is tokenized into one sequence ``[image | video | audio | text]``:

- text: token embedding;
- image: patchify conv (``patch x patch``) + learned spatial positions;
- video: the same patchify per frame + spatial + learned temporal embedding;
- audio: stacks of ``audio_stack`` log-mel frames -> Linear;

then a learned modality embedding (``nn.Embedding(8, D)`` as in the sketch) and absolute positions are
added. Each layer is pre-LN self-attention -> cross-modal attention -> FFN (GELU, 4x), with residuals.
Attention is a prefix LM: media tokens see all media tokens, text tokens see all media and earlier
text. Cross-modal attention additionally restricts each token to tokens of *other* modalities (the
sketch calls it with ``(x, x, x)``; restricting it is what makes it cross-modal); a token with no such
key gets zero. A final LayerNorm and an untied LM head give the logits over the whole sequence; the loss
is the next-token loss on the text positions.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .. import components as C
from ..registry import Architecture, register_architecture

MODALITIES = {"text": 0, "image": 1, "video": 2, "audio": 3}

CONFIGS = {
    "tiny": dict(hidden=32, layers=1, heads=2, vocab=128, max_length=256, image_size=28, patch=14,
                 video_frames=2, video_size=28, n_mels=16, audio_frames=8, audio_stack=2),
    "small": dict(hidden=128, layers=2, heads=4, vocab=512, max_length=1024, image_size=56, patch=14,
                  video_frames=4, video_size=28, n_mels=32, audio_frames=32, audio_stack=4),
    # the document's MultimodalTransformer(num_layers=32, hidden_dim=4096, num_heads=32, max_length=32768);
    # vocabulary: a 256k SentencePiece vocabulary (Gemma's); media geometry is this implementation's choice
    "base": dict(hidden=4096, layers=32, heads=32, vocab=256000, max_length=32768, image_size=336, patch=14,
                 video_frames=16, video_size=112, n_mels=128, audio_frames=3000, audio_stack=4),
}


class MaskedAttention(nn.Module):
    """Multi-head attention under a boolean [B, L, L] mask; rows with no allowed key output zero."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # finite fill instead of -inf: an all-masked row then softmaxes to uniform (no NaN) and is zeroed below
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(1))
        o = o.transpose(1, 2).reshape(b, n, d) * allowed.any(-1, keepdim=True).to(x.dtype)
        return self.out(o)


class MultimodalTransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn = MaskedAttention(dim, heads)
        self.cross_modal_attn = MaskedAttention(dim, heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, x, self_mask, cross_mask):
        x = x + self.self_attn(self.norms[0](x), self_mask)
        x = x + self.cross_modal_attn(self.norms[1](x), cross_mask)
        return x + self.ffn(self.norms[2](x))


class MultimodalTokenizer(nn.Module):
    """Raw inputs -> embeddings; each ``tokenize_*`` returns [B, n, D]."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, p = cfg["hidden"], cfg["patch"]
        self.cfg = cfg
        self.text = nn.Embedding(cfg["vocab"], d)
        self.patchify = nn.Conv2d(3, d, kernel_size=p, stride=p)  # shared by image and video frames
        self.image_positions = nn.Parameter(torch.randn(1, (cfg["image_size"] // p) ** 2, d) * 0.02)
        self.video_positions = nn.Parameter(torch.randn(1, 1, (cfg["video_size"] // p) ** 2, d) * 0.02)
        self.video_time = nn.Parameter(torch.randn(1, cfg["video_frames"], 1, d) * 0.02)
        self.audio = nn.Linear(cfg["n_mels"] * cfg["audio_stack"], d)

    def tokenize_text(self, input_ids):
        return self.text(input_ids)

    def tokenize_image(self, image):
        s = self.cfg["image_size"]
        if image.dim() != 4 or tuple(image.shape[1:]) != (3, s, s):
            raise ValueError(f"pixel_values must be [B, 3, {s}, {s}], got {tuple(image.shape)}")
        return self.patchify(image).flatten(2).transpose(1, 2) + self.image_positions

    def tokenize_video(self, video):
        t, s = self.cfg["video_frames"], self.cfg["video_size"]
        if video.dim() != 5 or tuple(video.shape[1:]) != (t, 3, s, s):
            raise ValueError(f"video must be [B, {t}, 3, {s}, {s}], got {tuple(video.shape)}")
        b = video.shape[0]
        frames = self.patchify(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # [B*T, P, D]
        frames = frames.view(b, t, -1, frames.shape[-1]) + self.video_positions + self.video_time
        return frames.flatten(1, 2)

    def tokenize_audio(self, audio):
        m, st = self.cfg["n_mels"], self.cfg["audio_stack"]
        if audio.dim() != 3 or audio.shape[2] != m or audio.shape[1] % st:
            raise ValueError(f"audio must be log-mel [B, frames (multiple of {st}), {m}], got {tuple(audio.shape)}")
        return self.audio(audio.reshape(audio.shape[0], audio.shape[1] // st, st * m))


class Gemini(nn.Module):
    # patterns are fnmatch'ed against parameter names (python_ref.training); the cross-modal attention
    # and the modality embeddings are this design's fusion module
    PARTS = {"vision": ("tokenizer.patchify.", "tokenizer.image_positions", "tokenizer.video_positions",
                        "tokenizer.video_time", "tokenizer.audio."),
             "fusion": ("modality_embeddings.", "layers.*.cross_modal_attn.", "layers.*.norms.1."),
             "llm": ("tokenizer.text.", "position_embeddings.", "layers.*.self_attn.", "layers.*.ffn.",
                     "layers.*.norms.0.", "layers.*.norms.2.", "norm.", "lm_head.")}

    def __init__(self, size: str = "tiny", **cfg_overrides):
        super().__init__()
        cfg = {**CONFIGS[C.check_size(size)], **cfg_overrides}
        self.cfg, self.size = cfg, size
        self.vocab_size, self.image_size = cfg["vocab"], cfg["image_size"]
        d = cfg["hidden"]
        self.tokenizer = MultimodalTokenizer(cfg)
        self.modality_embeddings = nn.Embedding(8, d)
        self.position_embeddings = nn.Embedding(cfg["max_length"], d)
        self.layers = nn.ModuleList(MultimodalTransformerLayer(d, cfg["heads"]) for _ in range(cfg["layers"]))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg["vocab"], bias=False)

    def tokens_per_modality(self) -> dict:
        c = self.cfg
        return {"image": (c["image_size"] // c["patch"]) ** 2,
                "video": c["video_frames"] * (c["video_size"] // c["patch"]) ** 2,
                "audio": c["audio_frames"] // c["audio_stack"]}

    def encode_multimodal(self, input_ids, pixel_values=None, video=None, audio=None):
        """-> (embeddings [B, L, D], modality_ids int64 [L]), media first, text last."""
        parts, mods = [], []
        for name, x, fn in (("image", pixel_values, self.tokenizer.tokenize_image),
                            ("video", video, self.tokenizer.tokenize_video),
                            ("audio", audio, self.tokenizer.tokenize_audio)):
            if x is not None:
                if not x.is_floating_point():
                    raise TypeError(f"{name} input must be floating point, got {x.dtype}")
                if x.shape[0] != input_ids.shape[0]:
                    raise ValueError(f"{name} batch {x.shape[0]} != input_ids batch {input_ids.shape[0]}")
                parts.append(fn(x))
                mods.append(torch.full((parts[-1].shape[1],), MODALITIES[name], dtype=torch.long))
        parts.append(self.tokenizer.tokenize_text(input_ids))
        mods.append(torch.full((input_ids.shape[1],), MODALITIES["text"], dtype=torch.long))
        return torch.cat(parts, dim=1), torch.cat(mods).to(input_ids.device)

    def attention_masks(self, modality_ids, key_valid):
        """Boolean [B, L, L] masks (query, key) for self- and cross-modal attention."""
        n = modality_ids.shape[0]
        pos = torch.arange(n, device=modality_ids.device)
        media = modality_ids != MODALITIES["text"]
        prefix_lm = media[None, :] | (pos[None, :] <= pos[:, None])
        self_mask = prefix_lm[None] & key_valid[:, None, :]
        cross_mask = self_mask & (modality_ids[:, None] != modality_ids[None, :])[None]
        return self_mask, cross_mask

    def forward(self, input_ids, pixel_values=None, video=None, audio=None, attention_mask=None, labels=None):
        C.check_text_inputs(input_ids, self.vocab_size, attention_mask, labels)
        x, modality_ids = self.encode_multimodal(input_ids, pixel_values, video, audio)
        b, n, _ = x.shape
        if n > self.cfg["max_length"]:
            raise ValueError(f"sequence of {n} tokens exceeds max_length {self.cfg['max_length']}")
        n_media = n - input_ids.shape[1]
        pos = torch.arange(n, device=x.device)
        x = x + self.modality_embeddings(modality_ids)[None] + self.position_embeddings(pos)[None]
        text_valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        key_valid = torch.cat([text_valid.new_ones(b, n_media), text_valid], dim=1)
        self_mask, cross_mask = self.attention_masks(modality_ids, key_valid)
        for layer in self.layers:
            x = layer(x, self_mask, cross_mask)
        logits = self.lm_head(self.norm(x))
        full_labels = loss = None
        if labels is not None:
            full_labels = torch.cat([labels.new_full((b, n_media), C.IGNORE_INDEX), labels], dim=1)
            loss = C.causal_lm_loss(logits, full_labels)
        return C.VLMOutput(loss=loss, logits=logits, lm_loss=loss, labels=full_labels,
                           attention_mask=key_valid.long(), extras={"modality_ids": modality_ids})


def build(size: str = "tiny", **overrides) -> Gemini:
    return Gemini(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    cfg = model.cfg if model is not None else CONFIGS[C.check_size(size)]
    gen = C.generator(seed)
    ids = C.random_token_ids(gen, batch_size, C.TEXT_LEN[size], cfg["vocab"])
    return {
        "input_ids": ids,
        "pixel_values": C.random_pixel_values(gen, batch_size, 3, cfg["image_size"], cfg["image_size"]),
        "video": C.random_pixel_values(gen, batch_size, cfg["video_frames"], 3, cfg["video_size"], cfg["video_size"]),
        "audio": C.random_pixel_values(gen, batch_size, cfg["audio_frames"], cfg["n_mels"]),
        "attention_mask": torch.ones_like(ids),
        "labels": C.lm_labels(ids, 2),
    }


register_architecture(Architecture(
    name="gemini", builder=build, inputs=example_inputs, source="document",
    variants=("any subset of image / video / audio with text",),
    description="native multimodal transformer: one sequence [image|video|audio|text] + modality embeddings; "
                "each layer self-attn + cross-modal attn + FFN; prefix-LM loss on text",
))
