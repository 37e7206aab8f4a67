"""Training: the design document's four strategies, and each system's published recipe as named stages.

The document's strategies (design document, "按训练策略分类"), for any python_ref architecture::

    configure(model, "alignment_pretrain")  # 模态对齐预训练: vision and LLM frozen, the fusion module trains
    configure(model, "instruction_tuning")  # 指令微调: fusion module + LLM train on instruction data, vision frozen
    configure(model, "end_to_end")          # 端到端训练: everything trains
    configure(model, "lora" | "qlora")      # 轻量级适配 (LoRA, QLoRA): peft LoRA adapters on the LLM's linear
                                            # layers (base weights frozen; 4-bit NF4 with "qlora"), fusion trains

Each system's recipe, with a learning rate per part and the data it expects::

    recipe("llava_v15")                                     # [Stage("pretrain", ...), Stage("finetune", ...)]
    groups = configure(model, stage="finetune", system="llava_v15")
    torch.optim.AdamW(groups)                               # one group per trained part, at its rate

``system`` defaults to the name :func:`python_ref.build` recorded on the model. Sources, per system:

- clip: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
  Sec. 2.5 and Table 20 (ViT-L/14: 4e-4 at 224 px, then one epoch at 336 px at 2e-5); openai/CLIP.
- llava_v1: Liu et al. 2023, "Visual Instruction Tuning", Sec. 4.1 and App. C; haotian-liu/LLaVA.
  The paper trains the projector in stage 2 too; the document's figure freezes it.
- llava_v15: Liu et al. 2024, "Improved Baselines with Visual Instruction Tuning", Table 9;
  haotian-liu/LLaVA scripts/v1_5/pretrain.sh and finetune.sh.
- llava_next: LLaVA-NeXT blog (llava-vl.github.io/blog/2024-01-30-llava-next), "Training": stage 2
  trains the full model, the vision tower at 2e-6 (mm_vision_tower_lr of LLaVA-VL/LLaVA-NeXT).
- llava_onevision: Li et al. 2024, "LLaVA-OneVision: Easy Visual Task Transfer", Sec. 4 and Table 3;
  LLaVA-VL/LLaVA-NeXT scripts/train/pretrain_clip.sh (projector, 1e-3) and finetune_ov.sh (full model
  at 1e-5, mm_vision_tower_lr 2e-6).
- blip2: Li et al. 2023, "BLIP-2", Sec. 3.2-3.4 (AdamW, peak 1e-4, both stages); salesforce/LAVIS
  lavis/projects/blip2/train/pretrain_stage1.yaml and pretrain_stage2.yaml (init_lr 1e-4). The document's figure freezes the Q-Former in stage 2; the
  paper trains it.
- instructblip: Dai et al. 2023, "InstructBLIP", Sec. 2.5 and 3 (peak 1e-5). The paper says "only the
  Q-Former"; LAVIS blip2_vicuna_instruct.py freezes only the ViT and the LLM, so llm_proj trains too.
- minigpt4: Zhu et al. 2023, "MiniGPT-4", Sec. 3 (the projection alone trains in both stages);
  Vision-CAIR/MiniGPT-4 train_configs/minigpt4_stage1_pretrain.yaml (init_lr 1e-4) and
  minigpt4_stage2_finetune.yaml (init_lr 3e-5).
- minigpt5, dynamic_qformer, leo, florence_vl, dynamic_vision_selector: these builds are the
  document's designs, so the recipe is the document's: alignment pre-training, then instruction tuning.
- gemini, gpt4v, claude: the document's "端到端架构" (end-to-end) systems: one end-to-end stage.
  The document states no learning rates, so document stages leave ``lr`` as None (the optimizer's
  default applies).

Which parameters are "vision", "fusion" and "llm": a model may declare ``PARTS = {part: patterns}``
(class or instance attribute); otherwise the HF attribute names below are used. A pattern matches a
parameter name that starts with it, with ``*`` as a wildcard (``fnmatch(name, pattern + "*")``).
Every parameter must match exactly one part, so a new submodule cannot silently escape a strategy.
LoRA adapters (peft) belong to the part of the layer they adapt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Optional

from torch import nn

__all__ = ["STRATEGIES", "PART_NAMES", "DEFAULT_PARTS", "Stage", "RECIPES", "recipe", "parts", "configure",
           "add_lora", "lora_layers", "is_adapter", "trainable_summary"]

# the document's four strategies; "lora" and "qlora" are both its lightweight adaptation (轻量级适配)
STRATEGIES = ("alignment_pretrain", "instruction_tuning", "end_to_end", "lora", "qlora")
PART_NAMES = ("vision", "fusion", "llm")

# HF attribute names: Llava*/LlavaNext/LlavaOnevision (model.*), Blip2/InstructBlip, CLIPModel
# (text tower counted as the language side, projections + logit scale as the fusion).
DEFAULT_PARTS = {
    "vision": ("vision_model.", "vision_tower.", "model.vision_tower."),
    "fusion": ("query_tokens", "qformer.", "language_projection.", "model.multi_modal_projector.",
               "model.image_newline", "multi_modal_projector.", "image_newline",
               "visual_projection.", "text_projection.", "logit_scale"),
    "llm": ("language_model.", "model.language_model.", "lm_head.", "text_model."),
}

# which parts each strategy trains (the LLM's LoRA adapters are added on top for lora/qlora)
_TRAINS = {
    "alignment_pretrain": ("fusion",),
    "instruction_tuning": ("fusion", "llm"),
    "end_to_end": ("vision", "fusion", "llm"),
    "lora": ("fusion",),
    "qlora": ("fusion",),
}
_LORA_HEADS = ("lm_head", "embed_out", "output_projection")


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe: ``lr`` maps each trained part to its peak learning rate (None: the
    source gives none); parts not in ``lr`` are frozen, and so are parameters matching ``exclude``."""

    name: str
    lr: Mapping[str, Optional[float]]
    data: str
    exclude: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.lr)


def _doc_stage(strategy: str, data: str) -> Stage:
    return Stage(strategy, {part: None for part in _TRAINS[strategy]}, data)


_DOC_TWO_STAGE = (
    _doc_stage("alignment_pretrain", "image-caption pairs (the document's LLaVA stage 1: CC3M, 595K pairs)"),
    _doc_stage("instruction_tuning", "visual instruction data (the document's LLaVA stage 2: 158K GPT-4-generated)"),
)
_DOC_END_TO_END = (_doc_stage("end_to_end", "multimodal data of every modality the model reads (unspecified)"),)
_LCS_558K = "LCS-558K: BLIP-captioned LAION/CC/SBU image-caption pairs, 1 epoch"

# The one table: system -> its stages (sources in the module docstring).
RECIPES: dict[str, tuple[Stage, ...]] = {
    "clip": (
        Stage("pretrain", dict.fromkeys(PART_NAMES, 4e-4),
              "WIT: 400M image-text pairs, symmetric InfoNCE, batch 32,768, 32 epochs at 224 px"),
        Stage("high_res", dict.fromkeys(PART_NAMES, 2e-5), "WIT, one more epoch at 336 px (ViT-L/14@336px)"),
    ),
    "llava_v1": (
        Stage("pretrain", {"fusion": 2e-3}, "CC3M filtered to 595K image-caption pairs, 1 epoch"),
        Stage("finetune", {"fusion": 2e-5, "llm": 2e-5}, "LLaVA-Instruct-158K (GPT-4-generated), 3 epochs"),
    ),
    "llava_v15": (
        Stage("pretrain", {"fusion": 1e-3}, _LCS_558K),
        Stage("finetune", {"fusion": 2e-5, "llm": 2e-5}, "llava_v1_5_mix665k: instructions + academic VQA, 1 epoch"),
    ),
    "llava_next": (
        Stage("pretrain", {"fusion": 1e-3}, _LCS_558K),
        Stage("finetune", {"vision": 2e-6, "fusion": 2e-5, "llm": 2e-5},
              "760K: LLaVA-1.5 mix + ShareGPT4V, LAION-GPT-V, DocVQA, SynDog, ChartQA, DVQA, AI2D (AnyRes)"),
    ),
    "llava_onevision": (
        Stage("stage1", {"fusion": 1e-3}, _LCS_558K),
        Stage("stage1.5", {"vision": 2e-6, "fusion": 1e-5, "llm": 1e-5},
              "4M high-quality knowledge data: re-captioned detailed descriptions, document/OCR, Chinese"),
        Stage("stage2_single_image", {"vision": 2e-6, "fusion": 1e-5, "llm": 1e-5},
              "3.2M single-image instructions"),
        Stage("stage2_onevision", {"vision": 2e-6, "fusion": 1e-5, "llm": 1e-5},
              "1.6M mixed single-image, multi-image and video (OneVision) instructions"),
    ),
    "blip2": (
        # the projection into the LLM only exists from stage 2 on
        Stage("representation", {"fusion": 1e-4},
              "129M image-text pairs (COCO, VG, CC3M, CC12M, SBU, LAION-115M with CapFilt); ITC + ITM + ITG "
              "losses on the Q-Former (its text side is not in HF's Blip2ForConditionalGeneration)",
              exclude=("language_projection.",)),
        Stage("generative", {"fusion": 1e-4}, "the same 129M pairs, language-modeling loss through the frozen LLM"),
    ),
    "instructblip": (
        Stage("instruction_tuning", {"fusion": 1e-5},
              "13 held-in of 26 datasets in instruction templates, from the BLIP-2 stage-2 checkpoint"),
    ),
    "minigpt4": (
        Stage("pretrain", {"fusion": 1e-4}, "~5M LAION + CC + SBU image-text pairs, 20k steps, batch 256"),
        Stage("finetune", {"fusion": 3e-5}, "3,500 curated image-description pairs in a conversation template, "
                                            "400 steps, batch 12"),
    ),
    **dict.fromkeys(("minigpt5", "dynamic_qformer", "leo", "florence_vl", "dynamic_vision_selector"), _DOC_TWO_STAGE),
    **dict.fromkeys(("gemini", "gpt4v", "claude"), _DOC_END_TO_END),
}


def recipe(name: str) -> list[Stage]:
    """The stages of system ``name``, in training order."""
    if name not in RECIPES:
        raise KeyError(f"no recipe for {name!r}; choose from {sorted(RECIPES)}")
    return list(RECIPES[name])


def _patterns(model: nn.Module) -> dict[str, tuple[str, ...]]:
    declared = getattr(model, "PARTS", None)
    pats = declared if declared else DEFAULT_PARTS
    missing = [p for p in PART_NAMES if p not in pats]
    if missing:
        raise ValueError(f"{type(model).__name__}.PARTS lacks {missing}")
    return {p: tuple(pats[p]) for p in PART_NAMES}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, p + "*") for p in patterns)


def _part_of(name: str, pats: dict[str, tuple[str, ...]]) -> list[str]:
    return [part for part, ps in pats.items() if _matches(name, ps)]


def parts(model: nn.Module) -> dict[str, list[str]]:
    """``{"vision": [...], "fusion": [...], "llm": [...]}``: the parameter names of each part.
    Raises ValueError when a parameter matches no part or several."""
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


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` belongs to a peft LoRA adapter (``...lora_A.<adapter>.weight``)."""
    return ".lora_" in name


def lora_layers(model: nn.Module) -> list[str]:
    """Names of the modules carrying peft LoRA adapters."""
    from peft.tuners.lora import LoraLayer

    return [name for name, mod in model.named_modules() if isinstance(mod, LoraLayer)]


def _llm_linears(model: nn.Module, exclude: Iterable[str]) -> list[str]:
    pats = _patterns(model)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and mod is not out_emb and name.rsplit(".", 1)[-1] not in exclude
            and _part_of(f"{name}.weight", pats) == ["llm"]]


def _quantize_4bit(model: nn.Module, names: list[str]) -> None:
    """Swap each named ``nn.Linear`` for a bitsandbytes NF4 ``Linear4bit`` holding its (frozen) weight."""
    import bitsandbytes as bnb

    for name in names:
        lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=lin.weight.dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
        q.bias = lin.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(lin.weight.device))  # .to() quantizes
    model.is_loaded_in_4bit = True  # as transformers marks 4-bit models: peft then wraps with its bnb LoRA layer


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, *,
             quantize: bool = False, exclude: Iterable[str] = _LORA_HEADS) -> list[str]:
    """peft LoRA adapters (adapter ``"default"``) on every ``nn.Linear`` of the LLM part but the output
    head, in place (parameter names gain ``base_layer`` / ``lora_A`` / ``lora_B``); ``quantize=True``
    first stores those layers' weights in 4-bit NF4 (QLoRA). A model that already carries adapters is
    left as it is. Returns the adapted module names."""
    from peft import LoraConfig, inject_adapter_in_model

    existing = lora_layers(model)
    if existing:
        return existing
    targets = _llm_linears(model, tuple(exclude))
    if not targets:
        raise ValueError(f"{type(model).__name__}: no nn.Linear in the LLM part to adapt")
    if quantize:
        _quantize_4bit(model, targets)
    # a full-match regex: peft's list form also matches any module whose name merely ends with a target
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="|".join(re.escape(t) for t in targets))
    inject_adapter_in_model(config, model)
    return targets


def _set_trainable(model: nn.Module, trained: set[str]) -> None:
    for name, p in model.named_parameters():
        if name in trained and not p.is_floating_point():
            raise ValueError(f"{name} is quantized ({p.dtype}) and cannot train")
        p.requires_grad_(name in trained)


def _group(params: dict, names: list[str], part: str, lr: Optional[float]) -> dict:
    group = {"name": part, "params": [params[n] for n in names]}
    if lr is not None:
        group["lr"] = lr
    return group


def _resolve_stage(model: nn.Module, stage, system: Optional[str]) -> Stage:
    if isinstance(stage, Stage):
        return stage
    system = system or getattr(model, "python_ref_name", None)
    if system is None:
        raise ValueError("pass system=<architecture name> (the model was not built by python_ref.build)")
    stages = {s.name: s for s in recipe(system)}
    if stage not in stages:
        raise ValueError(f"{system} has stages {list(stages)}, not {stage!r}")
    return stages[stage]


def configure(model: nn.Module, strategy: Optional[str] = None, *, stage=None, system: Optional[str] = None,
              lora_rank: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
              lora_train_fusion: bool = True) -> list[dict]:
    """Set ``requires_grad`` for a document strategy or a recipe stage; returns optimizer parameter
    groups (``{"name": part, "params": [...], "lr": rate}``, one per trained part, plus ``"lora"``
    for the adapters; no ``"lr"`` where the source states none).

    ``stage`` is a :class:`Stage` or a stage name of ``recipe(system)``. For ``"lora"``/``"qlora"``
    adapters are added in place first; ``lora_train_fusion=False`` leaves only the adapters training."""
    if (strategy is None) == (stage is None):
        raise ValueError("pass exactly one of strategy and stage")
    if stage is not None:
        st = _resolve_stage(model, stage, system)
        rates, exclude = dict(st.lr), st.exclude
    else:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy in ("lora", "qlora"):
            add_lora(model, lora_rank, lora_alpha, lora_dropout, quantize=strategy == "qlora")
        trains = [p for p in _TRAINS[strategy] if lora_train_fusion or strategy not in ("lora", "qlora")]
        rates, exclude = dict.fromkeys(trains), ()
    adapters = {n for n, _ in model.named_parameters() if is_adapter(n)} if strategy in ("lora", "qlora") else set()
    all_parts = parts(model)
    by_part = {part: [n for n in all_parts[part] if not _matches(n, exclude) and n not in adapters]
               for part in rates}
    _set_trainable(model, {n for names in by_part.values() for n in names} | adapters)
    params = dict(model.named_parameters())
    groups = [_group(params, names, part, rates[part]) for part, names in by_part.items()]
    if adapters:
        groups.append(_group(params, [n for n in params if n in adapters], "lora", None))
    return groups


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{part: (trainable parameter count, total parameter count)}``."""
    params = dict(model.named_parameters())
    return {part: (sum(params[n].numel() for n in names if params[n].requires_grad),
                   sum(params[n].numel() for n in names))
            for part, names in parts(model).items()}
