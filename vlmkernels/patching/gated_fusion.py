"""Patch rules for the gated_fusion family: multi-encoder fusion points and LLaVA-style MLP projectors.

The rules match python_ref's fusion modules (:mod:`python_ref.fusion`) wherever they sit, the two
python_ref models whose fusion spans several modules, and transformers' LLaVA projectors:

* ``SigmoidGate`` -> ``gated_fusion``: the document's gate mixes ``a, b`` themselves; the GMU variant
  mixes ``tanh`` projections of them (computed eagerly and handed over as ``mix_a, mix_b``).
* ``ExpertRouter`` (dense and top-k) -> ``vision_router`` (MLP, fp32 softmax, top-k renormalised,
  the ``image_type`` override). The MoE family's ``expert_router`` rule (``moe_topk_route``, top-k
  only) stays for ``patch(families=["moe"])``; this rule has a higher priority, so the default
  ``patch()`` and ``families=["gated_fusion"]`` route every ExpertRouter through ``vision_router``.
* ``MultiGranularityFusion`` (florence_vl, both variants): the first Linear of the projector becomes
  ``concat_linear`` over the feature streams (no concat written; its GELU fused when it follows
  directly, as in DBFusion); a following Linear -> GELU -> Linear becomes ``mlp_projector``; a
  LayerNorm (the document's variant) stays ``F.layer_norm`` between them.
* python_ref LEO, document variant: its ``_encode_document`` becomes ``expert_mix`` over the experts'
  features with the per-expert projections (``Σ_i w_i (X_i W_iᵀ + b_i)`` in one K-concatenated GEMM,
  no per-expert outputs written) and ``mlp_projector`` for ``project_to_llm``. Published variant:
  ``_encode_published`` runs both adapters' first layers as one ``split_linear`` (+GELU) and their
  second layers as one ``split_linear(layout="token_interleave")`` writing the interleaved token
  sequence directly (no stack/flatten copy); the adapters' LayerNorms stay ``F.layer_norm``.
* ``ExpertMix`` on its own is reported as skipped: it is a weighted sum with no projection of its
  own. The dynamic_vision_selector mixes the experts' features *before* its one shared projection;
  moving that projection into ``expert_mix`` would multiply its FLOPs by the number of experts (k
  with top-k), so only its router is patched there.
* transformers ``Llava*MultiModalProjector`` (LLaVA-1.5, NeXT, NeXT-Video, OneVision; python_ref's
  llava_v15 / llava_next / llava_onevision are built on them) -> ``mlp_projector``, with the erf
  ``"gelu"`` or ``"gelu_tanh"`` the module's ``act`` computes; other activations are skipped with the
  reason. Multi-layer ``vision_feature_layer`` models concatenate the layers before the projector
  (in ``get_image_features``), so their projector is patched the same way.

With ``backend="auto"``, calls on CPU tensors run the original code (:func:`.core.keeps_hf_code`);
forced backends run the ops anywhere. Calls under autocast run the original code too (the ops take
their operands in one dtype, as given; autocast would cast them). Weights are read through ``self`` at call time, and every
structural check is made at patch time, so copies of a patched module bind the same functions.
"""

from __future__ import annotations

import importlib
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .core import (PatchRule, SkipPatch, fused_activation, is_hf_class, is_python_ref_class, keeps_hf_code,
                   register_rule, require_backend)

FAMILY = "gated_fusion"
# above the MoE family's python_ref ExpertRouter rule: with both families active, vision_router decides
ROUTER_PRIORITY = 10


def _original_code(backend: str, t: torch.Tensor) -> bool:
    """Whether this call runs the module's own code: ``backend="auto"`` on CPU tensors
    (:func:`.core.keeps_hf_code`), or under autocast, which casts ``nn.Linear``'s operands while the
    ops take them in one dtype as given."""
    return keeps_hf_code(backend, t) or torch.is_autocast_enabled(t.device.type)


def _ops():
    from .. import ops

    return ops


def _activation(module) -> str | None:
    """The fused activation name (``"gelu"`` erf, ``"gelu_tanh"``, ``"relu"``) computed by ``module``, or None."""
    act = fused_activation(module)
    return act if act in ("gelu", "gelu_tanh", "relu") else None


def _is_linear(module) -> bool:
    # exactly nn.Linear: subclasses (bitsandbytes' quantized layers, ...) hold weights the ops cannot read
    return type(module) is nn.Linear


def _is_layer_norm(module) -> bool:
    return type(module) is nn.LayerNorm


def _apply_activation(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(x)
    return F.gelu(x, approximate="tanh" if activation == "gelu_tanh" else "none")


def _require(ops_used, backend: str, like) -> None:
    for op in ops_used:
        require_backend(op, backend, like)


def _check_segments(what: str, n: int) -> None:
    """The list ops take at most MAX_SEGMENTS feature streams / experts per launch."""
    from ..gated_fusion._linear_ops import MAX_SEGMENTS

    if n > MAX_SEGMENTS:
        raise SkipPatch(f"{n} {what}: the fused ops take at most {MAX_SEGMENTS}")


# ---- nn.Sequential projectors -----------------------------------------------------------------------

def sequential_plan(layers, *, features: bool) -> tuple[tuple, ...]:
    """How to run ``layers`` (an ``nn.Sequential`` of Linear / LayerNorm / GELU / ReLU) with the fused ops.

    Steps, by layer index (the modules are looked up at call time): ``("concat_linear", i, act)``
    (with ``features``: the first Linear over a list of feature streams; later, a Linear whose
    activation follows), ``("mlp_projector", i, act, j)`` (Linear -> activation -> Linear),
    ``("layer_norm", i)``, ``("activation", act)`` and ``("linear", i)``. Raises :class:`SkipPatch`
    naming the first layer that has no fused equivalent."""
    if not isinstance(layers, nn.Sequential) or not len(layers):
        raise SkipPatch("the projector is not a non-empty nn.Sequential")
    if features and not _is_linear(layers[0]):
        raise SkipPatch(f"the projector starts with {type(layers[0]).__name__}, not the Linear over the concat")
    steps, i, n = [], 0, len(layers)
    while i < n:
        layer = layers[i]
        act = _activation(layers[i + 1]) if i + 1 < n else None
        if _is_linear(layer):
            over_features = features and i == 0
            if act and not over_features and i + 2 < n and _is_linear(layers[i + 2]):
                steps.append(("mlp_projector", i, act, i + 2))
                i += 3
            elif act or over_features:
                steps.append(("concat_linear", i, act or "none"))
                i += 2 if act else 1
            else:
                steps.append(("linear", i))
                i += 1
        elif _is_layer_norm(layer):
            steps.append(("layer_norm", i))
            i += 1
        elif _activation(layer) is not None:
            steps.append(("activation", _activation(layer)))
            i += 1
        else:
            raise SkipPatch(f"projector layer {i} ({type(layer).__name__}) has no fused equivalent")
    return tuple(steps)


def _plan_ops(steps) -> set[str]:
    return {s[0] for s in steps if s[0] in ("concat_linear", "mlp_projector")}


def run_plan(steps, layers, x, backend: str):
    """Run :func:`sequential_plan`'s ``steps`` on ``x`` (a tensor, or the list of feature streams)."""
    ops = _ops()
    for step in steps:
        kind = step[0]
        if kind == "concat_linear":
            lin = layers[step[1]]
            x = ops.concat_linear(x if isinstance(x, (list, tuple)) else [x], lin.weight, lin.bias,
                                  activation=step[2], backend=backend)
        elif kind == "mlp_projector":
            l1, l2 = layers[step[1]], layers[step[3]]
            x = ops.mlp_projector(x, l1.weight, l1.bias, l2.weight, l2.bias, activation=step[2], backend=backend)
        elif kind == "layer_norm":
            ln = layers[step[1]]
            x = F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        elif kind == "activation":
            x = _apply_activation(x, step[1])
        else:
            lin = layers[step[1]]
            x = F.linear(x, lin.weight, lin.bias)
    return x


# ---- python_ref fusion modules ---------------------------------------------------------------------

def _build_sigmoid_gate(gate, backend):
    if gate.variant not in ("document", "gmu"):
        raise SkipPatch(f"unknown variant {gate.variant!r}")
    if not _is_linear(gate.gate):
        raise SkipPatch("the gate is not an nn.Linear")
    require_backend("gated_fusion", backend, gate.gate.weight)
    ops = _ops()
    gmu = gate.variant == "gmu"

    def forward(self, a, b):
        if _original_code(backend, a):
            return type(self).forward(self, a, b)
        mix_a = mix_b = None
        if gmu:  # the GMU mixes tanh projections; the gate still reads [a; b]
            mix_a, mix_b = torch.tanh(self.proj_a(a)), torch.tanh(self.proj_b(b))
        return ops.gated_fusion(a, b, self.gate.weight, self.gate.bias, mix_a=mix_a, mix_b=mix_b, backend=backend)

    return {"forward": forward}


def _build_expert_router(router, backend):
    mlp = getattr(router, "mlp", None)
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and _is_linear(mlp[0])
            and _is_linear(mlp[2])):
        raise SkipPatch("router mlp is not Linear -> activation -> Linear")
    act = _activation(mlp[1])
    if act is None:
        raise SkipPatch(f"router activation {type(mlp[1]).__name__} is not fused")
    require_backend("vision_router", backend, mlp[0].weight)
    ops = _ops()

    def forward(self, features, image_type=None):
        if _original_code(backend, features):
            return type(self).forward(self, features, image_type)
        if image_type is not None:
            image_type = self._check_image_type(image_type, features.shape[0])
        l1, l2 = self.mlp[0], self.mlp[2]
        return ops.vision_router(features, l1.weight, l1.bias, l2.weight, l2.bias, top_k=self.top_k,
                                 activation=act, image_type=image_type, backend=backend)

    return {"forward": forward}


def _skip_expert_mix(mix, backend):
    raise SkipPatch("a weighted sum with no projection of its own: expert_mix fuses it with the per-expert "
                    "projections, which the parent model's rule does where they precede the mix (leo); "
                    "a projection after the mix (dynamic_vision_selector) would cost N times its FLOPs fused")


def _build_multi_granularity(fusion, backend):
    _check_segments("feature streams", len(fusion.dims))
    steps = sequential_plan(getattr(fusion, "proj", None), features=True)
    _require(_plan_ops(steps), backend, fusion.proj[0].weight)

    def forward(self, *feats):
        if len(feats) == 1 and isinstance(feats[0], (list, tuple)):
            feats = tuple(feats[0])
        if feats and isinstance(feats[0], torch.Tensor) and _original_code(backend, feats[0]):
            return type(self).forward(self, *feats)
        widths = tuple(f.shape[-1] if isinstance(f, torch.Tensor) else None for f in feats)
        if widths != self.dims:  # concat_linear checks the total width only; the split is the module's
            raise ValueError(f"expected {len(self.dims)} feature tensors of widths {self.dims}, got {widths}")
        return run_plan(steps, self.proj, list(feats), backend)

    return {"forward": forward}


# ---- python_ref models whose fusion spans several modules -------------------------------------------

def _model_module(model):
    return importlib.import_module(type(model).__module__)


def _build_leo_document(model, backend):
    projs = getattr(model, "expert_proj", None)
    if not isinstance(projs, nn.ModuleList) or not all(_is_linear(p) for p in projs):
        raise SkipPatch("expert_proj is not a ModuleList of nn.Linear")
    if len({p.out_features for p in projs}) != 1:
        raise SkipPatch("the expert projections have different output widths")
    _check_segments("experts", len(projs))
    steps = sequential_plan(model.project_to_llm, features=False)
    _require({"expert_mix", *_plan_ops(steps)}, backend, projs[0].weight)
    ops = _ops()

    def _encode_document(self, pixel_values, image_type):
        if _original_code(backend, pixel_values):
            return type(self)._encode_document(self, pixel_values, image_type)
        feats = self.expert_features(pixel_values)
        pooled = torch.cat([f.mean(dim=1) for f in feats], dim=-1)
        weights = self.router(pooled, self.image_type_ids(image_type, pixel_values.shape[0], pixel_values.device))
        fused = ops.expert_mix(feats, weights, [p.weight for p in self.expert_proj],
                               [p.bias for p in self.expert_proj], backend=backend)
        return run_plan(steps, self.project_to_llm, fused, backend), {"router_weights": weights}

    return {"_encode_document": _encode_document}


def _leo_adapter_act(adapter) -> str:
    ok = (isinstance(adapter, nn.Sequential) and len(adapter) == 4 and _is_layer_norm(adapter[0])
          and _is_linear(adapter[1]) and _is_linear(adapter[3]))
    act = _activation(adapter[2]) if ok else None
    if act not in ("gelu", "gelu_tanh"):
        raise SkipPatch("adapter is not LayerNorm -> Linear -> GELU -> Linear")
    return act


def _build_leo_published(model, backend):
    adapters = getattr(model, "adapters", None)
    if not isinstance(adapters, nn.ModuleList) or len(adapters) != 2:
        raise SkipPatch("no pair of adapters")
    acts = {_leo_adapter_act(a) for a in adapters}
    if len(acts) != 1:
        raise SkipPatch("the two adapters use different activations")
    if adapters[0][3].out_features != adapters[1][3].out_features:
        raise SkipPatch("the adapters' outputs have different widths")
    act = acts.pop()
    require_backend("split_linear", backend, adapters[0][1].weight)
    ops = _ops()
    leo = _model_module(model)

    def _encode_published(self, pixel_values, num_tiles):
        if _original_code(backend, pixel_values):
            return type(self)._encode_published(self, pixel_values, num_tiles)
        e1, e2 = self.vision_experts["enc1"], self.vision_experts["enc2"]
        t1 = leo.patch_tokens(e1, leo.resize_images(pixel_values, e1.config.image_size))
        t2 = self.neck(leo.patch_tokens(e2, leo.resize_images(pixel_values, e2.config.image_size)))
        xs = [leo.pixel_unshuffle_tokens(t, f) for t, f in zip((t1, t2), self.unshuffle)]
        (ln1, up1, _, down1), (ln2, up2, _, down2) = self.adapters
        xs = [F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps) for x, ln in zip(xs, (ln1, ln2))]
        hidden = ops.split_linear(xs, [up1.weight, up2.weight], [up1.bias, up2.bias], activation=act,
                                  layout="channel_concat", backend=backend)
        hs = list(hidden.split([up1.out_features, up2.out_features], dim=-1))
        # encoder 1's tokens at even positions, encoder 2's at odd ones, written in place by the GEMM
        tokens = ops.split_linear(hs, [down1.weight, down2.weight], [down1.bias, down2.bias], activation="none",
                                  layout="token_interleave", backend=backend)
        return leo.split_tiles(tokens, num_tiles)

    return {"_encode_published": _encode_published}


def _build_leo(model, backend):
    variant = getattr(model, "variant", None)
    if variant == "document":
        return _build_leo_document(model, backend)
    if variant == "published":
        return _build_leo_published(model, backend)
    raise SkipPatch(f"unknown LEO variant {variant!r}")


# ---- transformers LLaVA projectors -----------------------------------------------------------------

HF_PROJECTORS = ("LlavaMultiModalProjector", "LlavaNextMultiModalProjector", "LlavaNextVideoMultiModalProjector",
                 "LlavaOnevisionMultiModalProjector")


def _build_hf_projector(proj, backend):
    l1, act_mod, l2 = (getattr(proj, k, None) for k in ("linear_1", "act", "linear_2"))
    if not (_is_linear(l1) and _is_linear(l2)):
        raise SkipPatch("linear_1 / linear_2 are not nn.Linear (quantized?)")
    try:
        src = inspect.getsource(type(proj).forward)
    except (OSError, TypeError):
        raise SkipPatch("cannot read the projector's forward to check it is linear_1 -> act -> linear_2")
    calls = [src.find(f"self.{k}(") for k in ("linear_1", "act", "linear_2")]
    if min(calls) < 0 or calls != sorted(calls) or src.count("self.") != 3:
        raise SkipPatch("the projector's forward is not linear_1 -> act -> linear_2")
    act = _activation(act_mod)
    if act not in ("gelu", "gelu_tanh"):
        raise SkipPatch(f"projector activation {type(act_mod).__name__} is not fused "
                        "(mlp_projector: erf 'gelu' or 'gelu_tanh')")
    require_backend("mlp_projector", backend, l1.weight)
    ops = _ops()

    def forward(self, image_features):
        if _original_code(backend, image_features):
            return type(self).forward(self, image_features)
        return ops.mlp_projector(image_features, self.linear_1.weight, self.linear_1.bias, self.linear_2.weight,
                                 self.linear_2.bias, activation=act, backend=backend)

    return {"forward": forward}


register_rule(PatchRule(FAMILY, "sigmoid_gate", match=lambda m: is_python_ref_class(m, "SigmoidGate"),
                        build=_build_sigmoid_gate,
                        note="gmu variant: its tanh projections run eagerly, the gate and mix fused"))
register_rule(PatchRule(FAMILY, "vision_router", match=lambda m: is_python_ref_class(m, "ExpertRouter"),
                        build=_build_expert_router, priority=ROUTER_PRIORITY))
register_rule(PatchRule(FAMILY, "expert_mix", match=lambda m: is_python_ref_class(m, "ExpertMix"),
                        build=_skip_expert_mix))
register_rule(PatchRule(FAMILY, "multi_granularity_fusion",
                        match=lambda m: is_python_ref_class(m, "MultiGranularityFusion"),
                        build=_build_multi_granularity,
                        note="a LayerNorm in the projector (document variant) runs as F.layer_norm"))
register_rule(PatchRule(FAMILY, "leo", match=lambda m: is_python_ref_class(m, "LEO"), build=_build_leo,
                        note="document: expert_mix + mlp_projector; published: split_linear, tokens interleaved"))
register_rule(PatchRule(FAMILY, "hf_mlp_projector", match=lambda m: is_hf_class(m, HF_PROJECTORS),
                        build=_build_hf_projector))
