"""Instance-level forward swapping, in the style of HF ``kernels``' kernelize.

A family registers :class:`PatchRule` objects with :func:`register_rule`. ``patch(obj)`` walks
``obj.named_modules()`` (or treats a non-module, e.g. an HF image processor, as one object), asks
each rule whether it matches, and binds the rule's replacement methods on the *instance*: classes
are never mutated and state (weights, buffers, state_dict keys) is untouched. The originals are
remembered on the instance so that :func:`unpatch` restores them exactly.

A patched object behaves like the original wherever a user touches it:

* ``copy.copy``, ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` give a copy that is
  patched the same way (``patch_info`` equal) and unpatches exactly. The instance gets its own
  ``__reduce_ex__``, which the three of them look up on the instance: it hands over the state with
  the patch removed plus the patch record, and the copy re-binds the rule's functions once its state
  is set. Copies in the same process reuse the functions (a rule's functions reach the instance
  only through ``self``); a pickle cannot carry functions, so loading re-runs the rule's ``build``
  (retried as the load restores further objects, for rules that look at another patched object).
  A loaded object whose rule declines (e.g. its forced backend is unavailable on this machine)
  comes back unpatched, and ``patch_info`` says so (None).
* What HF serializes never sees the patch: an object whose class has ``to_dict`` (image processors)
  gets an instance ``to_dict`` that drops the patch attributes, so ``print``, ``to_json_string`` and
  ``save_pretrained`` write what the unpatched object writes. Modules keep the patch out of their
  ``state_dict`` (plain attributes, no parameters or buffers).
"""

from __future__ import annotations

import copy
import logging
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from ..schemas import FAMILIES

log = logging.getLogger("vlmkernels")

_STATE_ATTR = "_vlmkernels_patch"  # the instance's _PatchState


class _PatchState:
    """What patch() bound on one instance: ``info`` ({"family", "rule", "backend"}), the rule's
    ``methods`` (unbound functions), the instance attributes that the bound names shadowed
    (``originals``; a name absent from it had none) and every name bound (``names``)."""

    def __init__(self, info: dict, methods: dict | None, originals: dict | None = None, names: tuple = ()):
        self.info, self.methods, self.originals, self.names = info, methods, originals or {}, names

    def __deepcopy__(self, memo):
        # functions are shared, not copied; originals may be bound to the instance: copy them with it
        return _PatchState(dict(self.info), self.methods, copy.deepcopy(self.originals, memo), self.names)

    def __reduce__(self):
        # a pickle carries the record only (closures do not pickle); loading rebuilds from the rule
        return _PatchState, (dict(self.info), None)


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


def keeps_hf_code(backend: str, t: torch.Tensor) -> bool:
    """Whether a patched forward runs the original (HF) code for this call: ``backend="auto"`` on CPU
    tensors, where no backend of ours beats HF's (bench e2e: the MoE experts and routers, the AnyRes
    pack) and a user patching a CPU model must not get a slower one. Decided per call, not at patch
    time, so a model patched on the CPU and moved to a GPU runs the kernels there; a forced backend
    (``"cpu"``, ``"reference"``, ...) always runs them."""
    return backend == "auto" and t.device.type == "cpu"


def is_hf_class(obj, names) -> bool:
    """Whether ``obj``'s class is one of the transformers model classes named in ``names`` (matched by name
    and module, so transformers is never imported here)."""
    cls = type(obj)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def is_python_ref_class(obj, name: str) -> bool:
    """Whether ``obj``'s class is python_ref's class ``name`` (matched by name and module)."""
    cls = type(obj)
    return cls.__name__ == name and cls.__module__.startswith("python_ref")


# activation classes (transformers.activations / torch.nn) by the fused activation each computes
ACT_CLASSES = {
    "silu": ("SiLUActivation", "SiLU"),
    "gelu": ("GELUActivation",),
    "gelu_tanh": ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "FastGELUActivation"),
    "relu": ("ReLU",),
}


def fused_activation(module) -> str | None:
    """The fused activation (``"silu"``, ``"gelu"`` = erf, ``"gelu_tanh"``, ``"relu"``) ``module`` computes,
    or None."""
    if isinstance(module, torch.nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    name = type(module).__name__
    return next((act for act, names in ACT_CLASSES.items() if name in names), None)


@dataclass
class PatchRule:
    """How one family accelerates one kind of object.

    ``match(obj)`` says whether the rule applies; ``build(obj, backend)`` returns
    ``{method_name: function}`` (unbound functions taking ``self`` first) or raises
    :class:`SkipPatch`. The functions may capture settings but must reach the instance's state only
    through ``self``: copies of the instance bind the same functions. Rules are tried in descending
    ``priority``; the first that matches an object decides for it.

    ``options`` names the keywords of :func:`patch` beyond ``backend`` that the rule reads (so far
    ``"precision"``): ``build`` then takes them as keyword arguments, they are kept in the patch
    record (copies and pickles rebuild with them) and shown in the report. Rules that do not list an
    option never see it. ``note`` is shown beside every module the rule patches (e.g. which calls
    still run the original code).
    """

    family: str
    name: str
    match: Callable[[Any], bool]
    build: Callable[..., dict[str, Callable]]
    priority: int = 0
    options: tuple[str, ...] = ()
    note: str = ""


# patch(precision=...): None runs every module in its own dtype; "bf16" lets rules that list the
# "precision" option run float32 modules' kernels in bfloat16 (casting inputs and outputs)
PRECISIONS = (None, "bf16")


def _patched_reason(rule: PatchRule, info: dict) -> str:
    """What the report shows beside a patched module: the options it runs with and the rule's note."""
    return "; ".join([f"{k}={info[k]}" for k in rule.options if k in info] + ([rule.note] if rule.note else []))


def _build(rule: PatchRule, obj, info: dict) -> dict[str, Callable]:
    """``rule.build`` with the backend and the options of the patch record ``info`` it reads."""
    return rule.build(obj, info["backend"], **{k: info[k] for k in rule.options if k in info})


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
    reason: str = ""  # skipped: why; patched: the options it runs with and the rule's note


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
        rows += [("patched", e.path or "<root>", e.cls, e.family, e.backend + (f"; {e.reason}" if e.reason else ""))
                 for e in self.patched]
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
    """Bind ``methods`` (and the copy / serialization hooks) on the unpatched instance ``obj``."""
    bound = dict(methods)
    bound["__reduce_ex__"] = _reduce_ex
    if callable(getattr(type(obj), "to_dict", None)):
        bound["to_dict"] = _to_dict
    d = obj.__dict__
    originals = {name: d[name] for name in bound if name in d}
    d[_STATE_ATTR] = _PatchState(info, methods, originals, tuple(bound))
    for name, fn in bound.items():
        d[name] = types.MethodType(fn, obj)


def _restore(obj) -> bool:
    d = getattr(obj, "__dict__", None)
    state = None if d is None else d.pop(_STATE_ATTR, None)
    if state is None:
        return False
    for name in state.names:
        d.pop(name, None)
    d.update(state.originals)
    return True


def _unpatched(d: dict, state: _PatchState) -> dict:
    """The instance dict ``d`` as it was before the patch described by ``state``."""
    out = {k: v for k, v in d.items() if k != _STATE_ATTR and k not in state.names}
    out.update(state.originals)
    return out


def _to_dict(self) -> dict:
    """HF's ``to_dict`` (deep copy of ``__dict__``) without the patch attributes."""
    out = type(self).to_dict(self)
    state = self.__dict__[_STATE_ATTR]
    for name in (_STATE_ATTR, *state.names):
        out.pop(name, None)
    out.update(copy.deepcopy(state.originals))
    return out


def _reduce_ex(self, protocol):
    """Copy / pickle a patched instance: the class's own reduction with the patch taken out of the
    state; the copy is created by :func:`_new_copy` and re-patched by :func:`_finish_copy`."""
    rv = type(self).__reduce_ex__(self, protocol)
    state = rv[2] if isinstance(rv, tuple) and len(rv) > 2 else None
    slots = None
    if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) from objects with __slots__
        state, slots = state
    if not isinstance(state, dict) or len(rv) > 5:  # a custom reduction we cannot take the patch out of
        raise TypeError(f"cannot copy a patched {type(self).__name__} (custom __reduce__); unpatch it first")
    func, args, _, *items = rv
    patch_state = self.__dict__[_STATE_ATTR]
    state = _unpatched(state, patch_state)
    return (_new_copy, (func, args), (state if slots is None else (state, slots), patch_state), *items)


def _new_copy(func, args):
    obj = func(*args)
    # the unpickler and copy look __setstate__ up on the instance: set the state, then re-patch
    obj.__dict__["__setstate__"] = types.MethodType(_finish_copy, obj)
    return obj


# objects loaded from a pickle whose rule declined while they were restored (it may depend on an
# object restored later in the same load, e.g. a module patched first by patch()); retried after each
# object that is re-patched
_PENDING: list[tuple[weakref.ref, dict]] = []


def _finish_copy(obj, packed) -> None:
    del obj.__dict__["__setstate__"]
    state, patch_state = packed
    setstate = getattr(type(obj), "__setstate__", None)
    if setstate is not None:
        setstate(obj, state)
    else:
        if isinstance(state, tuple):
            state, slots = state
            for k, v in slots.items():
                setattr(obj, k, v)
        obj.__dict__.update(state)
    if patch_state.methods is not None:  # a copy in this process: the same functions, no rebuild
        _bind(obj, patch_state.methods, patch_state.info)
    elif _rebuild(obj, patch_state.info):
        _retry_pending()
    else:
        _PENDING.append((weakref.ref(obj), patch_state.info))


def _rebuild(obj, info: dict) -> bool:
    rule = next((r for r in rules() if (r.family, r.name) == (info["family"], info["rule"])), None)
    try:
        if rule is None:
            raise SkipPatch(f"no rule {info['family']}.{info['rule']} in this vlmkernels")
        methods = _build(rule, obj, info)
    except SkipPatch as e:
        log.info("vlmkernels: the loaded %s is not patched (yet): %s", type(obj).__name__, e)
        return False
    _bind(obj, methods, dict(info))
    return True


def _retry_pending() -> None:
    progress = True
    while progress:
        progress = False
        for entry in list(_PENDING):
            obj = entry[0]()
            if obj is None or patch_info(obj) is not None:
                _PENDING.remove(entry)
            elif _rebuild(obj, entry[1]):
                _PENDING.remove(entry)
                progress = True


def patch_info(obj) -> dict | None:
    """``{"family", "rule", "backend"}`` (plus the options its rule reads, e.g. ``"precision"``, when
    given) when ``obj`` itself is patched, else None."""
    state = getattr(obj, "__dict__", {}).get(_STATE_ATTR)
    return None if state is None else dict(state.info)


def patch(obj, *, families: Iterable[str] | None = None, backend: str = "auto",
          precision: str | None = None) -> PatchReport:
    """Swap accelerated forwards onto the instances inside ``obj``; returns what was patched and skipped.

    Idempotent: a module already patched with the same rule, backend and options is left as it is
    (and still reported). ``backend`` is passed to every op the patched forwards call.
    ``precision`` (None or ``"bf16"``) is read by the rules that support it (the Q-Former rules: an
    fp32 module then runs its kernels in bf16); the others ignore it.
    """
    from ..registry import BACKENDS

    fams = tuple(FAMILIES if families is None else families)
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown families {bad}; choose from {FAMILIES}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    options = {} if precision is None else {"precision": precision}
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
            info = {"family": rule.family, "rule": rule.name, "backend": backend,
                    **{k: v for k, v in options.items() if k in rule.options}}
            entry = PatchEntry(path, type(sub).__name__, rule.family, rule.name, backend)
            patched_reason = _patched_reason(rule, info)
            if patch_info(sub) == info:
                entry.reason = patched_reason
                report.patched.append(entry)
                break
            try:
                methods = _build(rule, sub, info)
            except SkipPatch as e:
                entry.reason = str(e)
                report.skipped.append(entry)
                _restore(sub)  # an earlier patch with another backend must not linger
                break
            _restore(sub)  # re-patching with another backend starts from the original
            _bind(sub, methods, info)
            entry.reason = patched_reason
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
    """Restore every instance patched inside ``obj``; returns how many were restored (0, with a
    warning as :func:`patch` gives, when nothing inside ``obj`` was patched)."""
    restored = sum(_restore(sub) for _, sub in list(_iter_objects(obj)))
    if not restored:
        warnings.warn(f"vlmkernels.unpatch: nothing was patched in {type(obj).__name__}", stacklevel=2)
    return restored
