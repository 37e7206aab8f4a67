"""The design document's four training strategies, applied to any python_ref architecture.

    configure(model, "alignment_pretrain")  # vision encoder and LLM frozen; only the fusion module trains
    configure(model, "instruction_tuning")  # fusion module + LLM train; vision frozen
    configure(model, "end_to_end")          # everything trains
    configure(model, "lora")                # LoRA adapters on the LLM's linear layers (base weights frozen),
                                            # fusion module trains (as in LLaVA's LoRA recipe), vision frozen

Which parameters are "vision", "fusion" and "llm": a model may declare ``PARTS = {part: patterns}``
(class or instance attribute); otherwise the HF attribute names below are used. A pattern matches a
parameter name that starts with it, with ``*`` as a wildcard (``fnmatch(name, pattern + "*")``).
Every parameter must match exactly one part, so a new submodule cannot silently escape a strategy.

LoRA is written here (no peft): each target ``nn.Linear`` is replaced by a :class:`LoRALinear` that
shares its weight and bias (state-dict keys unchanged, plus ``lora_A``/``lora_B``) and computes
``x W^T + b + (alpha / r) * dropout(x) A^T B^T`` with ``A`` Kaiming-uniform and ``B`` zero at init.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["STRATEGIES", "PART_NAMES", "DEFAULT_PARTS", "LoRALinear", "parts", "configure", "add_lora",
           "trainable_summary"]

STRATEGIES = ("alignment_pretrain", "instruction_tuning", "end_to_end", "lora")
PART_NAMES = ("vision", "fusion", "llm")

# HF attribute names: Llava*/LlavaNext/LlavaOnevision (model.*), Blip2/InstructBlip, CLIPModel
# (text tower counted as the language side, projections + logit scale as the fusion), MiniGPT-4.
DEFAULT_PARTS = {
    "vision": ("vision_model.", "vision_tower.", "model.vision_tower.", "ln_vision."),
    "fusion": ("query_tokens", "qformer.", "language_projection.", "model.multi_modal_projector.",
               "model.image_newline", "multi_modal_projector.", "image_newline", "projection.",
               "visual_projection.", "text_projection.", "logit_scale"),
    "llm": ("language_model.", "model.language_model.", "lm_head.", "text_model."),
}

# which parts each strategy trains (LoRA handled separately for the llm part)
_TRAINS = {
    "alignment_pretrain": {"fusion"},
    "instruction_tuning": {"fusion", "llm"},
    "end_to_end": {"vision", "fusion", "llm"},
    "lora": {"fusion"},
}


def _patterns(model: nn.Module) -> dict[str, tuple[str, ...]]:
    declared = getattr(model, "PARTS", None)
    pats = declared if declared else DEFAULT_PARTS
    missing = [p for p in PART_NAMES if p not in pats]
    if missing:
        raise ValueError(f"{type(model).__name__}.PARTS lacks {missing}")
    return {p: tuple(pats[p]) for p in PART_NAMES}


def _part_of(name: str, pats: dict[str, tuple[str, ...]]) -> list[str]:
    return [part for part, ps in pats.items() if any(fnmatchcase(name, p + "*") for p in ps)]


def parts(model: nn.Module) -> dict[str, list[str]]:
    """``{"vision": [...], "fusion": [...], "llm": [...]}``: the parameter names of each part.
    LoRA adapter parameters belong to the part of the layer they adapt. Raises ValueError when a
    parameter matches no part or several."""
    pats = _patterns(model)
    out = {p: [] for p in PART_NAMES}
    unmatched, ambiguous = [], []
    for name, _ in model.named_parameters():
        hit = _part_of(name, pats)
        if len(hit) == 1:
            out[hit[0]].append(name)
        else:
            (unmatched if not hit else ambiguous).append((name, hit))
    if unmatched or ambiguous:
        raise ValueError(f"{type(model).__name__}: parameters outside exactly one of {PART_NAMES}: "
                         f"unmatched {[n for n, _ in unmatched][:8]}, ambiguous {ambiguous[:8]}")
    return out


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update; shares the wrapped layer's weight and bias tensors."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """``W + (alpha / r) B A``: the weight of an equivalent plain Linear."""
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             exclude: Iterable[str] = ("lm_head", "embed_out", "output_projection")) -> list[str]:
    """Replace every ``nn.Linear`` of the LLM part (except output heads) by a :class:`LoRALinear`;
    returns the adapted module names. Layers that are already LoRA layers are left as they are."""
    pats = _patterns(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    adapted = []
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALinear) or mod is out_emb:
            continue
        if name.rsplit(".", 1)[-1] in exclude or _part_of(f"{name}.weight", pats) != ["llm"]:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(mod, rank, alpha, dropout))
        adapted.append(name)
    if not adapted and not any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__}: no nn.Linear in the LLM part to adapt")
    return adapted


def configure(model: nn.Module, strategy: str, *, lora_rank: int = 8, lora_alpha: float = 16.0,
              lora_dropout: float = 0.0, lora_train_fusion: bool = True) -> nn.Module:
    """Set ``requires_grad`` per the strategy (see the module docstring); returns ``model``.

    For ``"lora"``, adapters are added in place first; ``lora_train_fusion=False`` freezes the fusion
    module too, so only the adapters train."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "lora":
        add_lora(model, lora_rank, lora_alpha, lora_dropout)
    trains = set(_TRAINS[strategy])
    if strategy == "lora" and not lora_train_fusion:
        trains.discard("fusion")
    params = dict(model.named_parameters())
    for part, names in parts(model).items():
        for n in names:
            params[n].requires_grad_(part in trains)
    if strategy == "lora":
        for mod in model.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_A.requires_grad_(True)
                mod.lora_B.requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{part: (trainable parameter count, total parameter count)}``."""
    params = dict(model.named_parameters())
    return {part: (sum(params[n].numel() for n in names if params[n].requires_grad),
                   sum(params[n].numel() for n in names))
            for part, names in parts(model).items()}
