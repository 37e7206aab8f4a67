"""moe_topk_route on tied and near-tied router logits: the ``cpu`` (C++), ``reference`` (python_ref)
and ``triton`` backends against torch's softmax + top-k in float64 and in float32.

Every backend computes the scores in fp32 (the cpu backend's fast softmax path with a polynomial exp
at most 1 ulp from expf), so experts whose float64 scores lie within ``TIE_RTOL`` of the k-th
largest score ``s_k`` (relative to it) may come out tied or in either order. The rule checked per row,
with ``s`` the float64 softmax scores:

* every expert with ``s > s_k (1 + TIE_RTOL)`` is chosen and none with ``s < s_k (1 - TIE_RTOL)``:
  where the k-th and (k+1)-th scores are further apart than that, the chosen set is float64's
  exactly (and float32's); otherwise it may differ only among the near-tied experts;
* the row is in score order up to ``TIE_RTOL``, and the weights agree with the renormalized float64
  scores, of the chosen ids and of float64's own top-k, to fp32's 1e-5;
* equal logits are an exact tie, broken towards the lower id (as a stable float64 sort does).

``TIE_RTOL = 1e-5`` covers the fp32 rounding of ``x - max`` (up to ``2**-24 * (max - x)`` relative,
so it holds for rows whose logits span less than about 80, where fp32 scores are still normal) plus a
few ulps of exp and normalization (the inputs below need about 5e-7). README.md states the rule.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import vlmkernels.ops as vops
from tests.helpers import assert_close
from vlmkernels import _ext

TIE_RTOL = 1e-5
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["reference", pytest.param("cpu", marks=pytest.mark.skipif(_ext.C is None, reason="vlmkernels._C is not built")),
            "triton"]
CASES = [(E, k) for E in (8, 61, 64, 128, 257) for k in (1, 2, 8)]
ROWS = 17  # odd: the cpu backend splits rows over threads


def _gen(*key) -> torch.Generator:
    # a different, reproducible stream per case (str hashes vary between runs)
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _ulps(v: torch.Tensor, n: int) -> torch.Tensor:
    """``v`` moved by ``n`` ulps of its dtype (toward +inf for n > 0)."""
    to = torch.full_like(v, float("inf") if n > 0 else float("-inf"))
    for _ in range(abs(n)):
        v = torch.nextafter(v, to)
    return v


def near_tie_logits(E: int, k: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random logits whose k-th largest value ``v`` gets company at random ids (before and after its
    own): ``v`` again (exact ties) and ``v`` moved by 1..3 ulps of ``dtype`` either way. Every third
    row is scaled near 0, where neighbouring values are near-ties in any dtype; every fourth row is
    left alone (almost surely without near-ties: one right answer)."""
    x = torch.randn(ROWS, E, generator=gen) * 2
    x[::3] *= 1e-3
    x = x.to(dtype)
    steps = [0, 0, 1, -1, 2, -3]
    for r in range(ROWS):
        if r % 4 == 3:
            continue
        v = x[r].double().sort(descending=True).values[k - 1].to(dtype)
        ids = torch.randperm(E, generator=gen)[: min(E - 1, len(steps))]
        x[r, ids] = torch.stack([_ulps(v, n) for n in steps[: len(ids)]])
    return x


def exact_tie_logits(E: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """Logits on a 0.25 grid: many exact ties, and distinct values whose scores differ by >= 28%."""
    return ((torch.randn(ROWS, E, generator=gen) * 8).round() / 4).to(dtype)


def float64_route(logits: torch.Tensor, k: int):
    """torch softmax + top-k in float64; ties to the lower id (stable sort). (scores, order, weights)"""
    s = torch.softmax(logits.double(), dim=-1)
    top = torch.sort(s, dim=-1, descending=True, stable=True)
    w = top.values[:, :k]
    return s, top.indices, w / w.sum(-1, keepdim=True)


def float32_route(logits: torch.Tensor, k: int):
    """torch softmax + top-k in float32 (ties to the lower id): (weights, ids)."""
    s = torch.softmax(logits.float(), dim=-1)
    top = torch.sort(s, dim=-1, descending=True, stable=True)
    w = top.values[:, :k]
    return w / w.sum(-1, keepdim=True), top.indices[:, :k].int()


def check_near_ties(weights, ids, logits, k, msg):
    """The module docstring's rule for one result against float64."""
    s, order, w64 = float64_route(logits, k)
    E = s.shape[1]
    ids = ids.long()
    sorted_s = s.gather(1, order)
    sk = sorted_s[:, k - 1 : k]
    tol = TIE_RTOL * sk
    chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ids, True)
    assert (chosen.sum(-1) == k).all(), f"{msg}: repeated ids"
    missed = (s > sk + tol) & ~chosen
    assert not missed.any(), f"{msg}: clearly better experts not chosen at {missed.nonzero()[:5].tolist()}"
    wrong = (s < sk - tol) & chosen
    assert not wrong.any(), f"{msg}: clearly worse experts chosen at {wrong.nonzero()[:5].tolist()}"
    separated = sorted_s[:, k - 1] - sorted_s[:, k] > tol[:, 0] if k < E else torch.ones(len(s), dtype=torch.bool)
    want = torch.zeros_like(chosen).scatter_(1, order[:, :k], True)
    assert torch.equal(chosen[separated], want[separated]), msg
    sc = s.gather(1, ids)
    assert (sc[:, :-1] >= sc[:, 1:] - TIE_RTOL * sc[:, :-1]).all(), f"{msg}: row not in score order"
    assert_close(weights, sc / sc.sum(-1, keepdim=True), dtype=torch.float32, msg=f"{msg}: weights of its ids")
    assert_close(weights, w64, dtype=torch.float32, msg=f"{msg}: weights vs float64 top-k")


def _fully_separated(logits, k):
    """Rows whose float64 top-(k+1) scores are pairwise further apart than TIE_RTOL: one right answer."""
    s, order, _ = float64_route(logits, k)
    top = s.gather(1, order[:, : k + 1])
    return (top[:, :-1] - top[:, 1:] > TIE_RTOL * top[:, :-1]).all(-1)


def check_exact_ties(weights, ids, logits, k, msg):
    """Exactly tied rows: float64's stable top-k, order included."""
    _, order, w64 = float64_route(logits, k)
    assert torch.equal(ids.long(), order[:, :k]), f"{msg}: exact ties not broken towards the lower id"
    assert_close(weights, w64, dtype=torch.float32, msg=f"{msg}: weights")


def check_ties(weights, ids, near, exact, k, msg):
    """A result for ``torch.cat([near, exact])`` (one launch for both kinds of rows)."""
    n = len(near)
    check_near_ties(weights[:n], ids[:n], near, k, f"{msg} near ties")
    # where float64 has one right answer, it is also torch's fp32 route's, order included
    w32, ids32 = float32_route(near, k)
    one = _fully_separated(near, k)
    assert torch.equal(ids[:n][one], ids32[one]), msg
    assert_close(weights[:n], w32, dtype=torch.float32, msg=f"{msg}: weights vs float32 top-k")
    check_exact_ties(weights[n:], ids[n:], exact, k, f"{msg} exact ties")


def _inputs(E, k, dtype, *key):
    gen = _gen(E, k, str(dtype), *key)
    return near_tie_logits(E, k, dtype, gen), exact_tie_logits(E, dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", CASES)
def test_torch_float32_obeys_the_rule(E, k, dtype):
    # the oracle itself: torch's fp32 softmax + stable top-k stays within the rule
    near, exact = _inputs(E, k, dtype, "torch")
    check_near_ties(*float32_route(near, k), near, k, f"torch fp32 E={E} k={k} {dtype}")
    check_exact_ties(*float32_route(exact, k), exact, k, f"torch fp32 E={E} k={k} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", CASES)
def test_ties(E, k, dtype, backend):
    near, exact = _inputs(E, k, dtype, backend)
    w, ids = vops.moe_topk_route(torch.cat([near, exact]), k, backend=backend)
    check_ties(w, ids, near, exact, k, f"{backend} E={E} k={k} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E,k", CASES)
def test_gpu_ties(E, k, dtype, backend):
    near, exact = _inputs(E, k, dtype, "gpu", backend)
    w, ids = vops.moe_topk_route(torch.cat([near, exact]).cuda(), k, backend=backend)
    check_ties(w.cpu(), ids.cpu(), near, exact, k, f"{backend} E={E} k={k} {dtype}")
