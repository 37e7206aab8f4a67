"""One CSV per device and run under ``bench/results/``; readers for the latest CSV per device."""

from __future__ import annotations

import csv
import datetime as _dt
import glob
import os
import platform
import re
import subprocess

import torch

from .harness import Result

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

COLUMNS = (
    "timestamp", "commit", "device", "device_name", "host_load", "torch", "triton", "transformers",
    "family", "op", "shape", "x_name", "x_value", "dtype", "mode", "provider", "baseline",
    "metric", "unit", "p50", "p20", "p80", "speedup", "roofline", "bytes", "flops", "method", "rounds",
)
UNITS = {"time": "us", "peak_memory": "MB"}
SCALE = {"time": 1e6, "peak_memory": 1 / (1 << 20)}


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:
        return "n/a"


def git_commit() -> str:
    """The checkout's short commit (+dirty); ``VLMKERNELS_COMMIT`` overrides it for copies of the
    tree without .git (e.g. the working tree sent to a lent GPU machine)."""
    if os.environ.get("VLMKERNELS_COMMIT"):
        return os.environ["VLMKERNELS_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("+dirty" if dirty else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48] or "device"


def device_slug(device: str) -> str:
    if device == "cuda":
        return slug(device_name(device))
    return "cpu-" + slug(cpu_name())[:32]


class RunInfo:
    """Facts stamped on every row of a run."""

    def __init__(self, device: str):
        self.device = device
        self.device_name = device_name(device)
        self.timestamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.commit = git_commit()
        self.versions = {m: _version(m) for m in ("torch", "triton", "transformers")}
        # the 1-minute load average over the core count at the start: CPU timings on a shared,
        # loaded host are only comparable within a run (hence interleaved rounds and same-run ratios)
        try:
            self.host_load = f"{os.getloadavg()[0]:.1f}/{os.cpu_count()}"
        except OSError:
            self.host_load = ""


def to_rows(results: list[Result], info: RunInfo) -> list[dict]:
    rows = []
    for r in results:
        c = r.case
        scale = SCALE[r.metric]
        rows.append({
            "timestamp": info.timestamp, "commit": info.commit, "device": info.device,
            "device_name": info.device_name, "host_load": info.host_load, **info.versions,
            "family": c.family, "op": c.op, "shape": c.shape_str, "x_name": c.x or "",
            "x_value": "" if c.x_value is None else c.x_value, "dtype": c.dtype, "mode": c.mode,
            "provider": r.provider, "baseline": c.baseline, "metric": r.metric, "unit": UNITS[r.metric],
            "p50": f"{r.p50 * scale:.4g}", "p20": f"{r.p20 * scale:.4g}", "p80": f"{r.p80 * scale:.4g}",
            "speedup": "" if r.speedup is None else f"{r.speedup:.4g}",
            "roofline": "" if r.roofline is None else f"{r.roofline:.4g}",
            "bytes": "" if c.nbytes is None else int(c.nbytes), "flops": "" if c.flops is None else int(c.flops),
            "method": r.method, "rounds": r.rounds,
        })
    return rows


def write_csv(results: list[Result], info: RunInfo, out_dir: str = RESULTS_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stamp = info.timestamp.replace("-", "").replace(":", "")
    path = os.path.join(out_dir, f"{device_slug(info.device)}_{stamp}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(to_rows(results, info))
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def latest_per_device(out_dir: str = RESULTS_DIR) -> dict[str, str]:
    """{device slug: newest CSV path}; file names sort by time within a device."""
    latest: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*.csv"))):
        name = os.path.basename(path)
        dev = name.rsplit("_", 1)[0]
        latest[dev] = path  # sorted: the last one per device is the newest
    return latest
