"""Patch rules for HF LLaVA-NeXT / LLaVA-OneVision models (the AnyRes family).

- ``LlavaNextModel`` / ``LlavaOnevisionModel``: ``pack_image_features`` becomes one
  ``anyres_pack`` launch (same signature, same ``(list of [n_i, C], feature_lens)`` return).
  Rules sit on the ``*Model`` (not the ``*ForConditionalGeneration`` wrapper, whose OneVision
  ``pack_image_features`` is broken in transformers 5.x) and are found by ``patch(model)`` from any
  parent.
- ``CLIPVisionEmbeddings`` / ``SiglipVisionEmbeddings`` (the vision towers of both): ``forward``
  becomes one ``patch_embed`` (conv GEMM + bias + class token + positions).
- CLIP's ``pre_layrnorm`` is fused into that ``patch_embed`` when the LLaVA model rule can see
  that the tower applies it right after the embeddings: the model rule marks the pair, the
  LayerNorm becomes the identity, and the embeddings apply it only while that identity is in
  place (so the LN runs exactly once whatever else is patched; the encoder input and every
  captured hidden state are unchanged).

Calls with ``interpolate_pos_encoding=True`` go to the original forward, and so do calls on CPU
tensors with ``backend="auto"`` (:func:`.core.keeps_hf_code`: HF's pack is faster there, the
embeddings no slower); a forced backend always runs the ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..anyres.embed import patch_embed
from ..anyres.pack import pack_rows
from .core import PatchRule, SkipPatch, keeps_hf_code, patch_info, register_rule, require_backend

FAMILY = "anyres"


def _is(obj, *class_names: str) -> bool:
    # match by class name along the MRO so that transformers is never imported here
    return any(k.__name__ in class_names for k in type(obj).__mro__)


# ---- pack_image_features --------------------------------------------------------------------------

def _pack_config(model):
    cfg = getattr(model, "config", None)
    vc = getattr(cfg, "vision_config", None)
    pins = getattr(cfg, "image_grid_pinpoints", None)
    if vc is None or not pins:
        raise SkipPatch("config has no vision_config / image_grid_pinpoints")
    tile, p = int(vc.image_size), int(vc.patch_size)
    return [list(map(int, q)) for q in pins], tile, tile // p


def _joined(feats):
    """The [sum_tiles, P, C] tensor behind HF's per-image ``torch.split``: a view (no copy) when
    the pieces are consecutive contiguous slices of one storage, built on their common autograd
    base so gradients reach every piece's source; otherwise ``torch.cat``."""
    f0 = feats[0]
    if len(feats) == 1:
        return f0
    if f0.dim() != 3 or f0.shape[0] == 0:
        return torch.cat(feats, dim=0)
    root = f0._base if f0._base is not None else f0
    ptr, step = f0.data_ptr(), f0[0].numel() * f0.element_size()
    for f in feats:
        same = f.dim() == 3 and f.shape[1:] == f0.shape[1:] and f.dtype == f0.dtype and f.is_contiguous()
        if not same or (f._base if f._base is not None else f) is not root or f.data_ptr() != ptr:
            return torch.cat(feats, dim=0)
        ptr += f.shape[0] * step
    p, c = f0.shape[1:]
    total = sum(f.shape[0] for f in feats)
    return root.as_strided((total, p, c), (p * c, c, 1), f0.storage_offset())


def _packed(conf, image_features, image_sizes, image_newline, max_area_tiles, backend):
    pins, tile, side = conf
    feats = list(image_features)
    features = _joined(feats)
    if features.dim() != 3 or features.shape[1] != side * side:
        raise ValueError(
            f"image features of shape {tuple(features.shape)} do not have {side}x{side} tokens per tile "
            "(a vision encoder with a CLS token needs vision_feature_select_strategy='default')"
        )
    rows, lens = pack_rows(features, image_sizes, pins, tile, image_newline, max_area_tiles=max_area_tiles,
                           tiles_per_image=[f.shape[0] for f in feats], backend=backend)
    feature_lens = torch.tensor(lens, dtype=torch.long, device=features.device)
    return list(torch.split(rows, lens, dim=0)), feature_lens


_PRE_LN_RULE = "clip_pre_layernorm_fused"


def _mark_pre_layernorm(model) -> None:
    """Pair a CLIP tower's embeddings with its ``pre_layrnorm`` for fusion, when the tower's forward
    applies the LN directly to the embeddings' output (checked on the class source)."""
    import inspect

    tower = getattr(model, "vision_tower", None)
    for holder in (tower, getattr(tower, "vision_model", None)):
        emb, ln = getattr(holder, "embeddings", None), getattr(holder, "pre_layrnorm", None)
        if emb is None or not isinstance(ln, torch.nn.LayerNorm) or not _is(emb, "CLIPVisionEmbeddings"):
            continue
        try:
            src = inspect.getsource(type(holder).forward)
        except (OSError, TypeError):
            return
        if src.count("self.pre_layrnorm(") == 1 and "hidden_states = self.pre_layrnorm(hidden_states)" in src:
            emb.__dict__["_vlmk_pre_ln"] = ln  # plain attribute: not a submodule, state_dict untouched
            ln.__dict__["_vlmk_fused_into"] = emb
        return


def _build_llava_next(model, backend):
    require_backend("anyres_pack", backend, next(model.parameters(), None))
    conf = _pack_config(model)
    _mark_pre_layernorm(model)

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        if keeps_hf_code(backend, self.image_newline):
            return type(self).pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy,
                                                  image_newline)
        return _packed(conf, image_features, image_sizes, image_newline, None, backend)

    return {"pack_image_features": pack_image_features}


def _build_llava_onevision(model, backend):
    require_backend("anyres_pack", backend, next(model.parameters(), None))
    conf = _pack_config(model)
    _mark_pre_layernorm(model)  # SigLIP towers have none; a CLIP tower would

    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"):
        if keeps_hf_code(backend, self.image_newline):
            return type(self).pack_image_features(self, image_features, image_sizes, image_newline,
                                                  vision_aspect_ratio)
        if vision_aspect_ratio is None:
            vision_aspect_ratio = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")
        # HF parses it with str.strip("anyres_max_"); keep the same parse
        max_tiles = int(vision_aspect_ratio.strip("anyres_max_"))
        return _packed(conf, image_features, image_sizes, image_newline, max_tiles, backend)

    return {"pack_image_features": pack_image_features}


register_rule(PatchRule(FAMILY, "llava_next_model", match=lambda o: _is(o, "LlavaNextModel"),
                        build=_build_llava_next))
register_rule(PatchRule(FAMILY, "llava_onevision_model", match=lambda o: _is(o, "LlavaOnevisionModel"),
                        build=_build_llava_onevision))


# ---- vision embeddings ----------------------------------------------------------------------------

def _check_conv(emb):
    conv = getattr(emb, "patch_embedding", None)
    if not isinstance(conv, torch.nn.Conv2d):
        raise SkipPatch("patch_embedding is not an nn.Conv2d")
    k = conv.kernel_size
    if k[0] != k[1] or tuple(conv.stride) != tuple(k) or conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        raise SkipPatch(f"patch conv is not a square stride=kernel conv (kernel {k}, stride {conv.stride})")
    if conv.padding not in ("valid", (0, 0)) or conv.padding_mode != "zeros":
        raise SkipPatch(f"patch conv has padding {conv.padding!r}")
    pos = getattr(emb, "position_embedding", None)
    ids = getattr(emb, "position_ids", None)
    if not isinstance(pos, torch.nn.Embedding) or ids is None:
        raise SkipPatch("no nn.Embedding position_embedding / position_ids")
    n = ids.shape[-1]
    if ids.numel() != n or not torch.equal(ids.reshape(-1).cpu(), torch.arange(n)) or n > pos.num_embeddings:
        raise SkipPatch("position_ids are not 0..n-1")
    return conv


def _fused_pre_ln(emb):
    # the pre-LN to apply here: only while the tower's own LN is our identity (checked per call)
    ln = emb.__dict__.get("_vlmk_pre_ln")
    info = None if ln is None else patch_info(ln)
    return ln if info is not None and info["rule"] == _PRE_LN_RULE else None


def _build_embeddings(emb, backend, *, with_cls: bool):
    _check_conv(emb)
    require_backend("patch_embed", backend, emb.patch_embedding.weight)
    cls_forward = type(emb).forward
    n_pos = emb.position_ids.shape[-1]

    def forward(self, pixel_values, interpolate_pos_encoding=False):
        ln = _fused_pre_ln(self)
        if interpolate_pos_encoding or keeps_hf_code(backend, pixel_values):
            out = cls_forward(self, pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
            return out if ln is None else F.layer_norm(out, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        if with_cls:
            h, w = pixel_values.shape[-2:]
            if h != self.image_size or w != self.image_size:
                raise ValueError(
                    f"Input image size ({h}*{w}) doesn't match model ({self.image_size}*{self.image_size})."
                )
        conv = self.patch_embedding
        return patch_embed(
            pixel_values, conv.weight, conv.bias,
            class_embedding=self.class_embedding if with_cls else None,
            position_embedding=self.position_embedding.weight[:n_pos],
            pre_layernorm=ln,
            backend=backend,
        )

    return {"forward": forward}


register_rule(PatchRule(FAMILY, "clip_vision_embeddings", match=lambda o: _is(o, "CLIPVisionEmbeddings"),
                        build=lambda o, b: _build_embeddings(o, b, with_cls=True)))
register_rule(PatchRule(FAMILY, "siglip_vision_embeddings", match=lambda o: _is(o, "SiglipVisionEmbeddings"),
                        build=lambda o, b: _build_embeddings(o, b, with_cls=False)))


def _identity(self, input):
    return input


def _build_fused_pre_ln(ln, backend):
    # named_modules visits the embeddings first: the LN may only vanish if they took it over
    info = patch_info(ln.__dict__["_vlmk_fused_into"])
    if info is None or info["rule"] != "clip_vision_embeddings" or info["backend"] != backend:
        raise SkipPatch("its CLIP embeddings were not patched in this call, so the LayerNorm stays")
    return {"forward": _identity}


register_rule(PatchRule(
    FAMILY, _PRE_LN_RULE,
    match=lambda o: isinstance(o, torch.nn.LayerNorm) and "_vlmk_fused_into" in o.__dict__,
    build=_build_fused_pre_ln,
))
