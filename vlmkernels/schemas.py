"""Every op schema of the package, in one place.

Each entry becomes ``torch.ops.vlmkernels.<name>``. Every schema ends with ``str backend="auto"``
so that a caller (or ``patch(backend=...)``) can force one implementation; the dispatcher in
:mod:`vlmkernels.library` routes the call to the backend registered in :mod:`vlmkernels.registry`.

Families add their ops here and nowhere else; kernels, fakes and autograd live in the family module.
"""

FAMILIES = ("qformer", "gated_fusion", "anyres", "moe")

# name -> (family, schema without the name)
SCHEMAS: dict[str, tuple[str, str]] = {
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
    "topk_select_tokens": (
        "moe",
        "(Tensor scores, Tensor tokens, int k, str backend=\"auto\") -> (Tensor, Tensor)",
    ),
    # --- AnyRes tile-and-encode ---------------------------------------------------------------
    # patch conv as a GEMM; epilogue: bias, class token row, position embeddings, optional LayerNorm
    # over D (applied when ln_eps is given; ln_weight/ln_bias are its optional affine).
    "patch_embed": (
        "anyres",
        "(Tensor pixels, Tensor weight, Tensor? bias=None, Tensor? class_embedding=None, "
        "Tensor? position_embedding=None, Tensor? ln_weight=None, Tensor? ln_bias=None, "
        "float? ln_eps=None, str backend=\"auto\") -> Tensor",
    ),
    # HF pack_image_features as one gather: plan is the int64 [num_images, 12] table built by
    # vlmkernels.anyres.pack.pack_plan; returns the packed rows of all images, [total_rows, C].
    "anyres_pack": (
        "anyres",
        "(Tensor features, Tensor plan, Tensor? newline, int total_rows, str backend=\"auto\") -> Tensor",
    ),
}
