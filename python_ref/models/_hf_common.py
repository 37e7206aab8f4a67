"""Helpers shared by the architectures built on whole transformers systems (LLaVA family,
BLIP-2, InstructBLIP): override handling, seeded construction, and batches whose ``input_ids``
carry the image placeholder tokens the HF forward scatters visual features into."""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch

from .. import components as C


def pop_common(overrides: dict) -> tuple[Optional[int], Optional[str], dict, dict]:
    """Split ``build(...)`` overrides into (seed, attn_implementation, vision_config overrides,
    text_config overrides); what remains in ``overrides`` goes to the top-level HF config."""
    seed = overrides.pop("seed", 0)
    attn = overrides.pop("attn_implementation", None)
    vision = dict(overrides.pop("vision_config", None) or {})
    text = dict(overrides.pop("text_config", None) or {})
    return seed, attn, vision, text


def check_config_keys(config_cls, overrides: dict, arch: str) -> dict:
    """Reject overrides that are not fields of ``config_cls``: HF configs store unknown kwargs
    silently, so a typo would otherwise build the default model."""
    params = inspect.signature(config_cls.__init__).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    unknown = sorted(k for k in overrides if k not in named and not hasattr(config_cls, k))
    if named and unknown:
        raise TypeError(f"unknown {arch} overrides {unknown}: not fields of {config_cls.__name__}")
    return overrides


def construct(model_cls, config, attn: Optional[str], seed: Optional[int]):
    """``model_cls(config)`` with the attention backend set on every sub-config and seeded init."""
    impl = attn or C.DEFAULT_ATTN
    config._attn_implementation = impl
    for key in ("vision_config", "text_config", "qformer_config"):
        sub = getattr(config, key, None)
        if sub is not None:
            sub._attn_implementation = impl
    with C.seeded(seed):
        return model_cls(config)


def placeholder_batch(gen: torch.Generator, image_tokens: Sequence[Sequence[int]], text_len: int,
                      vocab_size: int, image_token_id: int, pad_token_id: int = 0, prompt_len: int = 2,
                      low: int = 3, placeholder_key: str = "input_ids") -> dict:
    """Token ids for HF models that scatter visual features into placeholder positions.

    ``image_tokens[b]`` lists the placeholder count of each image (or video) of sample ``b``; each
    image's run of ``image_token_id`` is followed by one text token (a separator), then come
    ``text_len`` text tokens. Samples are right-padded with ``pad_token_id`` (attention 0).
    Labels are -100 on placeholders, separators, the first ``prompt_len`` text tokens and padding.
    """
    rows, label_rows = [], []
    for counts in image_tokens:
        ids, lab = [], []
        for n in counts:
            sep = C.random_token_ids(gen, 1, 1, vocab_size, low=low, exclude=(image_token_id,))[0].tolist()
            ids += [image_token_id] * int(n) + sep
            lab += [C.IGNORE_INDEX] * (int(n) + 1)
        text = C.random_token_ids(gen, 1, text_len, vocab_size, low=low, exclude=(image_token_id,))[0].tolist()
        ids += text
        lab += [C.IGNORE_INDEX] * prompt_len + text[prompt_len:]
        rows.append(ids)
        label_rows.append(lab)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), C.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        input_ids[i, :len(r)] = torch.tensor(r)
        labels[i, :len(r)] = torch.tensor(lab)
        mask[i, :len(r)] = 1
    return {placeholder_key: input_ids, "attention_mask": mask, "labels": labels}


def random_image_sizes(gen: torch.Generator, n: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """``n`` (height, width) pairs in [lo, hi], aspect ratios deliberately varied."""
    hw = torch.randint(lo, hi + 1, (n, 2), generator=gen)
    return [(int(h), int(w)) for h, w in hw]
