"""Q-Former patch rules: HF transformers 5.x BLIP-2 / InstructBLIP / InstructBLIP-Video Q-Formers, and
python_ref Gemini's masked attention.

* ``Blip2QFormerModel``, ``InstructBlipQFormerModel``, ``InstructBlipVideoQFormerModel`` (inside their
  ``*ForConditionalGeneration`` / ``*Model`` classes, and in python_ref's blip2, instructblip, minigpt4,
  minigpt5 and dynamic_qformer, which all build HF's ``Blip2QFormerModel``): the model's forward runs
  the encoder itself. The cross-attention K/V of every cross layer come from ONE ``qformer_cross_kv``
  GEMM over the encoder states (read once, not once per cross layer); then per layer:
  self-attention over all rows (queries, plus InstructBLIP's instruction tokens under their padding
  mask) -> ``linear_residual_layernorm`` -> (query rows, cross layers) cross-attention on the hoisted
  K/V -> ``linear_residual_layernorm`` -> ``linear_gelu`` -> ``linear_residual_layernorm``; text rows
  go through the text FFN (``intermediate`` / ``output``) and are concatenated after the queries, as
  HF does. The embeddings (BLIP-2's ``layernorm`` + ``dropout``, InstructBLIP's ``embeddings``) stay
  the model's own modules.
* HF's output contract is kept: ``BaseModelOutputWithPoolingAndCrossAttentions`` (``pooler_output`` =
  ``last_hidden_state[:, 0]``), a tuple for ``return_dict=False``, the output in the Q-Former's dtype,
  encoder states cast to it (BLIP-2 loaded in fp16 keeps an fp32 Q-Former and feeds it fp16 states).
* Calls that run HF's own code (decided per call; the patch report says so): ``output_attentions`` or
  ``output_hidden_states`` requested (argument or config: HF records them with hooks on the modules
  this path does not call), an attention mask that is not 2-D ``[B, L]``, missing encoder states
  where a cross layer needs them (HF raises), text rows without a text FFN (HF raises), and
  ``backend="auto"`` on CPU tensors (:func:`.core.keeps_hf_code`; forced backends run the ops on CPU).
* Under ``torch.autocast`` the kernels run in autocast's dtype (HF's Linear layers do too; the
  weights are cast per call as autocast casts them), and the output keeps HF's dtype there (fp32:
  LayerNorm autocasts to fp32); the residual stream between the fused blocks is rounded to the
  autocast dtype, where HF keeps it fp32 (tested within 2e-2).
* Training: dropout runs with the modules' own ``p`` while they are in training mode (attention
  probabilities, the three output blocks). Gradient-checkpointed layers (``activation_checkpointing_enable``)
  are honored: each patched layer runs under the layer's own ``_gradient_checkpointing_func``. The
  hoisted cross K/V is computed outside the checkpoints, so it is kept for the backward (HF recomputes
  each layer's K/V instead).
* Weights are read through ``self`` at call time. The stacked cross K/V weight, the stacked
  self-attention q/k/v weights (one GEMM instead of three) and, for ``precision="bf16"``, the bf16
  copies of every weight are cached per module, keyed on the
  parameters' storage and version counters, only when no gradient flows to those parameters (frozen
  Q-Former or ``no_grad``); with gradients they are rebuilt every call (weights change every step and
  the stacking must stay on the autograd graph), and under ``torch.compile`` always. The cache lives
  outside the instance (a weak dictionary), so copies, pickles and ``state_dict`` never carry it.
  Measured at BLIP-2 dims on this project's 2-core CPU (loaded): the check costs ~40 us per call
  (60 tensors; ~0.2 ms for ``precision="bf16"``, which keys on every parameter), restacking the 6
  cross layers' K/V (52 MB fp32) 60-180 ms; under training the K/V restack is paid every step
  either way, and the self-attention projections stay three GEMMs.
* ``precision="bf16"`` (``vlmkernels.patch(..., precision="bf16")``): an fp32 Q-Former runs its
  kernels in bf16 (weights, activations and encoder states cast to bf16; the embeddings' LayerNorm
  stays fp32) and its output is cast back to fp32. Q-Formers in another dtype run as they are.
  Measured error (BLIP-2 dims: 12 layers, hidden 768, encoder 1408, 32 queries, HF random init,
  encoder states N(0, 1), Lk 257 and 577, batch 2, reference backend on CPU, 4 draws): the output
  (unit-variance LayerNorm rows) differs from HF's fp32 Q-Former by at most 0.063 absolute, 1.6% of
  max|fp32|, mean 0.0078; the fp32 patched path differs by 7.8e-7 of max|fp32|. The bound this
  package states and tests (tests/test_patch_qformer.py) is 2e-2 * max|fp32|. The bf16 kernels
  accumulate in fp32 like the reference; their bf16 dot products are proven only by a GPU run.
* python_ref Gemini ``MaskedAttention`` (self- and cross-modal attention alike): ``qkv`` ->
  ``attention(q, k, v, attn_mask=allowed)`` -> ``out``; a row with no allowed key gives zeros, the
  op's rule and the module's.

Classes are matched by name and module, so nothing here imports transformers or python_ref eagerly.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F

from .core import (PatchRule, SkipPatch, fused_activation, is_hf_class, is_python_ref_class, keeps_hf_code,
                   register_rule, require_backend)

FAMILY = "qformer"

# HF Q-Former class -> how its forward embeds the inputs
_HF_QFORMERS = {"Blip2QFormerModel": "blip2", "InstructBlipQFormerModel": "instructblip",
                "InstructBlipVideoQFormerModel": "instructblip"}
_OPS = ("attention", "qformer_cross_kv", "linear_residual_layernorm", "linear_gelu")
_RECORDED = ("output_attentions", "output_hidden_states")  # HF records these with module hooks

NOTE = ("output_attentions/output_hidden_states calls, non-2-D masks and backend='auto' on CPU tensors run "
        "HF's code; gradient-checkpointed layers are checkpointed around the patched layer")


def _ops():
    from .. import ops

    return ops


# ---- structure checks (patch time) --------------------------------------------------------------

def _check_linear(mod, what: str) -> None:
    if not isinstance(mod, torch.nn.Linear) or mod.bias is None:
        raise SkipPatch(f"{what} is not an nn.Linear with a bias")


def _check_output_block(block, what: str) -> None:
    """``*SelfOutput`` / ``*Output``: dense + dropout + LayerNorm(x + residual)."""
    _check_linear(getattr(block, "dense", None), f"{what}.dense")
    ln = getattr(block, "LayerNorm", None)
    if not isinstance(ln, torch.nn.LayerNorm) or ln.weight is None or ln.bias is None:
        raise SkipPatch(f"{what}.LayerNorm is not an affine nn.LayerNorm")
    if not isinstance(getattr(block, "dropout", None), torch.nn.Dropout):
        raise SkipPatch(f"{what}.dropout is not an nn.Dropout")


def _check_attention(att, what: str) -> None:
    mha = getattr(att, "attention", None)
    for name in ("query", "key", "value"):
        _check_linear(getattr(mha, name, None), f"{what}.attention.{name}")
    if mha.query.out_features != mha.num_attention_heads * mha.attention_head_size:
        raise SkipPatch(f"{what}: heads do not tile the hidden size")
    _check_output_block(getattr(att, "output", None), f"{what}.output")


def _check_ffn(inter, out, what: str) -> None:
    _check_linear(getattr(inter, "dense", None), f"{what}.dense")
    act = getattr(inter, "intermediate_act_fn", None)
    # GELUActivation is exact erf GELU (its python variant too); anything else is not what linear_gelu computes
    if fused_activation(act) != "gelu":
        raise SkipPatch(f"{what} activation {type(act).__name__} is not the exact (erf) GELU")
    _check_output_block(out, what.replace("intermediate", "output"))


def _check_qformer(qf) -> None:
    layers = getattr(getattr(qf, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise SkipPatch("no encoder.layer ModuleList")
    dtype = next(qf.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise SkipPatch(f"dtype {dtype} is not supported")
    for i, layer in enumerate(layers):
        _check_attention(layer.attention, f"layer {i} attention")
        if layer.has_cross_attention:
            _check_attention(layer.crossattention, f"layer {i} crossattention")
        _check_ffn(layer.intermediate_query, layer.output_query, f"layer {i} intermediate_query")
        if hasattr(layer, "intermediate"):
            _check_ffn(layer.intermediate, layer.output, f"layer {i} intermediate")


# ---- cached weights -----------------------------------------------------------------------------

# module -> (key, _Weights): see the module docstring ("Weights are read through self ...")
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _Weights:
    """What one call reads besides the parameters as they are: the stacked cross K/V weight and bias,
    and the parameters in the compute dtype ``dtype`` -- cast once here when ``cached`` (frozen
    weights), else cast as they are read (on the autograd graph, or traced by torch.compile). Cached
    ones also hold each self-attention's q/k/v projections stacked into one ``[3*D, D]`` GEMM
    (``qkv``, keyed by the attention module's id): two launches fewer per layer. Under training the
    three projections stay separate (a per-step stack would copy them every step)."""

    def __init__(self, qf, dtype: torch.dtype, cached: bool):
        self.dtype = dtype
        cross = [layer.crossattention.attention for layer in qf.encoder.layer if layer.has_cross_attention]
        self.casts = None
        if cached and dtype != _param_dtype(qf):  # the cross K/V weights are read only stacked
            stacked = {id(p) for m in cross for lin in (m.key, m.value) for p in lin.parameters()}
            self.casts = {id(p): p.to(dtype) for p in _walk_params(qf.encoder) if id(p) not in stacked}
        self.qkv = {}
        if cached:
            for layer in qf.encoder.layer:
                mha = layer.attention.attention
                lins = (mha.query, mha.key, mha.value)
                self.qkv[id(mha)] = (torch.cat([lin.weight for lin in lins]).to(dtype),
                                     torch.cat([lin.bias for lin in lins]).to(dtype))
        self.kv_weight = self.kv_bias = None
        if cross:
            from ..qformer.cross_kv import stack_cross_kv_weights

            w, b = stack_cross_kv_weights(cross)
            self.kv_weight, self.kv_bias = w.to(dtype), None if b is None else b.to(dtype)
        self.num_cross = len(cross)

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return p.to(self.dtype) if self.casts is None else self.casts[id(p)]


def _walk_params(module) -> list[torch.Tensor]:
    """Every parameter under ``module``, read from the modules' own dicts: the per-call cache check
    runs on the host before every forward, and ``nn.Module.parameters()`` / attribute access cost
    ~10x more (BLIP-2 dims: ~1 ms vs ~40 us for all parameters on this project's CPU)."""
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        out.extend(p for p in m._parameters.values() if p is not None)
        stack.extend(m._modules.values())
    return out


def _stacked_params(qf) -> list[torch.Tensor]:
    """The parameters :class:`_Weights` stacks (cross K/V, self-attention q/k/v), read as
    :func:`_walk_params` does."""
    out = []
    for layer in qf._modules["encoder"]._modules["layer"]._modules.values():
        blocks = [("attention", ("query", "key", "value"))]
        if layer.__dict__.get("has_cross_attention"):
            blocks.append(("crossattention", ("key", "value")))
        for block, names in blocks:
            mha = layer._modules[block]._modules["attention"]._modules
            out += [p for name in names for p in mha[name]._parameters.values() if p is not None]
    return out


def _param_dtype(qf) -> torch.dtype:
    return qf.encoder.layer[0].attention.attention.query.weight.dtype


def _weights(qf, dtype: torch.dtype) -> _Weights:
    """The call's :class:`_Weights`, cached per module while no gradient flows to the weights it
    derives (key: the parameters' storage, version counter and the dtype; measured costs in the
    module docstring)."""
    if torch.compiler.is_compiling():
        return _Weights(qf, dtype, cached=False)
    params = _stacked_params(qf)
    if dtype != params[0].dtype:
        params = _walk_params(qf._modules["encoder"])
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return _Weights(qf, dtype, cached=False)  # on the autograd graph: weights change every step
    key = (dtype, params[0].device, tuple((p.data_ptr(), p._version) for p in params))
    hit = _CACHE.get(qf)
    if hit is not None and hit[0] == key:
        return hit[1]
    w = _Weights(qf, dtype, cached=True)
    _CACHE[qf] = (key, w)
    return w


# ---- the patched encoder ------------------------------------------------------------------------

def _p(module) -> float:
    """A dropout module's p when it is active (training), else 0."""
    return module.p if module.training else 0.0


def _output_block(block, x, residual, W, backend):
    return _ops().linear_residual_layernorm(
        x, W(block.dense.weight), W(block.dense.bias), residual, W(block.LayerNorm.weight), W(block.LayerNorm.bias),
        block.LayerNorm.eps, _p(block.dropout), backend=backend)


def _ffn(inter, out, x, W, backend):
    return _output_block(out, _ops().linear_gelu(x, W(inter.dense.weight), W(inter.dense.bias), backend=backend),
                         x, W, backend)


def _heads(x, mha):
    return x.unflatten(-1, (mha.num_attention_heads, mha.attention_head_size))


def _attention_block(att, h, k, v, key_mask, W, backend):
    """``*Attention``: q (and, for self-attention, k, v) projections -> attention -> output block."""
    mha = att.attention
    qkv = W.qkv.get(id(mha)) if k is None else None
    if qkv is not None:  # self-attention, frozen weights: one GEMM, q/k/v are views of its output
        q, k, v = _heads(F.linear(h, *qkv).unflatten(-1, (3, -1)), mha).unbind(-3)
    else:
        q = _heads(F.linear(h, W(mha.query.weight), W(mha.query.bias)), mha)
        if k is None:  # self-attention
            k = _heads(F.linear(h, W(mha.key.weight), W(mha.key.bias)), mha)
            v = _heads(F.linear(h, W(mha.value.weight), W(mha.value.bias)), mha)
    o = _ops().attention(q, k, v, key_padding_mask=key_mask, scale=mha.scaling,
                         dropout_p=mha.attention_dropout if mha.training else 0.0, backend=backend)
    return _output_block(att.output, o.flatten(-2), h, W, backend)


def _layer_forward(layer, W, self_mask, cross_mask, query_length, backend, h, k, v):
    """One ``*QFormerLayer`` (tensors that may need gradients come last, positionally, for checkpointing)."""
    a = _attention_block(layer.attention, h, None, None, self_mask, W, backend)
    if query_length == 0:
        return _ffn(layer.intermediate, layer.output, a, W, backend)
    aq = a[:, :query_length]
    if layer.has_cross_attention:
        aq = _attention_block(layer.crossattention, aq, k, v, cross_mask, W, backend)
    out = _ffn(layer.intermediate_query, layer.output_query, aq, W, backend)
    if a.shape[1] > query_length:
        out = torch.cat([out, _ffn(layer.intermediate, layer.output, a[:, query_length:], W, backend)], dim=1)
    return out


def _compute_dtype(h, precision) -> torch.dtype:
    """The dtype the kernels run in: autocast's where it is on (HF's Linear layers run in it too),
    bf16 for an fp32 Q-Former under ``precision="bf16"``, else the Q-Former's own."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.bfloat16 if precision == "bf16" and h.dtype == torch.float32 else h.dtype


def _encoder(self, h, self_mask, enc, cross_mask, query_length, backend, precision):
    """The Q-Former encoder over embedded rows ``h`` -> last hidden state in the module's dtype."""
    dtype = _compute_dtype(h, precision)
    # the operands are cast to ``dtype`` here; autocast must not touch the ops' other outputs (the
    # attention op's fp32 logsumexp, saved for its backward)
    with torch.autocast(h.device.type, enabled=False):
        return _encoder_layers(self, h, self_mask, enc, cross_mask, query_length, backend, dtype)


def _encoder_layers(self, h, self_mask, enc, cross_mask, query_length, backend, dtype):
    out_dtype = h.dtype
    W = _weights(self, dtype)
    h = h.to(dtype)
    layers = self.encoder.layer
    kv = [None] * len(layers)
    if query_length > 0 and W.kv_weight is not None:
        enc = enc.to(dtype)
        # [cross layer, K|V, B, N, D]: views of one GEMM's output, read in place by attention
        stacked = _ops().qformer_cross_kv(enc, W.kv_weight, W.kv_bias, num_layers=W.num_cross,
                                          backend=_cross_kv_backend(backend))
        j = 0
        for i, layer in enumerate(layers):
            if layer.has_cross_attention:
                mha = layer.crossattention.attention
                kv[i] = (_heads(stacked[j, 0], mha), _heads(stacked[j, 1], mha))
                j += 1
    for layer, layer_kv in zip(layers, kv):
        k, v = layer_kv if layer_kv is not None else (None, None)
        run = functools.partial(_layer_forward, layer, W, self_mask, cross_mask, query_length, backend)
        if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            h = layer._gradient_checkpointing_func(run, h, k, v)
        else:
            h = run(h, k, v)
    return h.to(out_dtype)


def _runs_hf(self, backend, like, attention_mask, encoder_hidden_states, encoder_attention_mask, rows,
             query_length, kwargs) -> bool:
    """Whether this call must run HF's own forward (see the module docstring)."""
    if keeps_hf_code(backend, like):
        return True
    if any(kwargs.get(k, getattr(self.config, k, False)) for k in _RECORDED):
        return True
    if any(m is not None and m.dim() != 2 for m in (attention_mask, encoder_attention_mask)):
        return True
    layers = self.encoder.layer
    if query_length > 0 and encoder_hidden_states is None and any(l.has_cross_attention for l in layers):
        return True  # HF raises its own error
    return rows > query_length and not hasattr(layers[0], "intermediate")  # text rows, no text FFN: HF raises


def _output(self, seq, kwargs):
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions  # loaded: HF matched

    out = BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=seq, pooler_output=seq[:, 0, :])
    return out.to_tuple() if kwargs.get("return_dict", getattr(self.config, "return_dict", True)) is False else out


def _masks(attention_mask, encoder_attention_mask):
    return (None if attention_mask is None else attention_mask.bool(),
            None if encoder_attention_mask is None else encoder_attention_mask.bool())


def _blip2_forward(backend, precision):
    def forward(self, query_embeds, query_length=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, **kwargs):
        ql = query_length if query_length is not None else query_embeds.shape[1]
        if _runs_hf(self, backend, query_embeds, attention_mask, encoder_hidden_states, encoder_attention_mask,
                    query_embeds.shape[1], ql, kwargs):
            return type(self).forward(self, query_embeds, query_length=query_length, attention_mask=attention_mask,
                                      encoder_hidden_states=encoder_hidden_states,
                                      encoder_attention_mask=encoder_attention_mask, **kwargs)
        h = self.dropout(self.layernorm(query_embeds.to(self.layernorm.weight.dtype)))
        self_mask, cross_mask = _masks(attention_mask, encoder_attention_mask)
        seq = _encoder(self, h, self_mask, encoder_hidden_states, cross_mask, ql, backend, precision)
        return _output(self, seq, kwargs)

    return forward


def _instructblip_forward(backend, precision):
    def forward(self, input_ids, attention_mask=None, position_ids=None, query_embeds=None,
                encoder_hidden_states=None, encoder_attention_mask=None, **kwargs):
        like = query_embeds if query_embeds is not None else input_ids
        ql = query_embeds.shape[1] if query_embeds is not None else 0
        rows = ql + (input_ids.shape[1] if input_ids is not None else 0)
        if like is None or _runs_hf(self, backend, like, attention_mask, encoder_hidden_states,
                                    encoder_attention_mask, rows, ql, kwargs):
            return type(self).forward(self, input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      query_embeds=query_embeds, encoder_hidden_states=encoder_hidden_states,
                                      encoder_attention_mask=encoder_attention_mask, **kwargs)
        h = self.embeddings(input_ids=input_ids, position_ids=position_ids, query_embeds=query_embeds)
        self_mask, cross_mask = _masks(attention_mask, encoder_attention_mask)
        seq = _encoder(self, h, self_mask, encoder_hidden_states, cross_mask, ql, backend, precision)
        return _output(self, seq, kwargs)

    return forward


def _require_ops(ops, backend, like) -> None:
    from .. import registry

    for op in ops:
        if op not in registry.ops():
            raise SkipPatch(f"op {op} is not registered in this vlmkernels")
        require_backend(op, backend, like)


def _cross_kv_backend(backend: str) -> str:
    """``qformer_cross_kv`` is one dense GEMM whose only backend (``reference``: ``torch.addmm``) serves
    every device; a forced backend it lacks (``triton``) leaves it on ``auto`` while the other ops run
    on the forced one."""
    from .. import registry

    return backend if backend == "auto" or backend in registry.ops()["qformer_cross_kv"].impls else "auto"


def _build_hf_qformer(qf, backend, precision=None):
    _check_qformer(qf)
    _require_ops([op for op in _OPS if op != "qformer_cross_kv"], backend, next(qf.parameters()))
    _require_ops(["qformer_cross_kv"], _cross_kv_backend(backend), next(qf.parameters()))
    kind = _HF_QFORMERS[type(qf).__name__]
    make = _blip2_forward if kind == "blip2" else _instructblip_forward
    return {"forward": make(backend, precision)}


# ---- python_ref Gemini --------------------------------------------------------------------------

def _build_masked_attention(att, backend):
    _require_ops(("attention",), backend, att.qkv.weight)
    ops = _ops()

    def forward(self, x, allowed):
        if keeps_hf_code(backend, x):
            return type(self).forward(self, x, allowed)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        with torch.autocast(x.device.type, enabled=False):  # q, k, v share a dtype (autocast's, if on)
            o = ops.attention(q, k, v, attn_mask=allowed, backend=backend)
        return self.out(o.reshape(b, n, d))

    return {"forward": forward}


register_rule(PatchRule(FAMILY, "hf_qformer", match=lambda m: is_hf_class(m, _HF_QFORMERS),
                        build=_build_hf_qformer, options=("precision",), note=NOTE))
register_rule(PatchRule(FAMILY, "gemini_masked_attention",
                        match=lambda m: is_python_ref_class(m, "MaskedAttention"), build=_build_masked_attention))
