"""One small module per fusion point of the design document's architectures.

Each module owns exactly the math that a fused kernel replaces, so ``vlmkernels.patch()`` can swap its
``forward`` on the instance and parity can be checked module by module:

- :class:`SigmoidGate` -- two-encoder gate ``g = sigmoid(W[a;b] + c)``, ``g*a + (1-g)*b`` (minigpt5);
  ``variant="gmu"`` is the published gated multimodal unit (tanh projections, then the same mix).
- :class:`ExpertRouter` -- per-sample MLP logits -> fp32 softmax (-> top-k -> renormalise, MoVA-style),
  with an explicit per-row expert override (leo, dynamic_vision_selector).
- :class:`ExpertMix` -- ``sum_e w[b,e] * feats[b,e]`` (leo, dynamic_vision_selector).
- :class:`MultiGranularityFusion` -- channel concat -> projector (florence_vl), the document's
  LayerNorm design or the published DBFusion ``mlp3x_gelu``.
- :class:`TopKTokenSelector` -- top-k tokens by score (dynamic_qformer).

Where a module computes what one of the package's ops computes, its forward calls that op's reference
math (:mod:`python_ref.ops.fusion_gates`, :mod:`python_ref.ops.linear_epilogue`): ``SigmoidGate`` ->
``gated_fusion``, ``ExpertRouter`` -> ``vision_router`` (ReLU hidden activation), ``MultiGranularityFusion``
-> ``concat_linear`` (+ ``mlp_projector`` for DBFusion). Those accumulate in fp32 and round once, so a
bf16 module differs from a chain of bf16 ``nn.Linear``/sigmoid steps by about one bf16 ulp.

Attribute names (``gate``, ``router``, ``k``, ``num_experts``, ``top_k`` ...) are part of the contract
with the patch rules; keep them stable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .ops import topk_select_tokens
from .ops.fusion_gates import gated_fusion, vision_router
from .ops.linear_epilogue import concat_linear, mlp_projector

__all__ = [
    "SigmoidGate",
    "ExpertRouter",
    "ExpertMix",
    "MultiGranularityFusion",
    "TopKTokenSelector",
]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (the kernels accumulate in fp32), the input's own dtype for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


class SigmoidGate(nn.Module):
    """Element-wise gate between two encoders' features.

    ``variant="document"`` (the design document's MiniGPT-5 sketch; a GMU-style gate, not what the
    published MiniGPT-5 code does): ``g = sigmoid(gate([a; b]))``, ``out = g*a + (1-g)*b``. Both inputs
    must already have ``out_dim`` channels (``dim_a == dim_b == out_dim``).

    ``variant="gmu"`` (Arevalo et al. 2017, the published gated multimodal unit):
    ``h_a = tanh(proj_a(a))``, ``h_b = tanh(proj_b(b))``, ``g = sigmoid(gate([a; b]))``,
    ``out = g*h_a + (1-g)*h_b``; the inputs may have any widths.

    ``forward(a [..., dim_a], b [..., dim_b]) -> [..., out_dim]``; leading dims must match.
    """

    VARIANTS = ("document", "gmu")

    def __init__(self, dim_a: int, dim_b: int, out_dim: int | None = None, variant: str = "document",
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        out_dim = dim_a if out_dim is None else out_dim
        if variant == "document" and not (dim_a == dim_b == out_dim):
            raise ValueError(
                f"SigmoidGate(variant='document') mixes a and b element-wise, so dim_a, dim_b and out_dim "
                f"must be equal (got {dim_a}, {dim_b}, {out_dim}); use variant='gmu' for different widths")
        kw = dict(device=device, dtype=dtype)
        self.variant = variant
        self.dim_a, self.dim_b, self.out_dim = dim_a, dim_b, out_dim
        self.gate = nn.Linear(dim_a + dim_b, out_dim, bias=bias, **kw)  # W and c of g = sigmoid(W[a;b]+c)
        if variant == "gmu":
            self.proj_a = nn.Linear(dim_a, out_dim, bias=False, **kw)
            self.proj_b = nn.Linear(dim_b, out_dim, bias=False, **kw)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        _check_float("a", a)
        _check_float("b", b)
        if a.shape[:-1] != b.shape[:-1] or a.shape[-1] != self.dim_a or b.shape[-1] != self.dim_b:
            raise ValueError(f"expected a [..., {self.dim_a}] and b [..., {self.dim_b}] with equal leading dims, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        if a.dtype != b.dtype:
            raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
        mix_a = mix_b = None
        if self.variant == "gmu":
            mix_a, mix_b = torch.tanh(self.proj_a(a)), torch.tanh(self.proj_b(b))
        # python_ref.ops.fusion_gates: g = sigmoid(gate([a; b])), g*a + (1-g)*b in fp32, rounded once
        return gated_fusion(a, b, self.gate.weight, self.gate.bias, mix_a, mix_b)

    def extra_repr(self) -> str:
        return f"dim_a={self.dim_a}, dim_b={self.dim_b}, out_dim={self.out_dim}, variant={self.variant!r}"


class ExpertRouter(nn.Module):
    """Per-sample routing weights over ``num_experts`` vision experts.

    ``compute_logits(features [B, in_dim]) -> [B, E]``: Linear -> ReLU -> Linear (the document's LEO
    router; ``hidden=None`` uses ``in_dim``). ``forward(features, image_type=None) -> weights [B, E]``:
    softmax of the logits in fp32 (fp64 for fp64 features); with ``top_k`` set, the top-k probabilities
    renormalised to sum to 1 and zeros elsewhere (MoVA), via ``python_ref.ops.moe_topk_route``.
    ``image_type`` (int64 [B]) forces row ``b`` one-hot on expert ``image_type[b]`` (the document's
    explicit override); ``-1`` keeps the learned routing for that row. Weights are returned in the features' dtype (MoVA casts the same way).
    """

    def __init__(self, in_dim: int, num_experts: int, hidden: int | None = None, top_k: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        hidden = in_dim if hidden is None else hidden
        kw = dict(device=device, dtype=dtype)
        self.in_dim, self.num_experts, self.top_k = in_dim, num_experts, top_k
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, num_experts, **kw))

    def compute_logits(self, features: torch.Tensor) -> torch.Tensor:
        _check_float("features", features)
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features must be [B, {self.in_dim}], got {tuple(features.shape)}")
        return self.mlp(features)

    def forward(self, features: torch.Tensor, image_type: torch.Tensor | None = None) -> torch.Tensor:
        _check_float("features", features)
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"features must be [B, {self.in_dim}], got {tuple(features.shape)}")
        if image_type is not None:
            image_type = self._check_image_type(image_type, features.shape[0])
        first, last = self.mlp[0], self.mlp[2]
        # python_ref.ops.fusion_gates.vision_router: the MLP (ReLU), fp32 softmax, top-k, override
        return vision_router(features, first.weight, first.bias, last.weight, last.bias, self.top_k, "relu",
                             image_type)

    def _check_image_type(self, image_type, batch: int) -> torch.Tensor:
        if not isinstance(image_type, torch.Tensor) or image_type.dtype not in (torch.int32, torch.int64):
            raise TypeError("image_type must be an int64/int32 tensor of expert indices [B]")
        if image_type.shape != (batch,):
            raise ValueError(f"image_type must have shape [{batch}], got {tuple(image_type.shape)}")
        if not torch.compiler.is_compiling() and image_type.numel():
            lo, hi = int(image_type.min()), int(image_type.max())
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"image_type values must be in [-1, {self.num_experts - 1}], got [{lo}, {hi}]")
        return image_type.long()

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_experts={self.num_experts}, top_k={self.top_k}"


class ExpertMix(nn.Module):
    """Weighted sum of per-expert features: ``out[b] = sum_e weights[b, e] * feats[b, e]``.

    ``forward(expert_feats, weights [B, E]) -> [B, N, D]`` where ``expert_feats`` is a list of E tensors
    [B, N, D] or one tensor [B, E, N, D]. Accumulates in fp32 (fp64 for fp64 features) and returns the
    features' dtype.
    """

    def forward(self, expert_feats, weights: torch.Tensor) -> torch.Tensor:
        if isinstance(expert_feats, (list, tuple)):
            if not expert_feats:
                raise ValueError("expert_feats is empty")
            shapes = {tuple(f.shape) for f in expert_feats}
            if len(shapes) != 1:
                raise ValueError(f"all expert features must have the same shape [B, N, D], got {sorted(shapes)}")
            for i, f in enumerate(expert_feats):
                _check_float(f"expert_feats[{i}]", f)
            feats = torch.stack(list(expert_feats), dim=1)
        else:
            _check_float("expert_feats", expert_feats)
            feats = expert_feats
        _check_float("weights", weights)
        if feats.dim() != 4:
            raise ValueError(f"expert_feats must be E tensors [B, N, D] or one [B, E, N, D], got {tuple(feats.shape)}")
        if weights.shape != feats.shape[:2]:
            raise ValueError(f"weights must be [B, E] = {list(feats.shape[:2])}, got {list(weights.shape)}")
        acc = _accum_dtype(feats.dtype)
        out = (feats.to(acc) * weights.to(acc)[:, :, None, None]).sum(dim=1)
        return out.to(feats.dtype)


class MultiGranularityFusion(nn.Module):
    """Channel-concat fusion of same-length feature streams (florence_vl's coarse/fine/semantic).

    ``variant="document"``: concat -> Linear(sum(dims) -> hidden) -> LayerNorm -> GELU -> Linear(hidden -> out_dim)
    (``hidden`` defaults to ``dims[0]``, the document's ``hidden_dim``).
    ``variant="dbfusion"`` (published Florence-VL ``mlp3x_gelu``): concat -> Linear(sum(dims) -> out_dim) -> GELU
    -> Linear -> GELU -> Linear, no LayerNorm. GELU is the exact (erf) one in both.

    ``forward(*feats)`` with ``feats[i]`` of shape [B, N, dims[i]] -> [B, N, out_dim].
    """

    VARIANTS = ("document", "dbfusion")

    def __init__(self, dims: Sequence[int], out_dim: int, variant: str = "document", hidden: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        dims = tuple(int(d) for d in dims)
        if not dims or min(dims) < 1:
            raise ValueError(f"dims must be a non-empty list of positive widths, got {dims}")
        kw = dict(device=device, dtype=dtype)
        self.dims, self.out_dim, self.variant = dims, out_dim, variant
        if variant == "document":
            hidden = dims[0] if hidden is None else hidden
            self.proj = nn.Sequential(nn.Linear(sum(dims), hidden, **kw), nn.LayerNorm(hidden, **kw), nn.GELU(),
                                      nn.Linear(hidden, out_dim, **kw))
        else:
            self.proj = nn.Sequential(nn.Linear(sum(dims), out_dim, **kw), nn.GELU(),
                                      nn.Linear(out_dim, out_dim, **kw), nn.GELU(),
                                      nn.Linear(out_dim, out_dim, **kw))

    def forward(self, *feats: torch.Tensor) -> torch.Tensor:
        if len(feats) == 1 and isinstance(feats[0], (list, tuple)):
            feats = tuple(feats[0])
        if len(feats) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} feature tensors, got {len(feats)}")
        for i, (f, d) in enumerate(zip(feats, self.dims)):
            _check_float(f"feats[{i}]", f)
            if f.shape[-1] != d or f.shape[:-1] != feats[0].shape[:-1]:
                raise ValueError(f"feats[{i}] must be [..., {d}] with the same leading dims as feats[0] "
                                 f"{tuple(feats[0].shape[:-1])}, got {tuple(f.shape)}")
        first = self.proj[0]
        if self.variant == "dbfusion":  # concat -> Linear -> GELU, then Linear -> GELU -> Linear
            h = concat_linear(feats, first.weight, first.bias, "gelu")
            return mlp_projector(h, self.proj[2].weight, self.proj[2].bias, self.proj[4].weight, self.proj[4].bias,
                                 "gelu")
        return self.proj[1:](concat_linear(feats, first.weight, first.bias, "none"))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, out_dim={self.out_dim}, variant={self.variant!r}"


class TopKTokenSelector(nn.Module):
    """Keeps the ``k`` highest-scoring tokens of each row, via ``python_ref.ops.topk_select_tokens``.

    ``forward(scores [B, N], tokens [B, N, D]) -> (selected [B, k, D], index int64 [B, k])``; order is by
    score descending, ties to the lowest index; the gradient flows to ``tokens`` (not to ``scores``:
    callers that want the scorer trained multiply the selection by the gathered scores).
    """

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k

    def forward(self, scores: torch.Tensor, tokens: torch.Tensor):
        _check_float("scores", scores)
        _check_float("tokens", tokens)
        if scores.dim() != 2 or tokens.dim() != 3 or tokens.shape[:2] != scores.shape:
            raise ValueError(f"scores must be [B, N] and tokens [B, N, D], got {tuple(scores.shape)} "
                             f"and {tuple(tokens.shape)}")
        if self.k > scores.shape[1]:
            raise ValueError(f"k={self.k} exceeds the number of tokens N={scores.shape[1]}")
        selected, index = topk_select_tokens(scores, tokens, self.k)
        return selected, index.long()

    def extra_repr(self) -> str:
        return f"k={self.k}"
