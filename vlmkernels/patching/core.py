"""Instance-level forward swapping, in the style of HF ``kernels``' kernelize.

A family registers :class:`PatchRule` objects with :func:`register_rule`. ``patch(obj)`` walks
``obj.named_modules()`` (or treats a non-module, e.g. an HF image processor, as one object), asks
each rule whether it matches, and binds the rule's replacement methods on the *instance*: classes
are never mutated and state (weights, buffers, state_dict keys) is untouched. The originals are
remembered on the instance so that :func:`unpatch` restores them exactly.
"""

from __future__ import annotations

import logging
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..schemas import FAMILIES

log = logging.getLogger("vlmkernels")

_STATE_ATTR = "_vlmkernels_patch"  # per-instance record: {method: (had_instance_attr, original)}
_MISSING = object()


class SkipPatch(Exception):
    """Raised by a rule's ``build`` when a matching module cannot be accelerated; the message is the reason."""


def require_backend(op: str, backend: str, like=None) -> None:
    """Skip (raise :class:`SkipPatch`) when a forced ``backend`` cannot run ``op`` -- on the device of
    the tensor ``like`` when given -- so that the module keeps its original forward instead of
    failing at its first call."""
    if backend == "auto":
        return
    from .. import registry

    if hasattr(like, "device"):
        ok, why = registry.availability(op, backend, like.device.type)
    else:
        ok, why = backend in registry.ops()[op].impls, f"{op} has no {backend!r} backend"
    if not ok:
        raise SkipPatch(f"backend {backend!r}: {why}")


@dataclass
class PatchRule:
    """How one family accelerates one kind of object.

    ``match(obj)`` says whether the rule applies; ``build(obj, backend)`` returns
    ``{method_name: function}`` (unbound functions taking ``self`` first) or raises
    :class:`SkipPatch`. Rules are tried in descending ``priority``; the first that matches an
    object decides for it.
    """

    family: str
    name: str
    match: Callable[[Any], bool]
    build: Callable[[Any, str], dict[str, Callable]]
    priority: int = 0


_RULES: list[PatchRule] = []


def register_rule(rule: PatchRule) -> PatchRule:
    if rule.family not in FAMILIES:
        raise ValueError(f"unknown family {rule.family!r}; families are {FAMILIES}")
    _RULES[:] = [r for r in _RULES if (r.family, r.name) != (rule.family, rule.name)]
    _RULES.append(rule)
    _RULES.sort(key=lambda r: -r.priority)
    return rule


def rules() -> list[PatchRule]:
    _load_family_rules()
    return list(_RULES)


def _load_family_rules() -> None:
    # Families register their rules on import; importing here keeps `import vlmkernels` cheap.
    import importlib

    for fam in FAMILIES:
        try:
            importlib.import_module(f"vlmkernels.patching.{fam}")
        except ModuleNotFoundError as e:
            if e.name != f"vlmkernels.patching.{fam}":
                raise


@dataclass
class PatchEntry:
    path: str
    cls: str
    family: str
    rule: str
    backend: str
    reason: str = ""


@dataclass
class PatchReport:
    patched: list[PatchEntry] = field(default_factory=list)
    skipped: list[PatchEntry] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.patched)

    def paths(self, family: str | None = None) -> list[str]:
        return [e.path for e in self.patched if family is None or e.family == family]

    def __str__(self) -> str:
        rows = [("status", "path", "class", "family", "backend / reason")]
        rows += [("patched", e.path or "<root>", e.cls, e.family, e.backend) for e in self.patched]
        rows += [("skipped", e.path or "<root>", e.cls, e.family, e.reason) for e in self.skipped]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        out = [f"vlmkernels.patch: {len(self.patched)} patched, {len(self.skipped)} skipped"]
        for r in rows:
            out.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        return "\n".join(out)

    __repr__ = __str__


def _iter_objects(obj) -> Iterable[tuple[str, Any]]:
    named = getattr(obj, "named_modules", None)
    if callable(named):
        yield from named()
    else:
        yield "", obj


def _bind(obj, methods: dict[str, Callable], info: dict) -> None:
    state = obj.__dict__.get(_STATE_ATTR)
    if state is None:
        state = obj.__dict__[_STATE_ATTR] = {"originals": {}, "info": info}
    state["info"] = info
    for name, fn in methods.items():
        if name not in state["originals"]:
            state["originals"][name] = obj.__dict__.get(name, _MISSING)
        obj.__dict__[name] = types.MethodType(fn, obj)


def _restore(obj) -> bool:
    state = obj.__dict__.pop(_STATE_ATTR, None)
    if state is None:
        return False
    for name, original in state["originals"].items():
        if original is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = original
    return True


def patch_info(obj) -> dict | None:
    """``{"family", "rule", "backend"}`` when ``obj`` itself is patched, else None."""
    state = getattr(obj, "__dict__", {}).get(_STATE_ATTR)
    return None if state is None else dict(state["info"])


def patch(obj, *, families: Iterable[str] | None = None, backend: str = "auto") -> PatchReport:
    """Swap accelerated forwards onto the instances inside ``obj``; returns what was patched and skipped.

    Idempotent: a module already patched with the same rule and backend is left as it is (and still
    reported). ``backend`` is passed to every op the patched forwards call.
    """
    from ..registry import BACKENDS

    fams = tuple(FAMILIES if families is None else families)
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown families {bad}; choose from {FAMILIES}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    active = [r for r in rules() if r.family in fams]
    report = PatchReport()
    for path, sub in list(_iter_objects(obj)):
        for rule in active:
            try:
                if not rule.match(sub):
                    continue
            except Exception as e:  # a matcher must never break patching of the rest
                log.debug("rule %s.%s failed to match %s: %s", rule.family, rule.name, path, e)
                continue
            entry = PatchEntry(path, type(sub).__name__, rule.family, rule.name, backend)
            info = {"family": rule.family, "rule": rule.name, "backend": backend}
            if patch_info(sub) == info:
                report.patched.append(entry)
                break
            try:
                methods = rule.build(sub, backend)
            except SkipPatch as e:
                entry.reason = str(e)
                report.skipped.append(entry)
                _restore(sub)  # an earlier patch with another backend must not linger
                break
            _restore(sub)  # re-patching with another backend starts from the original
            _bind(sub, methods, info)
            report.patched.append(entry)
            break
    if not report:
        warnings.warn(
            f"vlmkernels.patch: nothing was patched in {type(obj).__name__} (families={list(fams)})",
            stacklevel=2,
        )
    log.info("%s", report)
    return report


def unpatch(obj) -> int:
    """Restore every instance patched inside ``obj``; returns how many were restored."""
    return sum(_restore(sub) for _, sub in list(_iter_objects(obj)))
