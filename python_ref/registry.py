"""The architecture registry. Each ``python_ref/models/<name>.py`` registers itself with
:func:`register_architecture`; :func:`_load_all` imports them on first use."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

NAMES = (
    "clip", "llava_v1", "llava_v15", "llava_next", "llava_onevision",
    "blip2", "instructblip", "minigpt4", "minigpt5", "dynamic_qformer",
    "leo", "florence_vl", "dynamic_vision_selector",
    "gemini", "gpt4v", "claude",
)
SIZES = ("tiny", "small", "base")


@dataclass
class Architecture:
    name: str
    builder: Callable[..., torch.nn.Module]          # builder(size, **overrides) -> nn.Module
    inputs: Callable[..., dict]                       # inputs(model, batch_size, seed, size) -> dict
    source: str = "document"                          # "document" or "published" (HF class)
    variants: tuple[str, ...] = ()
    description: str = ""


class _Registry(dict):
    """Loads every model module before the first lookup, so the registry is always complete."""

    _loaded = False

    def _load(self):
        if not self._loaded:
            type(self)._loaded = True
            for name in NAMES:
                importlib.import_module(f"python_ref.models.{name}")

    def __getitem__(self, k):
        self._load()
        return super().__getitem__(k)

    def __iter__(self):
        self._load()
        return super().__iter__()

    def __len__(self):
        self._load()
        return super().__len__()

    def __contains__(self, k):
        self._load()
        return super().__contains__(k)

    def keys(self):
        self._load()
        return super().keys()

    def items(self):
        self._load()
        return super().items()

    def values(self):
        self._load()
        return super().values()


ARCHITECTURES: dict[str, Architecture] = _Registry()


def register_architecture(arch: Architecture) -> Architecture:
    if arch.name not in NAMES:
        raise ValueError(f"{arch.name!r} is not one of the document's architectures {NAMES}")
    dict.__setitem__(ARCHITECTURES, arch.name, arch)
    return arch


def build(name: str, size: str = "tiny", **overrides) -> torch.nn.Module:
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; choose from {sorted(NAMES)}")
    model = ARCHITECTURES[name].builder(size, **overrides)
    model.python_ref_name = name  # lets training.configure(model, stage=...) find the recipe
    return model


def example_inputs(name: str, batch_size: int = 2, seed: int = 0, size: str = "tiny", model=None) -> dict:
    """A batch (with ``labels``) for ``build(name, size)``; pass ``model`` to match its config."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; choose from {sorted(NAMES)}")
    return ARCHITECTURES[name].inputs(model, batch_size, seed, size)
