"""Dynamic Q-Former (design document): an importance predictor scores every patch, the top-k patches
(k = number of queries) are kept, and a Q-Former runs over the selected tokens only.

    s = sigmoid(MLP(patches))                      # [B, N] importance, MLP = Linear(D,128)-ReLU-Linear(128,1)
    sel, idx = TopKTokenSelector(k)(s, patches)      # [B, k, D] (fusion point: topk_select_tokens)
    sel = sel * s[idx]                               # lets the predictor learn (the sketch gives it no gradient)
    q = Q-Former(queries, cross-attending to sel) -> projection -> LLM prefix

The score scaling is this implementation's fix: in the document's sketch the predictor only feeds
``torch.topk`` indices and so never receives a gradient. ``score_scaling=False`` restores the sketch.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import components as C
from ..fusion import TopKTokenSelector
from ..registry import Architecture, register_architecture
from ._doc_parts import DocVLM, check_pixels, example_batch, patch_tokens, vision_expert

# tiny/small use a larger image than the preset so that selection really drops patches (16 > 4 queries).
GEOMETRY = {"tiny": dict(image_size=56, patch_size=14), "small": dict(image_size=112, patch_size=14),
            "base": dict(image_size=336, patch_size=14)}  # CLIP ViT-L/14-336: 576 patches, k = 32
PREDICTOR_HIDDEN = 128  # the document's query_predictor width


class DynamicQFormer(DocVLM):
    PARTS = {"vision": ("vision_tower.",),
             "fusion": ("query_predictor.", "query_tokens.", "q_former.", "projection."),
             "llm": ("language_model.",)}

    def __init__(self, size: str = "tiny", num_query_tokens=None, score_scaling: bool = True,
                 vision_overrides=None, llm_overrides=None):
        super().__init__(size, llm_overrides)
        self.vision_tower = vision_expert(size, "clip", **{**GEOMETRY[size], **(vision_overrides or {})})
        vcfg = self.vision_tower.config
        d = vcfg.hidden_size
        self.image_size = vcfg.image_size
        self.num_patches = C.num_patches(vcfg)
        self.num_query_tokens = num_query_tokens or C.NUM_QUERY_TOKENS[size]
        self.score_scaling = score_scaling
        self.query_predictor = nn.Sequential(nn.Linear(d, PREDICTOR_HIDDEN), nn.ReLU(),
                                             nn.Linear(PREDICTOR_HIDDEN, 1), nn.Sigmoid())
        self.selector = TopKTokenSelector(min(self.num_query_tokens, self.num_patches))
        self.q_former = C.build_qformer(size, encoder_hidden_size=d)
        self.query_tokens = C.QueryTokens(self.num_query_tokens, self.q_former.config.hidden_size)
        self.projection = nn.Linear(self.q_former.config.hidden_size, self.llm_hidden)

    def select_patches(self, patches: torch.Tensor):
        """[B, N, D] -> (selected [B, k, D], index [B, k], importance [B, N])."""
        importance = self.query_predictor(patches).squeeze(-1)
        selected, index = self.selector(importance, patches)
        if self.score_scaling:
            selected = selected * importance.gather(1, index).unsqueeze(-1).to(selected.dtype)
        return selected, index, importance

    def encode_images(self, pixel_values: torch.Tensor):
        check_pixels(pixel_values)
        patches = patch_tokens(self.vision_tower, pixel_values)
        selected, index, importance = self.select_patches(patches)
        q = self.q_former(query_embeds=self.query_tokens(selected.shape[0]), encoder_hidden_states=selected)
        return self.projection(q.last_hidden_state), {"selected_index": index, "importance": importance}

    def forward(self, pixel_values, input_ids, attention_mask=None, labels=None):
        visual, extras = self.encode_images(pixel_values)
        return self.run_llm(visual, input_ids, attention_mask, labels, extras=extras)


def build(size: str = "tiny", **overrides) -> DynamicQFormer:
    return DynamicQFormer(size, **overrides)


def example_inputs(model, batch_size=2, seed=0, size="tiny") -> dict:
    return example_batch(model, build, batch_size, seed, size)


register_architecture(Architecture(
    name="dynamic_qformer", builder=build, inputs=example_inputs, source="document",
    variants=("score_scaling=True", "score_scaling=False (the sketch: predictor gets no gradient)"),
    description="CLIP ViT -> importance MLP -> top-k patches (k = queries) -> Blip2QFormerModel -> Linear -> Llama",
))
