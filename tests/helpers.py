"""Per-dtype tolerances and a verbose closeness assertion shared by the parity tests."""

from __future__ import annotations

import torch

# (atol, rtol) per dtype of the tensor under test, against a float64/float32 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def tol(dtype: torch.dtype) -> tuple[float, float]:
    return TOL.get(dtype, (0.0, 0.0))


def f64(t):
    """``t`` (a tensor, a list of them, None or a non-tensor) with its floating tensors as float64 leaves."""
    if t is None:
        return None
    if isinstance(t, (list, tuple)):
        return [f64(u) for u in t]
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().double() if t.is_floating_point() else t


def leaves(ts):
    """Fresh leaf copies of ``ts`` that require grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def opcheck(op, args, backend: str) -> None:
    """``torch.library.opcheck`` of ``op``'s default overload on ``(*args, backend)``; a forward op's
    floating inputs require grad, so opcheck also traces its backward op through the fakes."""
    if not op.default._schema.name.endswith("_backward"):
        args = tuple(leaves(a) if isinstance(a, list) else (a.clone().requires_grad_() if isinstance(a, torch.Tensor)
                     and a.is_floating_point() else a) for a in args)
    torch.library.opcheck(op.default, (*args, backend))


class KernelRecorder:
    """Stands in for a Triton kernel (``monkeypatch.setattr(module, name, KernelRecorder(kernel))``):
    records each launch's keyword arguments in ``calls``, then runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def assert_close(actual, expected, *, atol=None, rtol=None, dtype=None, max_print=5, msg=""):
    """Like torch.testing.assert_close, but reports the mismatch count, max abs/rel error and the
    first mismatching indices with both values. NaN must match NaN; integers must match exactly."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not (actual.is_floating_point() or expected.is_floating_point()):
        atol, rtol = 0.0, 0.0
    else:
        d_atol, d_rtol = tol(dtype or actual.dtype)
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_mismatch = torch.isnan(a) ^ torch.isnan(e)
    both_finite = torch.isfinite(a) & torch.isfinite(e)
    inf_mismatch = ~torch.isnan(a) & ~torch.isnan(e) & ~both_finite & (a != e)
    diff = torch.where(both_finite, (a - e).abs(), torch.zeros_like(a))
    bad = nan_mismatch | inf_mismatch | (both_finite & (diff > atol + rtol * e.abs()))
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    rel = diff / e.abs().clamp_min(1e-30)
    idx = bad.nonzero()[:max_print].tolist()
    lines = [
        f"{msg} {n_bad}/{a.numel()} elements differ (atol={atol}, rtol={rtol}); "
        f"max abs err {float(diff.max()):.3e}, max rel err {float(rel[both_finite].max() if both_finite.any() else 0):.3e}"
    ]
    for i in idx:
        t = tuple(i)
        lines.append(f"  at {t}: actual {float(a[t])!r} expected {float(e[t])!r}")
    raise AssertionError("\n".join(lines))


def run_without_interpreter(code: str, timeout: int = 300) -> None:
    """Run ``code`` in a fresh Python without TRITON_INTERPRET (ahead-of-time kernel builds need the
    real compiler); skips when triton's ptxas is missing, fails with the child's stderr otherwise."""
    import os
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=timeout)
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("triton's ptxas is not available")
    assert res.returncode == 0, res.stderr[-3000:]


def loss_grads(model, inputs) -> dict:
    """One forward + backward of a python_ref model's loss: ``{parameter name: grad or None}``."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    assert torch.isfinite(out.loss), "loss must be finite"
    out.loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}
