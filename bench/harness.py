"""What a benchmark case is, and the loop that times every provider of every case.

A family adds its benches in ONE place, ``bench/suites/<family>.py``, whose
``cases(full: bool, device: str) -> list[Case]`` lists them. A case names its op, shape
parameters, dtype and mode, and maps provider names to zero-argument callables; ``baseline``
names the provider every ratio is taken against (ratio = baseline time / provider time, both from
this run). Providers named ``ours-<backend>`` are this package's backends.

Inputs live in :class:`Inputs` objects: built lazily when the case runs, released after it, and
rotated across several sets on the GPU so repeated calls do not read them from L2.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import timing

MODES = ("fwd", "bwd", "fwd+bwd")
OURS_PREFIX = "ours-"


class SkipSuite(Exception):
    """Raised by a suite's ``cases`` when nothing in it can run here (the reason is printed)."""


class Inputs:
    """Rotating input sets for one case: ``inputs()`` returns the next set.

    ``make(i)`` builds set ``i`` (fresh random data); ``nbytes`` is one set's size, which decides
    how many sets the harness keeps so that the sets together exceed the L2 cache.
    """

    def __init__(self, make: Callable[[int], Any], nbytes: int = 0, uses: int = 1):
        self.make = make
        self.nbytes = int(nbytes)
        self.count = 1
        self.uses = uses  # cases sharing these inputs (e.g. a model timed fwd, then fwd+bwd)
        self._sets: list | None = None
        self._i = 0

    def configure(self, count: int) -> None:
        count = max(1, int(count))
        if count != self.count:
            self.count = count
            self._sets = None
        self._i = 0

    def __call__(self):
        if self._sets is None:
            self._sets = [self.make(i) for i in range(self.count)]
        s = self._sets[self._i]
        self._i = (self._i + 1) % self.count
        return s

    def first(self):
        """Set 0 without advancing the rotation (for providers that pre-build state)."""
        if self._sets is None:
            self._sets = [self.make(i) for i in range(self.count)]
        return self._sets[0]

    def release(self) -> None:
        """Called after each case that uses these inputs; frees them after the last one."""
        self.uses -= 1
        if self.uses <= 0:
            self._sets = None
            self._i = 0


@dataclass
class Case:
    op: str
    family: str
    shape: dict[str, Any]
    dtype: str
    providers: dict[str, Callable[[], Any]]
    baseline: str
    mode: str = "fwd"
    x: str | None = None                 # the shape key plots use as their x axis
    nbytes: float | None = None          # fewest bytes one call must move (roofline)
    flops: float | None = None           # arithmetic one call must do (roofline)
    inputs: list[Inputs] = field(default_factory=list)
    timing: str = "auto"                 # GPU: "auto" (graph if all providers capture), "events", or
                                         # "host" (wall time of back-to-back calls, as on the CPU)
    compare: str = "ratio"               # table: "ratio" baseline/ours, or "difference" ours - baseline
    note: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.compare not in ("ratio", "difference"):
            raise ValueError(f"compare must be 'ratio' or 'difference', got {self.compare!r}")
        if self.baseline not in self.providers:
            raise ValueError(f"baseline {self.baseline!r} is not among providers {list(self.providers)}")

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())

    @property
    def x_value(self):
        return self.shape.get(self.x) if self.x else None


@dataclass
class Result:
    case: Case
    provider: str
    metric: str          # "time" (seconds) or "peak_memory" (bytes)
    p50: float
    p20: float
    p80: float
    rounds: int = 0
    method: str = ""
    speedup: float | None = None
    roofline: float | None = None


@dataclass
class RunConfig:
    device: str
    full: bool = False
    budget_s: float | None = None       # measuring time per provider
    time_limit_s: float | None = None   # start no new case after this many seconds (results kept)
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
    failures: list[str] = field(default_factory=list)   # "case provider: error" of this run

    def provider_budget(self) -> float:
        if self.budget_s is not None:
            return self.budget_s
        if self.device == "cuda":
            return 0.3 if self.full else 0.1
        return 1.0 if self.full else 0.25


def _format_difference(s: float) -> str:
    return ("+" if s >= 0 else "-") + _format_time(abs(s))


def rotation_sets(nbytes: int, device: str) -> int:
    """Enough input sets to exceed 3x the L2 cache on the GPU (at most 32); one set on CPU."""
    if device != "cuda" or nbytes <= 0:
        return 1
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    return int(min(32, max(1, math.ceil(3 * l2 / nbytes))))


def _format_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _time_case_cuda(case: Case, cfg: RunConfig, n_sets: int) -> dict[str, timing.Sample | Exception]:
    budget = cfg.provider_budget()
    out: dict[str, timing.Sample | Exception] = {}
    graphs = {}
    if case.timing == "auto":
        n_calls = n_sets * max(1, math.ceil(8 / n_sets))  # amortize the replay's own overhead
        for name, fn in case.providers.items():
            g = timing.capture_graph(fn, n_calls)
            if g is None:
                graphs = {}
                break
            graphs[name] = g
        if graphs:
            for name, g in graphs.items():
                out[name] = timing.time_cuda_graph(g, n_calls, budget_s=budget)
            return out
    for name, fn in case.providers.items():
        try:
            out[name] = timing.time_cuda_events(fn, budget_s=budget)
        except Exception as e:  # noqa: BLE001 - one failing provider must not stop the run
            out[name] = e
    return out


def run_case(case: Case, cfg: RunConfig, ceilings: timing.Ceilings | None) -> list[Result]:
    n_sets = 1
    for inp in case.inputs:
        n_sets = max(n_sets, rotation_sets(inp.nbytes, cfg.device))
    for inp in case.inputs:
        inp.configure(n_sets)
    samples: dict[str, timing.Sample | Exception] = {}
    try:
        if cfg.device == "cuda" and case.timing != "host":
            samples = _time_case_cuda(case, cfg, n_sets)
        else:
            samples = timing.time_cpu_interleaved(case.providers, budget_s=cfg.provider_budget())
            if cfg.device == "cuda":
                torch.cuda.synchronize()
        mem: dict[str, float] = {}
        if cfg.device == "cuda":
            for name, fn in case.providers.items():
                if not isinstance(samples.get(name), Exception):
                    try:
                        mem[name] = timing.peak_memory_cuda(fn)
                    except Exception:  # noqa: BLE001
                        pass
    finally:
        for inp in case.inputs:
            inp.release()
        if cfg.device == "cuda":
            torch.cuda.empty_cache()

    base = samples.get(case.baseline)
    base_t = base.p50 if isinstance(base, timing.Sample) else None
    floor = None
    if ceilings is not None and (case.nbytes or case.flops):
        floor = max((case.nbytes or 0) / ceilings.bandwidth, (case.flops or 0) / ceilings.matmul)
    results = []
    for name, s in samples.items():
        if isinstance(s, Exception):
            msg = f"{type(s).__name__}: {str(s).splitlines()[0][:160] if str(s) else ''}"
            cfg.log(f"    {name}: FAILED {msg}")
            cfg.failures.append(f"{case.op} {case.shape_str} {case.mode} {name}: {msg}")
            continue
        r = Result(case, name, "time", s.p50, s.p20, s.p80, s.rounds, s.method)
        if base_t is not None:
            r.speedup = base_t / s.p50
        if floor:
            r.roofline = floor / s.p50
        results.append(r)
        if name in mem:
            results.append(Result(case, name, "peak_memory", mem[name], mem[name], mem[name], 1, "max_memory_allocated"))
    return results


def run_cases(cases: list[Case], cfg: RunConfig, ceilings: timing.Ceilings | None = None) -> list[Result]:
    results: list[Result] = []
    t_start = time.perf_counter()
    for i, case in enumerate(cases, 1):
        elapsed = time.perf_counter() - t_start
        if cfg.time_limit_s is not None and elapsed > cfg.time_limit_s:
            cfg.log(f"time limit of {cfg.time_limit_s:.0f} s reached: {len(cases) - i + 1} cases not run")
            break
        cfg.log(f"[{i}/{len(cases)} {elapsed:6.1f}s] {case.family}/{case.op} {case.shape_str} {case.dtype} {case.mode}")
        rs = run_case(case, cfg, ceilings)
        for r in rs:
            if r.metric != "time":
                continue
            extra = f"  x{r.speedup:.2f}" if r.speedup is not None else ""
            if r.speedup is not None and case.compare == "difference":
                extra = f"  {_format_difference(r.p50 - r.p50 * r.speedup)}"
            roof = f"  roofline {100 * r.roofline:.0f}%" if r.roofline is not None else ""
            cfg.log(f"    {r.provider:<28} {_format_time(r.p50):>10}{extra}{roof}")
        results.extend(rs)
    return results


def filter_cases(cases: list[Case], ops: list[str] | None) -> list[Case]:
    """Cases whose op is in ``ops``; ``moe_topk_route`` also selects its ``[grouped]`` variant."""
    if not ops:
        return cases
    return [c for c in cases if c.op in ops or c.op.split("[", 1)[0] in ops]


def format_table(results: list[Result]) -> str:
    """op, shape, dtype, baseline, ours (fastest of this package's backends), ratio."""
    rows = [("op", "shape", "dtype", "mode", "baseline", "ours", "ratio")]
    by_case: dict[int, list[Result]] = {}
    order: list[Case] = []
    for r in results:
        if r.metric != "time":
            continue
        if id(r.case) not in by_case:
            by_case[id(r.case)] = []
            order.append(r.case)
        by_case[id(r.case)].append(r)
    for case in order:
        rs = by_case[id(case)]
        base = next((r for r in rs if r.provider == case.baseline), None)
        ours = [r for r in rs if r.provider.startswith(OURS_PREFIX)]
        best = min(ours, key=lambda r: r.p50) if ours else None
        b = f"{case.baseline} {_format_time(base.p50)}" if base else f"{case.baseline} failed"
        o = f"{best.provider} {_format_time(best.p50)}" if best else "n/a"
        ratio = f"{base.p50 / best.p50:.2f}x" if base and best else "n/a"
        if case.compare == "difference" and base and best:
            ratio = _format_difference(best.p50 - base.p50)
        rows.append((case.op, case.shape_str, case.dtype, case.mode, b, o, ratio))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

