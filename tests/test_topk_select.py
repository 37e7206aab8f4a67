"""topk_select_tokens: parity with python_ref and a sort golden (ties, NaN, dtypes), gradient to
tokens, opcheck and argument errors."""

from __future__ import annotations

import pytest
import torch

import vlmkernels.ops as vops
from vlmkernels import _ext
from python_ref import ops as ref
from tests.helpers import assert_close

needs_ext = pytest.mark.skipif(_ext.C is None, reason="vlmkernels._C is not built")
OP = torch.ops.vlmkernels.topk_select_tokens.default
BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


def golden_index(scores, k):
    out = []
    for row in scores.double().tolist():
        order = sorted(range(len(row)), key=lambda i: (row[i] != row[i], -row[i] if row[i] == row[i] else 0, i))
        out.append(order[:k])
    return torch.tensor(out, dtype=torch.int64).reshape(scores.shape[0], k)


def make_scores(B, N, dtype):
    s = (torch.randn(B, N) * 2).round() / 2  # many exact ties
    if N > 3:
        s[0, 1] = float("nan")
        s[0, 3] = float("-inf")
    return s.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 17, 5, 4), (2, 7, 1, 7), (4, 31, 3, 1), (1, 5, 2, 0)], ids=str)
def test_matches_golden(backend, dtype, shape):
    B, N, D, k = shape
    scores = make_scores(B, N, dtype)
    tokens = torch.randn(B, N, D, dtype=dtype)
    sel, idx = vops.topk_select_tokens(scores, tokens, k, backend=backend)
    want = golden_index(scores, k)
    assert idx.dtype == torch.int64 and torch.equal(idx, want)
    assert sel.dtype == dtype and torch.equal(sel, torch.gather(tokens, 1, want[..., None].expand(-1, -1, D)))
    rsel, ridx = ref.topk_select_tokens(scores, tokens, k)
    assert torch.equal(idx, ridx) and torch.equal(sel, rsel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_to_tokens(backend):
    scores = torch.randn(3, 11)
    tokens = torch.randn(3, 11, 4, dtype=torch.float64, requires_grad=True)
    sel, idx = vops.topk_select_tokens(scores, tokens, 5, backend=backend)
    g = torch.randn_like(sel)
    (sel * g).sum().backward()
    want = torch.zeros_like(tokens).scatter_(1, idx[..., None].expand(-1, -1, 4), g)
    assert_close(tokens.grad, want)
    t2 = tokens.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: vops.topk_select_tokens(scores, t, 5, backend=backend)[0], (t2,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_empty(backend):
    scores = torch.randn(9, 4).t()
    tokens = torch.randn(9, 4, 3).transpose(0, 1)
    sel, idx = vops.topk_select_tokens(scores, tokens, 3, backend=backend)
    assert torch.equal(idx, golden_index(scores, 3))
    sel, idx = vops.topk_select_tokens(torch.randn(0, 5), torch.randn(0, 5, 2), 2, backend=backend)
    assert sel.shape == (0, 2, 2) and idx.shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.library.opcheck(OP, (torch.randn(2, 9), torch.randn(2, 9, 4, requires_grad=True), 3, backend))


@pytest.mark.cuda
def test_cuda_reference_path():
    scores = make_scores(4, 50, torch.float32).cuda()
    tokens = torch.randn(4, 50, 8, device="cuda")
    sel, idx = vops.topk_select_tokens(scores, tokens, 7)
    assert torch.equal(idx.cpu(), golden_index(scores.cpu(), 7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    s, t = torch.randn(2, 5), torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="k must be"):
        vops.topk_select_tokens(s, t, 6, backend=backend)
    with pytest.raises(ValueError, match="k must be"):
        vops.topk_select_tokens(s, t, -1, backend=backend)
    with pytest.raises(ValueError, match="scores must be 2-D"):
        vops.topk_select_tokens(s[0], t, 2, backend=backend)
    with pytest.raises(ValueError, match="tokens must be"):
        vops.topk_select_tokens(s, t[:, :4], 2, backend=backend)
    with pytest.raises(TypeError, match="tokens"):
        vops.topk_select_tokens(s, t.long(), 2, backend=backend)
    with pytest.raises(TypeError, match="scores"):
        vops.topk_select_tokens(s.long(), t, 2, backend=backend)
