"""Every op schema of the package, in one place.

Each entry becomes ``torch.ops.vlmkernels.<name>``. Every schema ends with ``str backend="auto"``
so that a caller (or ``patch(backend=...)``) can force one implementation; the dispatcher in
:mod:`vlmkernels.library` routes the call to the backend registered in :mod:`vlmkernels.registry`.

Families add their ops here and nowhere else; kernels, fakes and autograd live in the family module.
"""

FAMILIES = ("qformer", "gated_fusion", "anyres", "moe")

# name -> (family, schema without the name)
SCHEMAS: dict[str, tuple[str, str]] = {
    # --- Q-Former cross-attention (vlmkernels/qformer) ------------------------------------------
    # GEMM + fused epilogue (vlmkernels/qformer/linear.py): LayerNorm(dropout(x Wᵀ + b) + residual) over
    # the last dim; keep_mask (bool, the output's shape) is the dropout keep-mask, kept values scaled by
    # 1/(1-dropout_p). The backward returns (dx, dW, db, d residual, d ln_weight, d ln_bias).
    "linear_residual_layernorm": (
        "qformer",
        "(Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? ln_weight, Tensor? ln_bias, "
        "float eps, Tensor? keep_mask=None, float dropout_p=0.0, str backend=\"auto\") -> Tensor",
    ),
    "linear_residual_layernorm_backward": (
        "qformer",
        "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor residual, Tensor? ln_weight, "
        "Tensor? ln_bias, float eps, Tensor? keep_mask=None, float dropout_p=0.0, str backend=\"auto\") "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
    # exact erf GELU(x Wᵀ + b); backward: (dx, dW, db)
    "linear_gelu": ("qformer", "(Tensor x, Tensor weight, Tensor? bias, str backend=\"auto\") -> Tensor"),
    "linear_gelu_backward": (
        "qformer",
        "(Tensor grad, Tensor x, Tensor weight, Tensor? bias, str backend=\"auto\") -> (Tensor, Tensor, Tensor)",
    ),
    # Q-Former attention (vlmkernels.qformer.attention): q [B,Lq,H,d], k/v [B,Lk,H,d] ([total_k,H,d] with
    # cu_seqlens_k int32 [B+1]); bool masks True = keep; dropout_mask drawn by the functional API.
    # Returns (out [B,Lq,H,d], lse float32 [B,H,Lq], +inf on rows without a kept key).
    "attention": (
        "qformer",
        "(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, Tensor? attn_mask=None, "
        "Tensor? cu_seqlens_k=None, float? scale=None, Tensor? dropout_mask=None, float dropout_p=0.0, "
        "str backend=\"auto\") -> (Tensor, Tensor)",
    ),
    # its vjp from the saved (out, lse): (dq, dk, dv)
    "attention_backward": (
        "qformer",
        "(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask=None, "
        "Tensor? attn_mask=None, Tensor? cu_seqlens_k=None, float? scale=None, Tensor? dropout_mask=None, "
        "float dropout_p=0.0, str backend=\"auto\") -> (Tensor, Tensor, Tensor)",
    ),
    # hoisted cross K/V of every cross-attention layer: encoder_states [B,N,E] @ weight[L*2*D, E].T + bias
    # -> [B, N, L*2*D] (vlmkernels.qformer.cross_kv views it as [L, 2, B, N, D])
    "qformer_cross_kv": (
        "qformer",
        "(Tensor encoder_states, Tensor weight, Tensor? bias=None, str backend=\"auto\") -> Tensor",
    ),
    # --- end of Q-Former ops
    # --- Gated expert fusion (vlmkernels/gated_fusion) ------------------------------------------
    # g*va + (1-g)*vb, g = sigmoid(cat(a, b) Wᵀ + bias); (va, vb) = (mix_a, mix_b) when given, else (a, b).
    # Backward: (da, db, dW, d bias, d mix_a, d mix_b).
    "gated_fusion": (
        "gated_fusion",
        "(Tensor a, Tensor b, Tensor weight, Tensor? bias, Tensor? mix_a=None, Tensor? mix_b=None, "
        "str backend=\"auto\") -> Tensor",
    ),
    "gated_fusion_backward": (
        "gated_fusion",
        "(Tensor grad, Tensor a, Tensor b, Tensor weight, Tensor? bias, Tensor? mix_a=None, Tensor? mix_b=None, "
        "str backend=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
    # sum_i gate[b, i] (features_i[b] W_iᵀ + b_i); backward: (d features, d gate, d weights, d biases)
    "expert_mix": (
        "gated_fusion",
        "(Tensor[] features, Tensor gate, Tensor[] weights, Tensor[]? biases=None, str backend=\"auto\") -> Tensor",
    ),
    "expert_mix_backward": (
        "gated_fusion",
        "(Tensor grad, Tensor[] features, Tensor gate, Tensor[] weights, Tensor[]? biases=None, "
        "str backend=\"auto\") -> (Tensor[], Tensor, Tensor[], Tensor[])",
    ),
    # Linear -> act -> Linear -> fp32 softmax (-> top-k, renormalise); image_type >= 0 forces a one-hot row.
    # Backward (gate = the forward's output, whose nonzeros are the selected experts):
    # (d pooled, d w1, d b1, d w2, d b2)
    "vision_router": (
        "gated_fusion",
        "(Tensor pooled, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int? top_k=None, str activation=\"gelu\", "
        "Tensor? image_type=None, str backend=\"auto\") -> Tensor",
    ),
    "vision_router_backward": (
        "gated_fusion",
        "(Tensor grad, Tensor gate, Tensor pooled, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, int? top_k=None, "
        "str activation=\"gelu\", Tensor? image_type=None, str backend=\"auto\") "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
    # act(cat(features, -1) Wᵀ + b) without the concat; backward: (d features, dW, db)
    "concat_linear": (
        "gated_fusion",
        "(Tensor[] features, Tensor weight, Tensor? bias, str activation=\"none\", str backend=\"auto\") -> Tensor",
    ),
    "concat_linear_backward": (
        "gated_fusion",
        "(Tensor grad, Tensor[] features, Tensor weight, Tensor? bias, str activation=\"none\", "
        "str backend=\"auto\") -> (Tensor[], Tensor, Tensor)",
    ),
    # group i = act(features_i W_iᵀ + b_i) written into column blocks or interleaved token slots;
    # backward: (d features, d weights, d biases)
    "split_linear": (
        "gated_fusion",
        "(Tensor[] features, Tensor[] weights, Tensor[]? biases=None, str activation=\"none\", "
        "str layout=\"channel_concat\", str backend=\"auto\") -> Tensor",
    ),
    "split_linear_backward": (
        "gated_fusion",
        "(Tensor grad, Tensor[] features, Tensor[] weights, Tensor[]? biases=None, str activation=\"none\", "
        "str layout=\"channel_concat\", str backend=\"auto\") -> (Tensor[], Tensor[], Tensor[])",
    ),
    # Linear -> act -> Linear with bias+act in the first GEMM's epilogue; backward: (dx, dW1, db1, dW2, db2)
    "mlp_projector": (
        "gated_fusion",
        "(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation=\"gelu\", "
        "str backend=\"auto\") -> Tensor",
    ),
    "mlp_projector_backward": (
        "gated_fusion",
        "(Tensor grad, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation=\"gelu\", "
        "str backend=\"auto\") -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    ),
    # --- end of gated fusion ops
    # --- MoE top-k routing -------------------------------------------------------------------
    "moe_topk_route": (
        "moe",
        "(Tensor logits, int top_k, str scoring=\"softmax\", bool renormalize=True, "
        "Tensor? bias=None, int num_groups=1, int topk_groups=1, str group_score=\"top2_sum\", "
        "float scaling_factor=1.0, ScalarType weights_dtype=float32, str backend=\"auto\") "
        "-> (Tensor, Tensor)",
    ),
    "moe_align_block_size": (
        "moe",
        "(Tensor ids, int num_experts, int block_size, Tensor? expert_map=None, "
        "str backend=\"auto\") -> (Tensor, Tensor, Tensor)",
    ),
    "fused_moe": (
        "moe",
        "(Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor weights, Tensor ids, "
        "str activation=\"silu\", str backend=\"auto\") -> Tensor",
    ),
    # vjp of fused_moe: (grad hidden, grad gate_up_proj, grad down_proj, grad weights)
    "fused_moe_backward": (
        "moe",
        "(Tensor grad, Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor weights, Tensor ids, "
        "str activation=\"silu\", str backend=\"auto\") -> (Tensor, Tensor, Tensor, Tensor)",
    ),
    "topk_select_tokens": (
        "moe",
        "(Tensor scores, Tensor tokens, int k, str backend=\"auto\") -> (Tensor, Tensor)",
    ),
    # --- AnyRes tile-and-encode ---------------------------------------------------------------
    # uint8 images -> normalized tiles. images: uint8 [H, W, C] views (any strides, C in 1/3/4);
    # plan: CPU int64 [num_images, 8] table (resized_h, resized_w, pad_top, pad_left, rows, cols,
    # first output tile, parts) built by vlmkernels.anyres.tile.tile_views; image i is the next
    # `parts` entries of images stacked along their rows (several: an image held in separate memory
    # blocks, e.g. a large PIL image read in place); returns [num_tiles, 3, S, S] (out_dtype=uint8:
    # the rounded tile bytes, mean/std unused).
    "anyres_tile": (
        "anyres",
        "(Tensor[] images, Tensor plan, int num_tiles, int tile_size, float[] mean, float[] std, "
        "bool global_view=True, ScalarType out_dtype=float32, str backend=\"auto\") -> Tensor",
    ),
    # LLaVA grid choice for many images: sizes int64 [n, 2] (H, W), pinpoints int64 [m, 2] (H, W);
    # returns int64 [n, 10]: best_h, best_w, resized_h, resized_w, pad l, t, r, b, rows, cols.
    "anyres_plan_llava": (
        "anyres",
        "(Tensor sizes, Tensor pinpoints, int tile_size, str backend=\"auto\") -> Tensor",
    ),
    # patch conv as a GEMM; epilogue: bias, class token row, position embeddings, optional LayerNorm
    # over D (applied when ln_eps is given; ln_weight/ln_bias are its optional affine).
    "patch_embed": (
        "anyres",
        "(Tensor pixels, Tensor weight, Tensor? bias=None, Tensor? class_embedding=None, "
        "Tensor? position_embedding=None, Tensor? ln_weight=None, Tensor? ln_bias=None, "
        "float? ln_eps=None, str backend=\"auto\") -> Tensor",
    ),
    # the same from uint8 tiles [N, C, H, W] (any strides): lut float32 [C, 256] maps each uint8 value
    # to its normalized pixel (so any normalization rule is matched exactly); no float tiles in memory.
    "patch_embed_uint8": (
        "anyres",
        "(Tensor tiles, Tensor lut, Tensor weight, Tensor? bias=None, Tensor? class_embedding=None, "
        "Tensor? position_embedding=None, Tensor? ln_weight=None, Tensor? ln_bias=None, "
        "float? ln_eps=None, str backend=\"auto\") -> Tensor",
    ),
    # one-kernel tile-and-encode (vlmkernels.anyres.encode_fused): src = all images' bytes, flat
    # uint8; desc = CPU int64 [num_tiles, 15] per-tile descriptors; taps = CPU int32 tap rows; lut
    # float [3, 256]; returns [num_tiles, (S//p)**2 (+1), D] like patch_embed_uint8 of the tiles.
    "anyres_encode_fused": (
        "anyres",
        "(Tensor src, Tensor desc, Tensor taps, Tensor lut, int tile_size, Tensor weight, Tensor? bias=None, "
        "Tensor? class_embedding=None, Tensor? position_embedding=None, Tensor? ln_weight=None, "
        "Tensor? ln_bias=None, float? ln_eps=None, str backend=\"auto\") -> Tensor",
    ),
    # the uint8 tiles [num_tiles, 3, S, S] those tables describe (the fused op's backward recomputes them)
    "anyres_encode_fused_tiles": (
        "anyres",
        "(Tensor src, Tensor desc, Tensor taps, int tile_size, str backend=\"auto\") -> Tensor",
    ),
    # HF pack_image_features as one gather: plan is the int64 [num_images, 12] table built by
    # vlmkernels.anyres.pack.pack_plan; returns the packed rows of all images, [total_rows, C].
    "anyres_pack": (
        "anyres",
        "(Tensor features, Tensor plan, Tensor? newline, int total_rows, str backend=\"auto\") -> Tensor",
    ),
    # its vjp: (grad of features [T, P, C], grad of newline [C]; zeros when newline was None)
    "anyres_pack_backward": (
        "anyres",
        "(Tensor grad, Tensor features, Tensor plan, Tensor? newline, str backend=\"auto\") -> (Tensor, Tensor)",
    ),
}

# Ops that no vlmkernels.ops function of the same name exposes, and the public function that uses them
# (backward passes run through the forward's autograd; batched helpers sit behind a friendlier API).
SERVED_BY: dict[str, str] = {
    # Q-Former
    "attention_backward": "attention",
    "linear_residual_layernorm_backward": "linear_residual_layernorm",
    "linear_gelu_backward": "linear_gelu",
    # gated fusion
    "gated_fusion_backward": "gated_fusion",
    "expert_mix_backward": "expert_mix",
    "vision_router_backward": "vision_router",
    "concat_linear_backward": "concat_linear",
    "split_linear_backward": "split_linear",
    "mlp_projector_backward": "mlp_projector",
    "fused_moe_backward": "fused_moe",
    "anyres_pack_backward": "anyres_pack",
    "anyres_plan_llava": "anyres_plan_batch",
    "anyres_encode_fused": "anyres_encode",
    "anyres_encode_fused_tiles": "anyres_encode",
}
