"""BLIP-2: frozen ViT -> Q-Former (learned queries cross-attend to the image) -> Linear -> LLM,
on HF ``Blip2ForConditionalGeneration`` (published).

``build("blip2", llm="opt")`` (default, Salesforce/blip2-opt-2.7b dims at base) or
``llm="t5"`` (blip2-flan-t5-xl): the projected queries replace ``num_query_tokens`` image
placeholders at the start of the (decoder-only) input or of the T5 encoder input. Base: EVA ViT-g/14
at 224 px (257 tokens x 1408), Q-Former 768 hidden / 12 layers / 32 queries, cross-attention in
every 2nd layer. The document's 6-layer cross-attention-only sketch is the published Q-Former
minus its self-attention; we use the published block.
"""

from __future__ import annotations

from typing import Optional

from transformers import Blip2Config, Blip2ForConditionalGeneration

from .. import components as C
from ..registry import Architecture, register_architecture
from ._hf_common import check_config_keys, construct, placeholder_batch, pop_common

# (text-config overrides, image token id) of the HF checkpoints at base
BASE_TEXT = {"opt": (dict(vocab_size=50304), 50265), "t5": ({}, 32100), "llama": (dict(vocab_size=32002), 32001)}
LLMS = ("opt", "t5")


def blip_configs(size: str, llm: str, vision: Optional[dict], text: Optional[dict], qformer: Optional[dict]):
    """(vision dict, qformer dict, text config, image token id) shared by BLIP-2 and InstructBLIP."""
    C.check_size(size)
    base_text, base_token = BASE_TEXT[llm]
    tcfg = C.llm_config(size, llm, **{**(base_text if size == "base" else {}), **(text or {})})
    vcfg = C.preset("eva", size, **(vision or {}))
    qcfg = C.preset("qformer", size, **(qformer or {}))
    token = base_token if size == "base" else tcfg.vocab_size - 1
    return vcfg, qcfg, tcfg, token


def blip2_config(size: str, llm: str = "opt", vision=None, text=None, qformer=None, **overrides) -> Blip2Config:
    if llm not in LLMS:
        raise ValueError(f"llm must be one of {LLMS}, got {llm!r}")
    vcfg, qcfg, tcfg, token = blip_configs(size, llm, vision, text, qformer)
    kw = dict(num_query_tokens=C.NUM_QUERY_TOKENS[size], image_token_index=token)
    kw.update(check_config_keys(Blip2Config, overrides, "blip2"))
    return Blip2Config(vision_config=vcfg, qformer_config=qcfg, text_config=tcfg.to_dict(), **kw)


def build(size: str = "tiny", **overrides):
    seed, attn, vision, text = pop_common(overrides)
    llm = overrides.pop("llm", "opt")
    qformer = overrides.pop("qformer_config", None)
    return construct(Blip2ForConditionalGeneration, blip2_config(size, llm, vision, text, qformer, **overrides),
                     attn, seed)


def blip_batch(cfg, batch_size: int, seed: int, size: str) -> tuple:
    """(generator, pixel_values, LM batch). Decoder-only LLM: ``[img]*Q + text`` with labels on the
    answer. T5: encoder ``input_ids = [img]*Q + prompt``, ``labels`` = the answer (decoder side)."""
    gen = C.generator(seed)
    s = cfg.vision_config.image_size
    pixel_values = C.random_pixel_values(gen, batch_size, 3, s, s)
    tcfg = cfg.text_config
    q = cfg.num_query_tokens
    pad = tcfg.pad_token_id if tcfg.pad_token_id is not None else 0
    if tcfg.is_encoder_decoder:
        batch = placeholder_batch(gen, [[q]] * batch_size, C.TEXT_LEN[size], tcfg.vocab_size,
                                  cfg.image_token_id, pad_token_id=pad, prompt_len=C.TEXT_LEN[size])
        answer = C.random_token_ids(gen, batch_size, max(2, C.TEXT_LEN[size] // 2), tcfg.vocab_size,
                                    exclude=(cfg.image_token_id,))
        batch["labels"] = answer
    else:
        batch = placeholder_batch(gen, [[q]] * batch_size, C.TEXT_LEN[size], tcfg.vocab_size,
                                  cfg.image_token_id, pad_token_id=pad)
    return gen, pixel_values, batch


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    cfg = model.config if model is not None else blip2_config(size)
    _, pixel_values, batch = blip_batch(cfg, batch_size, seed, size)
    return {"pixel_values": pixel_values, **batch}


register_architecture(Architecture(
    name="blip2", builder=build, inputs=inputs, source="published",
    variants=("llm='opt' (OPT-2.7B)", "llm='t5' (Flan-T5-XL)"),
    description="HF Blip2ForConditionalGeneration: ViT -> Q-Former (32 queries x 768 at base) -> "
                "Linear -> OPT or T5; query outputs fill the image placeholder tokens.",
))
