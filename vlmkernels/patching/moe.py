"""MoE patch rules: HF transformers 5.x routers and experts, python_ref's top-k selectors.

Models: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, Qwen3-VL-MoE (text), GLM-4.5 and
GLM-4.5V (text).

* Routers (``*TopKRouter`` / ``*TopkRouter``): the forward becomes the model's own router
  linear + ``moe_topk_route`` and keeps returning ``(router_logits, weights, ids)`` with the
  original weight dtypes: fp32 for Mixtral, DeepSeek-V3 and GLM, the logits' dtype for Qwen2/3-MoE,
  OLMoE and Qwen3-VL-MoE. Ids stay ``moe_topk_route``'s int32 where the router feeds experts that
  this same ``patch()`` call replaces with ``fused_moe`` (no int32 -> int64 -> int32 round trip);
  elsewhere (a router patched alone, experts left to HF, whose eager path needs int64) they are
  int64, like ``torch.topk``.
* Experts (``*Experts`` of the same models, HF v5 3-D weights): the forward becomes ``fused_moe``.
* With ``backend="auto"``, CPU tensors keep HF's own router and experts forwards (no CPU backend
  beats them, see :func:`.core.keeps_hf_code`); forced backends run the ops on CPU too.
  Qwen2-MoE's sigmoid-gated shared expert and DeepSeek's shared experts are dense MLPs the block
  adds itself; the block's forward is left alone and simply calls the patched router and experts.
* transformers' experts interface gets a ``"vlmkernels"`` implementation when this module is
  imported (``vlmkernels.patch()`` imports it; registration is global, so afterwards
  ``model.set_experts_implementation("vlmkernels")`` works); ``patch()`` never changes a model's
  ``_experts_implementation``, it binds forwards on the matching instances only.
* A forced ``backend`` that an op lacks (e.g. ``"cpu"`` for ``fused_moe``) skips that module with
  the reason in the report; its original forward stays.
* python_ref: ``TopKTokenSelector`` (DynamicQFormer) -> ``topk_select_tokens``; ``ExpertRouter`` with
  ``top_k`` set (LEO, dynamic_vision_selector) -> ``moe_topk_route``, for ``patch(families=["moe"])``.
  The gated_fusion family's ``vision_router`` rule (dense and top-k: MLP, fp32 softmax, top-k through
  the same routing helpers) outranks it: the default ``patch()`` routes every ExpertRouter there.

Classes are matched by name and module, so nothing here imports transformers or python_ref eagerly.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .core import (ACT_CLASSES, PatchRule, SkipPatch, is_hf_class, is_python_ref_class, keeps_hf_code,
                   patch_info, register_rule, require_backend)

FAMILY = "moe"

# router class -> how HF routes (see the anchor's table); every one is softmax/sigmoid in fp32
_SOFTMAX_ROUTERS = {
    # name: (renormalize attribute or True, weights keep fp32?)
    "MixtralTopKRouter": (True, True),
    "Qwen2MoeTopKRouter": ("norm_topk_prob", False),
    "Qwen3MoeTopKRouter": ("norm_topk_prob", False),
    "OlmoeTopKRouter": ("norm_topk_prob", False),
    "Qwen3VLMoeTextTopKRouter": (True, False),
}
# DeepSeek-V3's biased, grouped sigmoid router; GLM-4.5 and GLM-4.5V (text) copy it verbatim
_GROUPED_SIGMOID_ROUTERS = ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter", "Glm4vMoeTextTopkRouter")
_ROUTERS = (*_SOFTMAX_ROUTERS, *_GROUPED_SIGMOID_ROUTERS)
_EXPERTS = ("MixtralExperts", "Qwen2MoeExperts", "Qwen3MoeExperts", "OlmoeExperts", "DeepseekV3Experts",
            "Qwen3VLMoeTextExperts", "Glm4MoeExperts", "Glm4vMoeTextExperts")


def _ops():
    from .. import ops

    return ops


# unpatched router -> the experts of its MoE block (HF blocks hold them as ``gate`` and ``experts``),
# noted when patch() offers the block to the router rule's matcher (patch() visits a block before its
# children) and used up by the router's build in that same call
_BLOCK_EXPERTS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def _match_router(module) -> bool:
    experts = getattr(module, "experts", None)
    gate = getattr(module, "gate", None)
    if is_hf_class(experts, _EXPERTS) and is_hf_class(gate, _ROUTERS) and patch_info(gate) is None:
        _BLOCK_EXPERTS[gate] = experts
    return is_hf_class(module, _ROUTERS)


def _feeds_patched_experts(experts, backend: str) -> bool:
    """Whether these experts (a router's block's, or None) get ``fused_moe`` in this patch() call
    (the experts rule builds from the same checks): then they take the router's int32 ids as they are."""
    if experts is None:
        return False
    try:
        _check_experts(experts, backend)
    except SkipPatch:
        return False
    return True


# ---- HF routers ---------------------------------------------------------------------------------

def _build_softmax_router(router, backend, int32_ids):
    renorm_attr, fp32_weights = _SOFTMAX_ROUTERS[type(router).__name__]
    if not isinstance(getattr(router, "weight", None), torch.Tensor) or router.weight.dim() != 2:
        raise SkipPatch("router has no 2-D weight")
    if renorm_attr is not True and not hasattr(router, renorm_attr):
        raise SkipPatch(f"router has no {renorm_attr}")
    require_backend("moe_topk_route", backend, router.weight)
    ops = _ops()

    def forward(self, hidden_states):
        if keeps_hf_code(backend, hidden_states):
            return type(self).forward(self, hidden_states)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        renormalize = True if renorm_attr is True else bool(getattr(self, renorm_attr))
        weights, ids = ops.moe_topk_route(
            router_logits, self.top_k, scoring="softmax", renormalize=renormalize,
            weights_dtype=torch.float32 if fp32_weights else router_logits.dtype, backend=backend,
        )
        return router_logits, weights, ids if int32_ids else ids.long()

    return {"forward": forward}


def _build_deepseek_router(router, backend, int32_ids):
    for attr in ("weight", "e_score_correction_bias", "num_group", "topk_group", "norm_topk_prob",
                 "routed_scaling_factor", "top_k", "num_experts"):
        if not hasattr(router, attr):
            raise SkipPatch(f"router has no {attr}")
    if router.num_experts % router.num_group:
        raise SkipPatch(f"num_experts={router.num_experts} is not divisible by n_group={router.num_group}")
    require_backend("moe_topk_route", backend, router.weight)
    ops = _ops()

    def forward(self, hidden_states):
        if keeps_hf_code(backend, hidden_states):
            return type(self).forward(self, hidden_states)
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
        weights, ids = ops.moe_topk_route(
            router_logits, self.top_k, scoring="sigmoid", renormalize=bool(self.norm_topk_prob),
            bias=self.e_score_correction_bias.float(), num_groups=self.num_group,
            topk_groups=self.topk_group, group_score="top2_sum",
            scaling_factor=float(self.routed_scaling_factor), weights_dtype=torch.float32, backend=backend,
        )
        return router_logits, weights, ids if int32_ids else ids.long()

    return {"forward": forward}


# ---- HF experts ---------------------------------------------------------------------------------

def _activation_name(experts) -> str | None:
    """The fused activation matching the config's ``hidden_act`` *and* the module's ``act_fn``."""
    from python_ref.ops.moe_experts import MOE_ACTIVATIONS

    act = getattr(getattr(experts, "config", None), "hidden_act", None)
    act_cls = type(getattr(experts, "act_fn", None)).__name__
    for name, spellings in MOE_ACTIVATIONS.items():
        if act in spellings and act_cls in ACT_CLASSES[name]:
            return name
    return None


def _experts_unsupported(experts) -> str | None:
    """Why ``fused_moe`` cannot stand in for this experts module, or None."""
    for attr in ("gate_up_proj", "down_proj"):
        w = getattr(experts, attr, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3:
            return f"no 3-D {attr} (quantized or legacy experts)"
        if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"{attr} dtype {w.dtype} is not supported"
    flags = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
             "has_post_expert_norm": False, "_is_expert_parallel": False}
    for attr, want in flags.items():
        if getattr(experts, attr, want) != want:
            return f"{attr}={getattr(experts, attr)} is not supported"
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # transformers without the experts interface
        _default_apply_gate = None
    gate = getattr(type(experts), "_apply_gate", _default_apply_gate)
    if gate is not _default_apply_gate:
        return "custom _apply_gate"
    if _activation_name(experts) is None:
        act = getattr(getattr(experts, "config", None), "hidden_act", None)
        return f"activation {act!r} ({type(getattr(experts, 'act_fn', None)).__name__}) is not fused"
    return None


def _experts_forward(backend: str, activation: str):
    ops = _ops()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if keeps_hf_code(backend, hidden_states):
            return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
        x = hidden_states
        if x.dtype != self.gate_up_proj.dtype:  # autocast: HF casts the input to the weights' dtype
            x = x.to(self.gate_up_proj.dtype)
        out = ops.fused_moe(x, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index,
                            activation=activation, backend=backend, check_ids=False)
        return out.to(hidden_states.dtype)

    return forward


def _check_experts(experts, backend) -> str:
    """The fused activation for these experts, or SkipPatch saying why ``fused_moe`` cannot run them."""
    why = _experts_unsupported(experts)
    if why:
        raise SkipPatch(why)
    require_backend("fused_moe", backend, experts.gate_up_proj)
    return _activation_name(experts)


def _build_experts(experts, backend):
    return {"forward": _experts_forward(backend, _check_experts(experts, backend))}


def vlmkernels_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers ``ExpertsInterface`` entry ``"vlmkernels"``: ``fused_moe`` with ``backend="auto"``,
    HF's ``grouped_mm`` for layouts it does not cover (bias, transposed, custom gate, EP) and for CPU
    tensors (see :func:`~vlmkernels.patching.core.keeps_hf_code`)."""
    if _experts_unsupported(self) is not None or keeps_hf_code("auto", hidden_states):
        from transformers.integrations.moe import grouped_mm_experts_forward

        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return _experts_forward("auto", _activation_name(self))(self, hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> bool:
    """Add ``"vlmkernels"`` to transformers' experts interface; False where it does not exist."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register("vlmkernels", vlmkernels_experts_forward)
    return True


# ---- python_ref -------------------------------------------------------------------------------------

def _first_parameter(module):
    return next(iter(module.parameters()), torch.empty(0))


def _build_token_selector(selector, backend):
    require_backend("topk_select_tokens", backend, _first_parameter(selector))
    ops = _ops()

    def forward(self, scores, tokens):
        if self.k > scores.shape[-1]:
            raise ValueError(f"k={self.k} exceeds the number of tokens N={scores.shape[-1]}")
        selected, index = ops.topk_select_tokens(scores, tokens, self.k, backend=backend)
        return selected, index.long()

    return {"forward": forward}


def _build_expert_router(router, backend):
    if getattr(router, "top_k", None) is None:
        raise SkipPatch("dense softmax routing (top_k=None): nothing to fuse")
    require_backend("moe_topk_route", backend, _first_parameter(router))
    ops = _ops()

    def forward(self, features, image_type=None):
        logits = self.compute_logits(features)
        vals, ids = ops.moe_topk_route(logits, self.top_k, scoring="softmax", renormalize=True,
                                       backend=backend)
        weights = torch.zeros_like(logits, dtype=torch.float32).scatter(1, ids.long(), vals)
        if image_type is not None:
            image_type = self._check_image_type(image_type, features.shape[0])
            forced = F.one_hot(image_type.clamp_min(0), self.num_experts).to(weights.dtype)
            weights = torch.where((image_type >= 0).unsqueeze(1), forced, weights)
        return weights.to(features.dtype)

    return {"forward": forward}


def _build_router(router, backend):
    int32_ids = _feeds_patched_experts(_BLOCK_EXPERTS.pop(router, None), backend)
    if type(router).__name__ in _GROUPED_SIGMOID_ROUTERS:
        return _build_deepseek_router(router, backend, int32_ids)
    return _build_softmax_router(router, backend, int32_ids)


register_rule(PatchRule(FAMILY, "hf_router", match=_match_router, build=_build_router))
register_rule(PatchRule(FAMILY, "hf_experts", match=lambda m: is_hf_class(m, _EXPERTS), build=_build_experts))
register_rule(PatchRule(FAMILY, "topk_token_selector",
                        match=lambda m: is_python_ref_class(m, "TopKTokenSelector"), build=_build_token_selector))
register_rule(PatchRule(FAMILY, "expert_router", match=lambda m: is_python_ref_class(m, "ExpertRouter"),
                        build=_build_expert_router))
register_experts_implementation()
