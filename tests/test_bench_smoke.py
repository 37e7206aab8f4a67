"""bench/ end to end on one tiny case per suite: timing, CSV, ratios, plots, README table.

No timing assertions: only that the machinery produces well-formed results.
"""

import csv
import importlib
import os
import subprocess

import pytest

from bench import harness, plots, report, results
from bench.suites import discover

SUITES = discover()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke(suite):
    mod = importlib.import_module(f"bench.suites.{suite}")
    assert hasattr(mod, "smoke_cases"), f"bench/suites/{suite}.py must define smoke_cases(device) (see bench/README.md)"
    cases = mod.smoke_cases("cpu")
    assert cases, f"bench/suites/{suite}.py: smoke_cases('cpu') returned no case"
    return cases[:1]


@pytest.mark.parametrize("suite", SUITES)
def test_suite_case_end_to_end(suite, tmp_path):
    cases = _smoke(suite)
    cfg = harness.RunConfig(device="cpu", budget_s=0.005, log=lambda s: None)
    res = harness.run_cases(cases, cfg)
    case = cases[0]
    timed = {r.provider for r in res if r.metric == "time"}
    assert case.baseline in timed, f"baseline {case.baseline} failed to run"
    assert len(timed) >= 2, f"need the baseline and at least one other provider, got {timed}"
    for r in res:
        assert r.p20 <= r.p50 <= r.p80 and r.p50 > 0
        assert r.speedup is not None and r.speedup > 0
    base = next(r for r in res if r.provider == case.baseline)
    assert base.speedup == pytest.approx(1.0)

    info = results.RunInfo("cpu")
    path = results.write_csv(res, info, str(tmp_path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == results.COLUMNS
        rows = list(reader)
    required = {"op", "family", "shape", "dtype", "device_name", "provider", "mode", "metric", "p50", "p20", "p80",
                "commit", "torch", "triton"}
    assert required <= set(rows[0])
    assert all(row[k] != "" for row in rows for k in required)
    assert {row["provider"] for row in rows} == timed
    assert all(float(row["speedup"]) > 0 for row in rows)

    written = plots.plot_all(rows, str(tmp_path), "smoke")
    assert written and all(p.endswith(".png") and os.path.getsize(p) > 1000 for p in written)

    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n")
    report.update_readme(str(readme), str(tmp_path))
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n")
    assert report.START in text and report.END in text and case.op in text
    # regenerating replaces the block instead of appending a second one
    report.update_readme(str(readme), str(tmp_path))
    assert readme.read_text().count(report.START) == 1


def test_table_and_filters():
    calls = []
    case = harness.Case("op_a", "fam", {"n": 3}, "float32",
                        {"base": lambda: calls.append(1), "ours-cpu": lambda: None}, "base", x="n")
    assert harness.filter_cases([case], ["op_b"]) == []
    res = harness.run_cases([case], harness.RunConfig(device="cpu", budget_s=0.001, log=lambda s: None))
    table = harness.format_table(res)
    assert "op_a" in table and "ours-cpu" in table and "x" in table.splitlines()[-1]
    with pytest.raises(ValueError, match="baseline"):
        harness.Case("op", "fam", {}, "float32", {"a": lambda: None}, "b")
    with pytest.raises(ValueError, match="mode"):
        harness.Case("op", "fam", {}, "float32", {"a": lambda: None}, "a", mode="sideways")


def test_failing_provider_is_reported_not_fatal():
    def boom():
        raise RuntimeError("no kernel")

    logs = []
    case = harness.Case("op", "fam", {}, "float32", {"base": lambda: None, "ours-x": boom}, "base")
    res = harness.run_cases([case], harness.RunConfig(device="cpu", budget_s=0.001, log=logs.append))
    assert [r.provider for r in res] == ["base"]
    assert any("ours-x" in line and "FAILED" in line for line in logs)


def test_gpu_check_script_parses():
    script = os.path.join(ROOT, "bench", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "dry-run" in out.stdout


def test_inputs_rotate_and_release_after_last_use():
    made = []
    inp = harness.Inputs(lambda i: made.append(i) or i, nbytes=10, uses=2)
    inp.configure(3)
    assert [inp() for _ in range(4)] == [0, 1, 2, 0] and made == [0, 1, 2]
    assert inp.first() == 0
    inp.release()           # first of two cases done: sets kept
    inp.configure(3)
    assert inp() == 0 and made == [0, 1, 2]
    inp.release()           # last user: freed, rebuilt on next use
    assert inp() == 0 and made == [0, 1, 2, 0, 1, 2]
    assert harness.rotation_sets(10, "cpu") == 1


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The one-shot GPU script's reduced run on a CPU-only machine: every stage passes and the
    8 files a lent machine can send back are there."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(os.listdir(out))
    assert len(names) <= 8 and all(os.path.isfile(out / n) for n in names)
    for expected in ("summary.txt", "env.txt", "build.log", "pytest.log", "bench.log", "table.md", "plots.tgz"):
        assert expected in names
    assert any(n.endswith(".csv") for n in names)
    assert "all stages passed" in (out / "summary.txt").read_text()
