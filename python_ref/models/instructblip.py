"""InstructBLIP: BLIP-2 with an instruction-aware Q-Former: the instruction tokens
(``qformer_input_ids``) join the learned queries in the Q-Former's self-attention, so the
extracted visual tokens depend on the instruction. On HF ``InstructBlipForConditionalGeneration``
(published); ``llm="llama"`` (Vicuna-7B, default) or ``llm="t5"`` (Flan-T5-XL).

The document's sketch (separate vision and text cross-attentions per layer, pre-LN) describes
the same intent; the published block (joint self-attention over [queries; instruction], then
cross-attention to the image for the query rows, post-LN) is what we build.
"""

from __future__ import annotations

import torch
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

from .. import components as C
from ..registry import Architecture, register_architecture
from ._hf_common import check_config_keys, construct, pop_common
from .blip2 import blip_batch, blip_configs

LLMS = ("llama", "t5")
INSTRUCTION_LEN = {"tiny": 5, "small": 16, "base": 32}


def instructblip_config(size: str, llm: str = "llama", vision=None, text=None, qformer=None,
                        **overrides) -> InstructBlipConfig:
    if llm not in LLMS:
        raise ValueError(f"llm must be one of {LLMS}, got {llm!r}")
    qformer = dict(qformer or {})
    if size == "base":
        qformer.setdefault("vocab_size", 30523)  # the converted checkpoints add one token
    vcfg, qcfg, tcfg, token = blip_configs(size, llm, vision, text, qformer)
    kw = dict(num_query_tokens=C.NUM_QUERY_TOKENS[size], image_token_index=token)
    kw.update(check_config_keys(InstructBlipConfig, overrides, "instructblip"))
    return InstructBlipConfig(vision_config=vcfg, qformer_config=qcfg, text_config=tcfg.to_dict(), **kw)


def build(size: str = "tiny", **overrides):
    seed, attn, vision, text = pop_common(overrides)
    llm = overrides.pop("llm", "llama")
    qformer = overrides.pop("qformer_config", None)
    cfg = instructblip_config(size, llm, vision, text, qformer, **overrides)
    return construct(InstructBlipForConditionalGeneration, cfg, attn, seed)


def inputs(model, batch_size: int = 2, seed: int = 0, size: str = "tiny") -> dict:
    cfg = model.config if model is not None else instructblip_config(size)
    gen, pixel_values, batch = blip_batch(cfg, batch_size, seed, size)
    # the instruction, tokenized for the Q-Former's BERT vocabulary (0 = [PAD])
    qids = C.random_token_ids(gen, batch_size, INSTRUCTION_LEN[size], cfg.qformer_config.vocab_size, low=1)
    qmask = torch.ones_like(qids)
    return {"pixel_values": pixel_values, "qformer_input_ids": qids, "qformer_attention_mask": qmask, **batch}


register_architecture(Architecture(
    name="instructblip", builder=build, inputs=inputs, source="published",
    variants=("llm='llama' (Vicuna-7B)", "llm='t5' (Flan-T5-XL)"),
    description="HF InstructBlipForConditionalGeneration: instruction-aware Q-Former (queries + "
                "instruction tokens in self-attention) -> Linear -> Vicuna/Llama or T5.",
))
