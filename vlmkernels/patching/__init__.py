"""The patch framework (core) and one module of rules per kernel family."""

from .core import PatchReport, PatchRule, SkipPatch, patch, patch_info, register_rule, unpatch

__all__ = ["PatchReport", "PatchRule", "SkipPatch", "patch", "patch_info", "register_rule", "unpatch"]
