"""PNG plots per family from a results CSV: speedup over the baseline against shape, and on the GPU
the fraction of the roofline each provider reaches."""

from __future__ import annotations

import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _series(rows: list[dict], column: str):
    """{op: {(provider, dtype, mode): [(shape label, value)]}} for time rows with ``column`` set."""
    out: dict[str, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["metric"] != "time":
            continue
        v = _float(r[column])
        if v is None:
            continue
        out[r["op"]][(r["provider"], r["dtype"], r["mode"])].append((r["shape"], v))
    return out


def _plot(series, title: str, ylabel: str, path: str, log: bool, ref_line: float | None) -> str | None:
    ops = sorted(series)
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        labels: list[str] = []
        for lines in series[op].values():
            for shape, _ in lines:
                if shape not in labels:
                    labels.append(shape)
        xs = {s: i for i, s in enumerate(labels)}
        for (provider, dtype, mode), pts in sorted(series[op].items()):
            pts = sorted(pts, key=lambda p: xs[p[0]])
            ax.plot([xs[s] for s, _ in pts], [v for _, v in pts], marker="o",
                    linewidth=2.2 if provider.startswith("ours-") else 1.0,
                    label=f"{provider} [{dtype}, {mode}]")
        if ref_line is not None:
            ax.axhline(ref_line, color="gray", linestyle="--", linewidth=0.8)
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(op, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7, loc="best")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_family(rows: list[dict], family: str, out_dir: str, prefix: str) -> list[str]:
    rows = [r for r in rows if r["family"] == family]
    if not rows:
        return []
    device = rows[0]["device_name"]
    written = []
    # ratio against the baseline; the baseline itself is the flat line at 1
    speed = _series([r for r in rows if r["provider"] != r["baseline"]], "speedup")
    p = _plot(speed, f"{family}: speedup over baseline ({device})", "baseline time / time",
              os.path.join(out_dir, f"{prefix}_{family}_speedup.png"), log=True, ref_line=1.0)
    if p:
        written.append(p)
    if rows[0]["device"] == "cuda":
        roof = _series(rows, "roofline")
        p = _plot(roof, f"{family}: fraction of roofline ({device})", "floor time / time",
                  os.path.join(out_dir, f"{prefix}_{family}_roofline.png"), log=False, ref_line=1.0)
        if p:
            written.append(p)
    return written


def plot_all(rows: list[dict], out_dir: str, prefix: str) -> list[str]:
    written = []
    for family in sorted({r["family"] for r in rows}):
        written += plot_family(rows, family, out_dir, prefix)
    return written
