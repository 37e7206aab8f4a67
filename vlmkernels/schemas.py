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
}
