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
    # --- end of Q-Former ops
    # --- Gated expert fusion (vlmkernels/gated_fusion) ------------------------------------------
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
    # gated fusion
    "fused_moe_backward": "fused_moe",
    "anyres_pack_backward": "anyres_pack",
    "anyres_plan_llava": "anyres_plan_batch",
    "anyres_encode_fused": "anyres_encode",
    "anyres_encode_fused_tiles": "anyres_encode",
}
