"""moe_align_block_size: every runnable backend against a stable-sort golden (vLLM layout),
expert_map / dropped-id cases, determinism, opcheck and argument errors."""

from __future__ import annotations

import pytest
import torch

import vlmkernels.ops as vops
from vlmkernels import _ext

needs_ext = pytest.mark.skipif(_ext.C is None, reason="vlmkernels._C is not built")
OP = torch.ops.vlmkernels.moe_align_block_size.default
HOST_BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


def golden(ids, E, B, expert_map=None):
    """Loop golden written from vLLM's contract, made stable: (sorted_ids, expert_ids, total)."""
    T, k = ids.shape
    n = T * k
    M = n + E * (B - 1)
    if n < E:
        M = min(M, n * B)
    flat = ids.reshape(-1).tolist()
    emap = expert_map.tolist() if expert_map is not None else None
    per_expert = [[] for _ in range(E)]
    for i, e in enumerate(flat):
        if not 0 <= e < E:
            continue
        if emap is not None:
            e = emap[e]
            if not 0 <= e < E:
                continue
        per_expert[e].append(i)  # flattened order == stable sort by expert
    sorted_ids, expert_ids = [], []
    for e, entries in enumerate(per_expert):
        padded = -(-len(entries) // B) * B
        sorted_ids += entries + [n] * (padded - len(entries))
        expert_ids += [e] * (padded // B)
    total = len(sorted_ids)
    sorted_ids += [n] * (M - total)
    expert_ids += [-1] * (-(-M // B) - len(expert_ids))
    i32 = dict(dtype=torch.int32)
    return torch.tensor(sorted_ids, **i32), torch.tensor(expert_ids, **i32), torch.tensor([total], **i32)


def check(out, want, msg=""):
    names = ("sorted_token_ids", "expert_ids", "num_tokens_post_padded")
    for name, a, b in zip(names, out, want):
        assert a.dtype == torch.int32, f"{msg} {name} dtype {a.dtype}"
        assert torch.equal(a.cpu(), b), f"{msg} {name}: got {a.tolist()[:40]} want {b.tolist()[:40]}"


# (T, k, E, block_size)
CASES = [(1, 1, 1, 1), (37, 3, 6, 4), (64, 8, 60, 16), (13, 2, 257, 32), (5, 4, 8, 1), (300, 2, 7, 5)]


def random_ids(T, k, E, *, dtype=torch.int32, out_of_range=False):
    lo, hi = (-2, E + 2) if out_of_range else (0, E)
    return torch.randint(lo, hi, (T, k), dtype=dtype)


def random_map(E):
    """Global -> local map of an EP rank owning about half the experts; -1 elsewhere."""
    owned = torch.randperm(E)[: max(1, E // 2)]
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[owned] = torch.arange(owned.numel(), dtype=torch.int32)
    return emap


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}k{}E{}B{}".format(*c))
def test_matches_golden(backend, case):
    T, k, E, B = case
    ids = random_ids(T, k, E)
    check(vops.moe_align_block_size(ids, E, B, backend=backend), golden(ids, E, B), f"{backend} {case}")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("case", CASES[1:4], ids=lambda c: "T{}k{}E{}B{}".format(*c))
def test_expert_map_and_dropped_ids(backend, case):
    T, k, E, B = case
    ids = random_ids(T, k, E, out_of_range=True)
    emap = random_map(E)
    check(vops.moe_align_block_size(ids, E, B, expert_map=emap, backend=backend), golden(ids, E, B, emap))
    # int64 ids and map, and ids far outside int32 are dropped, never wrapped into a real expert
    ids64 = ids.long()
    ids64[0, 0] = 2**32 + 1
    emap64 = emap.long()
    emap64[emap64 < 0] = -(2**33)
    out = vops.moe_align_block_size(ids64, E, B, expert_map=emap64, backend=backend)
    check(out, golden(ids64.clamp(-1, E), E, B, emap))


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_empty_and_layout_facts(backend):
    s, e, n = vops.moe_align_block_size(torch.empty(0, 2, dtype=torch.int32), 8, 16, backend=backend)
    assert s.numel() == 0 and e.numel() == 0 and n.tolist() == [0]
    T, k, E, B = 50, 4, 16, 8
    ids = random_ids(T, k, E)
    s, e, n = vops.moe_align_block_size(ids, E, B, backend=backend)
    assert s.numel() == T * k + E * (B - 1) and e.numel() == -(-s.numel() // B)
    total = int(n)
    assert total % B == 0
    real = s[:total][s[:total] < T * k]
    assert sorted(real.tolist()) == list(range(T * k))  # every entry exactly once
    flat = ids.reshape(-1)
    blocks = e[: total // B].repeat_interleave(B)
    assert torch.equal(flat[real.long()], blocks[s[:total] < T * k].to(flat.dtype))


@needs_ext
def test_cpu_deterministic_and_large():
    ids = random_ids(4099, 8, 64)
    a = vops.moe_align_block_size(ids, 64, 16, backend="cpu")
    b = vops.moe_align_block_size(ids, 64, 16, backend="cpu")
    check(a, [t.clone() for t in b])
    check(a, golden(ids, 64, 16))


@pytest.mark.parametrize("case", [(7, 2, 6, 4), (5, 3, 20, 2)], ids=str)
def test_triton_matches_golden(case, device):
    T, k, E, B = case
    ids = random_ids(T, k, E, out_of_range=True)
    emap = random_map(E)
    check(vops.moe_align_block_size(ids.to(device), E, B, backend="triton"), golden(ids, E, B))
    check(vops.moe_align_block_size(ids.to(device), E, B, expert_map=emap.to(device), backend="triton"),
          golden(ids, E, B, emap))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_golden(backend):
    for T, k, E, B in CASES + [(4096, 8, 256, 64), (16384, 8, 8, 128), (2256, 16, 160, 32), (3, 32, 1024, 16)]:
        ids = random_ids(T, k, E, out_of_range=True)
        for emap in (None, random_map(E)):
            want = golden(ids, E, B, emap)
            got = vops.moe_align_block_size(ids.cuda(), E, B, expert_map=None if emap is None else emap.cuda(),
                                            backend=backend)
            check(got, want, f"{backend} {(T, k, E, B)}")
            again = vops.moe_align_block_size(ids.cuda(), E, B, expert_map=None if emap is None else emap.cuda(),
                                              backend=backend)
            check(again, want, "determinism")


@pytest.mark.parametrize("backend", HOST_BACKENDS)
def test_opcheck(backend):
    ids = random_ids(9, 2, 6)
    torch.library.opcheck(OP, (ids, 6, 4, None, backend))
    torch.library.opcheck(OP, (ids.long(), 6, 4, random_map(6), backend))


@pytest.mark.parametrize("backend", HOST_BACKENDS + ["triton"])
def test_errors(backend):
    ids = random_ids(4, 2, 6)
    if backend == "triton":  # its one-hot tiles bound E; the check names the argument and the limit
        with pytest.raises(ValueError, match="num_experts <= 65536"):
            vops.moe_align_block_size(ids, 65537, 4, backend=backend)
    with pytest.raises(ValueError, match="2-D"):
        vops.moe_align_block_size(ids.reshape(-1), 6, 4, backend=backend)
    with pytest.raises(TypeError, match="int32 or int64"):
        vops.moe_align_block_size(ids.float(), 6, 4, backend=backend)
    with pytest.raises(ValueError, match="block_size"):
        vops.moe_align_block_size(ids, 6, 0, backend=backend)
    with pytest.raises(ValueError, match="num_experts"):
        vops.moe_align_block_size(ids, 0, 4, backend=backend)
    with pytest.raises(ValueError, match="expert_map"):
        vops.moe_align_block_size(ids, 6, 4, expert_map=torch.zeros(5, dtype=torch.int32), backend=backend)
    with pytest.raises(TypeError, match="expert_map"):
        vops.moe_align_block_size(ids, 6, 4, expert_map=torch.zeros(6), backend=backend)
