"""How one provider call is timed, and the device ceilings (bandwidth, matmul rate) a run measures once.

CPU: pytest-benchmark's machinery (its timer, its timer-precision probe, its ``Stats``), with the
inner-loop calibration pytest-benchmark does (each round lasts well above the timer's precision);
p20/p80 come from the same rounds as the median.

GPU: CUDA events around CUDA-graph replays when every provider of a case can be captured, else
around plain calls (the same method for all providers of a case, so ratios compare like with like).
Each timed unit runs through ``n_sets`` rotating input sets, so inputs do not sit in L2.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class Sample:
    p50: float   # seconds per call
    p20: float
    p80: float
    rounds: int
    method: str


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(values), q[1], q[7]


# ---- CPU ----------------------------------------------------------------------------------------

_PRECISION: float | None = None


def timer_precision() -> float:
    global _PRECISION
    if _PRECISION is None:
        try:
            from pytest_benchmark.timers import compute_timer_precision, default_timer

            _PRECISION = compute_timer_precision(default_timer)
        except Exception:  # pytest-benchmark missing: perf_counter's resolution is ~100 ns
            _PRECISION = 1e-7
    return _PRECISION


def time_cpu(fn: Callable[[], Any], *, budget_s: float, min_rounds: int = 3, max_rounds: int = 200) -> Sample:
    """Median of rounds of ``fn()``; each round loops ``fn`` enough times to dwarf timer precision."""
    sample = time_cpu_interleaved({"fn": fn}, budget_s=budget_s, min_rounds=min_rounds, max_rounds=max_rounds)["fn"]
    if isinstance(sample, Exception):
        raise sample
    return sample


def time_cpu_interleaved(fns: dict[str, Callable[[], Any]], *, budget_s: float, min_rounds: int = 3,
                         max_rounds: int = 200) -> dict[str, "Sample | Exception"]:
    """:func:`time_cpu` for all providers of a case at once, their rounds interleaved (A B C A B C
    ...), so that on a shared, loaded CPU every provider sees the same load and the ratios hold.
    ``budget_s`` is per provider. A provider that raises gets its exception instead of a Sample."""
    try:
        from pytest_benchmark.stats import Stats
        from pytest_benchmark.timers import default_timer as clock
    except Exception:
        Stats, clock = None, time.perf_counter
    min_round = max(100 * timer_precision(), 20e-6)
    loops: dict[str, int] = {}
    values: dict[str, list[float]] = {}
    out: dict[str, Sample | Exception] = {}
    for name, fn in fns.items():
        try:
            t0 = clock()
            fn()  # first call: compiles, allocates, warms caches
            if clock() - t0 < 0.1:
                fn()
            n = 1
            while True:  # calibrate the inner loop like pytest-benchmark
                t0 = clock()
                for _ in range(n):
                    fn()
                dt = clock() - t0
                if dt >= min_round or n >= 1 << 16:
                    break
                n *= 2 if dt <= 0 else max(2, min(10, int(min_round / dt) + 1))
            loops[name], values[name] = n, [dt / n]
        except Exception as e:  # noqa: BLE001 - reported by the caller
            out[name] = e
    if not loops:
        return out
    # a cycle runs each provider for about as long as the slowest one's round (at most 10 rounds),
    # so fast providers still collect many samples while slow ones set the pace
    round_s = {k: values[k][0] * loops[k] for k in loops}
    slowest = max(round_s.values())
    reps = {k: int(min(10, max(1, slowest / max(t, 1e-9)))) for k, t in round_s.items()}
    per_cycle = sum(round_s[k] * reps[k] for k in loops)
    cycles = int(min(max_rounds, max(min_rounds, budget_s * len(loops) / max(per_cycle, 1e-9))))
    gc_was = gc.isenabled()
    gc.disable()  # pytest-benchmark also runs rounds with the collector off
    try:
        for c in range(cycles):
            for name in list(loops):
                fn, n = fns[name], loops[name]
                try:
                    for _ in range(reps[name] - (1 if c == 0 else 0)):  # cycle 0: calibration counted
                        t0 = clock()
                        for _ in range(n):
                            fn()
                        values[name].append((clock() - t0) / n)
                except Exception as e:  # noqa: BLE001
                    out[name] = e
                    del loops[name]
    finally:
        if gc_was:
            gc.enable()
    for name in loops:
        v = values[name]
        p50, p20, p80 = _quantiles(v)
        if Stats is not None:
            stats = Stats()
            for x in v:
                stats.update(x)
            p50 = stats.median
        out[name] = Sample(p50, p20, p80, len(v), "pytest-benchmark" if Stats else "perf_counter")
    return {name: out[name] for name in fns if name in out}


# ---- CUDA ---------------------------------------------------------------------------------------

def capture_graph(fn: Callable[[], Any], n_calls: int):
    """A CUDA graph of ``n_calls`` successive ``fn()`` calls (each call picks its next input set), or
    None when ``fn`` cannot be captured (host syncs, CPU work, data-dependent shapes)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            for _ in range(max(2, n_calls)):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n_calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph
    except Exception:
        torch.cuda.synchronize()
        return None


def _events(n: int):
    return [torch.cuda.Event(enable_timing=True) for _ in range(n)]


def time_cuda_graph(graph, n_calls: int, *, budget_s: float, min_reps: int = 10, max_reps: int = 1000) -> Sample:
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / est)))
    starts, ends = _events(reps), _events(reps)
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    values = [s.elapsed_time(e) * 1e-3 / n_calls for s, e in zip(starts, ends)]
    p50, p20, p80 = _quantiles(values)
    return Sample(p50, p20, p80, reps, "cuda-graph")


def time_cuda_events(fn: Callable[[], Any], *, budget_s: float, warmup: int = 5, min_reps: int = 10,
                     max_reps: int = 1000) -> Sample:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(min_reps, budget_s / est)))
    starts, ends = _events(reps), _events(reps)
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    values = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    p50, p20, p80 = _quantiles(values)
    return Sample(p50, p20, p80, reps, "cuda-events")


def peak_memory_cuda(fn: Callable[[], Any]) -> float:
    """Bytes allocated at the peak of one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return float(max(peak, 0))


# ---- device ceilings ----------------------------------------------------------------------------

@dataclass
class Ceilings:
    bandwidth: float   # bytes/s, read + write, device-to-device copy
    matmul: float      # FLOP/s, bf16 (GPU) / fp32 (CPU) square matmul


def measure_ceilings(device: str, quick: bool = True) -> Ceilings:
    """Measured once per run: roofline fractions use these rather than datasheet numbers."""
    if device == "cuda":
        n_bytes = 1 << 30  # 1 GiB, far beyond L2
        src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").random_()
        dst = torch.empty_like(src)
        s = time_cuda_events(lambda: dst.copy_(src), budget_s=0.2, warmup=3, min_reps=10, max_reps=50)
        bw = 2 * n_bytes / s.p50
        del src, dst
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        s = time_cuda_events(lambda: a @ b, budget_s=0.3, warmup=3, min_reps=5, max_reps=30)
        mm = 2 * n ** 3 / s.p50
        del a, b
        torch.cuda.empty_cache()
        return Ceilings(bw, mm)
    n_bytes = 64 << 20
    src = torch.ones(n_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    s = time_cpu(lambda: dst.copy_(src), budget_s=0.2, min_rounds=3, max_rounds=20)
    bw = 2 * n_bytes / s.p50
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    s = time_cpu(lambda: a @ b, budget_s=0.2, min_rounds=3, max_rounds=50)
    return Ceilings(bw, 2 * n ** 3 / s.p50)
