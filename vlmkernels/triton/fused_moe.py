"""Triton fused MoE experts (vLLM-style): two grouped GEMMs over tokens sorted by expert.

Layout: ``moe_align_block_size(ids, E, BLOCK_M)`` gives ``sorted_token_ids`` (flattened slot ids
``t*k+j``, grouped by expert, each expert's segment padded to ``BLOCK_M`` with the sentinel ``T*k``)
and one ``expert_id`` per ``BLOCK_M`` rows. Every program owns one ``[BLOCK_M, BLOCK_N]`` tile of
one expert.

* GEMM1 reads the A rows ``hidden[slot // k]`` straight from ``hidden`` (the gather is fused into
  the load), multiplies by the gate rows and the up rows of ``gate_up_proj[e]`` in the same K loop
  (two fp32 accumulators) and stores ``act(gate) * up`` in the epilogue: ``[T*k, I]`` in the
  activation dtype, indexed by slot.
* GEMM2 reads those rows, multiplies by ``down_proj[e]``, scales by the routing weight of the slot
  and stores fp32 rows of a ``[T*k, H]`` buffer (the scatter is fused into the store).
* Decode: when ``T*k*4 <= E`` (vLLM's "naive block assignment") the align pass is skipped and
  block ``b`` holds slot ``b`` alone (``expert_ids`` = the ids themselves): one launch fewer, and at
  that size nearly every block would hold a single slot anyway.
* Combine: ``buffer.view(T, k, H).sum(1)``. We use a per-slot buffer + sum rather than atomic adds
  into ``[T, H]`` because it is deterministic (batch-invariant, same bits run to run, the order of
  the k terms is fixed), needs no fp32 atomics or zero-initialised fp32 output plus a cast pass, and
  matches HF's own ``reshape + sum`` combine. Its cost, ``T*k*H*4`` bytes, is bounded by chunking
  the tokens (``PER_SLOT_BUFFER_BYTES``, at most ``CHUNK_TOKENS`` tokens per chunk).

Tile configs (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) come from JSON files in
``vlmkernels/configs/`` named ``fused_moe_E=<E>,N=<I>,H=<H>,dtype=<dtype>,device=<name>.json``,
each mapping a token count M to a config (nearest M wins), else from :func:`default_config`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import torch
import triton
import triton.language as tl

log = logging.getLogger("vlmkernels")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CHUNK_TOKENS = 16 * 1024
PER_SLOT_BUFFER_BYTES = 256 << 20
NAIVE_SLOTS_PER_EXPERT = 4  # naive blocks when T*k*4 <= E (vLLM's threshold)
ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ---- kernel -------------------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gate_activation(g, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:  # silu
        return g * _sigmoid(g)
    elif ACTIVATION == 1:  # erf gelu
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # tanh gelu; tanh(y) = 2*sigmoid(2y) - 1 avoids a libdevice dependency
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (1.0 + (2.0 * _sigmoid(2.0 * y) - 1.0))


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, w_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
    N, K, EM, num_valid, num_experts, up_offset,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr,        # k for GEMM1 (A = hidden), 1 for GEMM2 (A = slot rows)
    GATED: tl.constexpr,            # GEMM1: act(gate) * up epilogue
    ACTIVATION: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,  # GEMM2: scale rows by their routing weight
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,       # interpreter only: its bf16 tl.dot is wrong (triton 3.8)
    NAIVE: tl.constexpr,            # decode: block b = slot b alone, expert_ids_ptr = ids, no align pass
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ordering: consecutive programs share B tiles of one expert in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    if NAIVE:
        slot = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_valid)
    else:
        if pid_m * BLOCK_M >= tl.load(num_post_pad_ptr):
            return  # padding blocks past the last expert's segment
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slot = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < EM, other=num_valid)
    row_ok = slot < num_valid
    slot64 = slot.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    c_ptrs = c_ptr + slot64[:, None] * stride_cm + offs_n[None, :] * stride_cn
    store_mask = row_ok[:, None] & col_ok[None, :]

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if (expert < 0) | (expert >= num_experts):
        # a dropped expert (expert-parallel sentinel): its slots contribute zero
        tl.store(c_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=c_ptr.dtype.element_ty), mask=store_mask)
        return

    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (slot64 // A_ROW_DIV)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED:
            b_up = tl.load(b_ptrs + up_offset * stride_bn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if GATED:
        acc = _gate_activation(acc, ACTIVATION) * acc_up
    if MUL_ROUTED_WEIGHT:
        w = tl.load(w_ptr + slot64, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=store_mask)


# ---- configs --------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", torch.cuda.get_device_name(device))


def config_file_name(E: int, N: int, H: int, dtype: torch.dtype, device: str) -> str:
    return f"fused_moe_E={E},N={N},H={H},dtype={_DTYPE_NAMES[dtype]},device={device}.json"


@functools.lru_cache(maxsize=None)
def _load_configs(path: str) -> dict[int, dict] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        raw = json.load(f)
    return {int(m): cfg for m, cfg in raw.items() if not m.startswith("_")}


def default_config(M: int, E: int, N: int, H: int, dtype: torch.dtype, device_type: str) -> dict:
    """vLLM's defaults: skinny tiles while most experts see under one block of tokens."""
    if device_type != "cuda":
        # the interpreter runs every tile in numpy: the smallest legal tl.dot tiles are fastest
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)
    if M <= E:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


def get_config(M: int, E: int, N: int, H: int, dtype: torch.dtype, device: torch.device) -> dict:
    name = device_name(device)
    table = _load_configs(os.path.join(CONFIG_DIR, config_file_name(E, N, H, dtype, name)))
    if not table:
        return default_config(M, E, N, H, dtype, device.type)
    best = min(table, key=lambda m: abs(m - M))
    return dict(default_config(M, E, N, H, dtype, device.type), **table[best])


# ---- launcher -------------------------------------------------------------------------------------

def _launch(a, b, c, w, sorted_ids, expert_ids, num_post_pad, *, N, K, num_valid, up_offset,
            a_row_div, gated, activation, mul_weight, cfg, naive):
    EM = num_valid * cfg["BLOCK_M"] if naive else sorted_ids.numel()
    if EM == 0:
        return
    grid = (triton.cdiv(EM, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    # fp32 stays full precision like torch.matmul (no tf32); the interpreter (CPU tensors) gets its
    # bf16 products in fp32, which is exact for bf16 inputs
    upcast = a.device.type == "cpu" and a.dtype == torch.bfloat16
    precision = "ieee" if (a.dtype == torch.float32 or upcast) else "tf32"
    _moe_gemm_kernel[grid](
        a, b, c, w if w is not None else c,
        sorted_ids, expert_ids, num_post_pad,
        N, K, EM, num_valid, b.shape[0], up_offset,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
        MUL_ROUTED_WEIGHT=mul_weight, DOT_PRECISION=precision, DOT_UPCAST=upcast, NAIVE=naive,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _align(ids: torch.Tensor, num_experts: int, block_m: int):
    from .. import ops  # the align op lives in the moe family; imported lazily to avoid a cycle

    return ops.moe_align_block_size(ids, num_experts, block_m)


def fused_moe(hidden, gate_up_proj, down_proj, weights, ids, activation="silu", config=None):
    """Triton fused experts; inputs already validated by :func:`vlmkernels.ops.fused_moe`."""
    T, H = hidden.shape
    k = ids.shape[1]
    if T == 0 or k == 0:
        return torch.zeros_like(hidden)
    # bound the fp32 per-slot buffer (T*k*H*4 bytes) by chunking the tokens
    chunk = max(1, min(CHUNK_TOKENS, PER_SLOT_BUFFER_BYTES // (k * H * 4)))
    if T <= chunk:
        return _fused_moe_chunk(hidden, gate_up_proj, down_proj, weights, ids, activation, config)
    out = torch.empty_like(hidden)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        out[t0:t1] = _fused_moe_chunk(hidden[t0:t1], gate_up_proj, down_proj, weights[t0:t1],
                                      ids[t0:t1], activation, config)
    return out


def _fused_moe_chunk(hidden, gate_up_proj, down_proj, weights, ids, activation, config):
    T, H = hidden.shape
    E, two_i, _ = gate_up_proj.shape
    inter = two_i // 2
    k = ids.shape[1]
    cfg = config or get_config(T, E, inter, H, hidden.dtype, hidden.device)
    # vLLM's naive block assignment: when there are several times more experts than slots, most
    # blocks would hold one slot anyway, so skip the align launch and give each slot its own block
    naive = cfg.get("NAIVE", T * k * NAIVE_SLOTS_PER_EXPERT <= E)
    if naive:
        flat_ids = ids.reshape(-1)
        sorted_ids, expert_ids, num_post_pad = flat_ids, flat_ids, flat_ids
    else:
        sorted_ids, expert_ids, num_post_pad = _align(ids, E, cfg["BLOCK_M"])
    # slots the align drops (never happens for validated ids) must still read as zero in the sum
    act = torch.empty((T * k, inter), device=hidden.device, dtype=hidden.dtype)
    per_slot = torch.zeros((T * k, H), device=hidden.device, dtype=torch.float32)
    common = dict(num_valid=T * k, activation=activation, cfg=cfg, naive=naive)
    _launch(hidden, gate_up_proj, act, None, sorted_ids, expert_ids, num_post_pad,
            N=inter, K=H, up_offset=inter, a_row_div=k, gated=True, mul_weight=False, **common)
    _launch(act, down_proj, per_slot, weights.reshape(-1), sorted_ids, expert_ids, num_post_pad,
            N=H, K=inter, up_offset=0, a_row_div=1, gated=False, mul_weight=True, **common)
    if k == 1:  # nothing to combine: skip the reduction launch
        return per_slot.to(hidden.dtype)
    return per_slot.view(T, k, H).sum(dim=1).to(hidden.dtype)


# ---- ahead-of-time compile check and tuning ---------------------------------------------------------


def aot_compile(dtype: str = "bf16", gated: bool = True, arch: int = 90, cfg: dict | None = None,
                activation: str = "silu", naive: bool = False):
    """Compile one kernel variant for ``sm_<arch>`` without a GPU (CI check that the kernel builds).

    Needs a process without ``TRITON_INTERPRET=1`` (under it ``triton.jit`` returns an interpreter).
    """
    from .aot import aot_compile as compile_for

    cfg = cfg or default_config(4096, 8, 128, 128, torch.bfloat16, "cuda")
    types = {}
    for n in _moe_gemm_kernel.arg_names:
        if n in ("a_ptr", "b_ptr"):
            types[n] = "*" + dtype
        elif n == "c_ptr":
            types[n] = "*" + (dtype if gated else "fp32")
        elif n == "w_ptr":
            types[n] = "*fp32"
        elif n.endswith("_ptr"):
            types[n] = "*i32"
    values = dict(A_ROW_DIV=2 if gated else 1, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
                  MUL_ROUTED_WEIGHT=not gated, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                  DOT_UPCAST=False, NAIVE=naive, **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})
    return compile_for(_moe_gemm_kernel, types, values, arch=arch, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"])


TUNE_SPACE = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s)
              for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (32, 64, 128)
              for g in (1, 8) for w in (4, 8) for s in (3, 4)
              if not (bm == 128 and bn == 128 and bk == 128)]


def tune(E: int, N: int, H: int, dtype: torch.dtype, top_k: int, Ms=(1, 16, 64, 256, 1024, 4096),
         space=None, write: bool = True) -> dict[int, dict]:
    """Time every config of ``space`` on the current GPU for each token count M and write the
    fastest to ``configs/`` (the file :func:`get_config` reads). Run on the target GPU; minutes."""
    from triton.testing import do_bench

    dev = torch.device("cuda")
    gate_up = torch.randn(E, 2 * N, H, device=dev, dtype=dtype) / H**0.5
    down = torch.randn(E, H, N, device=dev, dtype=dtype) / N**0.5
    best: dict[int, dict] = {}
    for M in Ms:
        hidden = torch.randn(M, H, device=dev, dtype=dtype)
        ids = torch.stack([torch.randperm(E, device=dev)[:top_k] for _ in range(M)]).int()
        weights = torch.rand(M, top_k, device=dev).softmax(-1)
        timings = []
        for cfg in space or TUNE_SPACE:
            try:
                ms = do_bench(lambda: fused_moe(hidden, gate_up, down, weights, ids, config=cfg), rep=20)
            except Exception as e:  # out of shared memory / registers for this tile: skip it
                log.debug("fused_moe tune: %s failed: %s", cfg, e)
                continue
            timings.append((ms, cfg))
        best[M] = min(timings, key=lambda t: t[0])[1]
        log.info("fused_moe tune E=%d N=%d H=%d M=%d: %s (%.1f us)", E, N, H, M, best[M],
                 1e3 * min(t[0] for t in timings))
    if write:
        path = os.path.join(CONFIG_DIR, config_file_name(E, N, H, dtype, device_name(dev)))
        os.makedirs(CONFIG_DIR, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"_triton_version": triton.__version__, **{str(m): c for m, c in best.items()}}, f, indent=1)
        _load_configs.cache_clear()
    return best
