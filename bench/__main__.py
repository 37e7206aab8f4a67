"""``python -m bench``: time every kernel family against what users would pick instead.

Quick mode by default (a few shapes per op); ``--full`` runs the sweeps. Writes one CSV per run
under ``bench/results/`` (or ``--out``), PNG plots per family, prints the table, and regenerates the
README performance table from the latest CSV per device.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

from .suites import discover

SUITES = tuple(discover())


def load_cases(suites, full: bool, device: str, log) -> list:
    from .harness import SkipSuite

    cases = []
    for name in suites:
        try:
            mod = importlib.import_module(f"bench.suites.{name}")
            got = mod.cases(full, device)
        except SkipSuite as e:
            log(f"suite {name}: skipped ({e})")
            continue
        except ImportError as e:
            log(f"suite {name}: skipped, not importable yet ({e})")
            continue
        log(f"suite {name}: {len(got)} cases")
        cases.extend(got)
    return cases


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the full sweeps (default: quick mode)")
    ap.add_argument("--family", action="append", choices=SUITES,
                    help="only these suites (repeatable); e2e is the end-to-end suite")
    ap.add_argument("--op", action="append", help="only these ops (repeatable), e.g. moe_topk_route")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--threads", type=int, default=2,
                    help="CPU threads for torch and our CPU kernels (default 2, the issue's CPU setting)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of measuring per provider")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="start no new case after this many seconds; what ran is still written")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-readme", action="store_true", help="do not regenerate README's table")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    # Timing must never go through the Triton interpreter; cleared before the suites import the
    # kernels (triton decides interpreted or compiled when a kernel is defined).
    interpret_was_set = os.environ.pop("TRITON_INTERPRET", None) == "1"
    args = parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if interpret_was_set:
        log("note: TRITON_INTERPRET=1 was unset for the benchmarks (interpreted Triton is never timed)")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but no CUDA device is visible")
        return 2
    if device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)

    from . import harness, plots, report, results, timing

    suites = args.family or list(SUITES)
    cases = harness.filter_cases(load_cases(suites, args.full, device, log), args.op)
    if args.list:
        for c in cases:
            print(f"{c.family:<8} {c.op:<22} {c.shape_str:<40} {c.dtype:<9} {c.mode:<8} {', '.join(c.providers)}")
        return 0
    if not cases:
        log("no benchmark cases to run (no family has landed yet, or the filters matched nothing)")
        return 0
    out_dir = args.out or results.RESULTS_DIR
    info = results.RunInfo(device)
    log(f"bench: {len(cases)} cases on {info.device_name} ({'full' if args.full else 'quick'} mode), "
        f"commit {info.commit}, torch {info.versions['torch']}, triton {info.versions['triton']}")
    t0 = time.perf_counter()
    ceilings = None
    if device == "cuda":  # a shared, loaded CPU gives no stable ceiling: rooflines are GPU-only
        ceilings = timing.measure_ceilings(device)
        log(f"ceilings: copy bandwidth {ceilings.bandwidth / 1e9:.0f} GB/s (read+write), "
            f"bf16 matmul {ceilings.matmul / 1e12:.0f} TFLOP/s")
    cfg = harness.RunConfig(device=device, full=args.full, budget_s=args.budget, time_limit_s=args.time_limit, log=log)
    res = harness.run_cases(cases, cfg, ceilings)
    csv_path = results.write_csv(res, info, out_dir)
    print(harness.format_table(res))
    if cfg.failures:
        print(f"\n{len(cfg.failures)} provider runs failed:")
        for f in cfg.failures:
            print(f"  {f}")
    print(f"\nresults: {csv_path}")
    if not args.no_plots:
        prefix = os.path.basename(csv_path).rsplit("_", 1)[0]
        for p in plots.plot_all(results.read_csv(csv_path), out_dir, prefix):
            print(f"plot:    {p}")
    if not args.no_readme and os.path.abspath(out_dir) == os.path.abspath(results.RESULTS_DIR):
        print(f"table:   {report.update_readme()}")
    log(f"bench: done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
