"""Triton fused MoE experts (vLLM-style): two grouped GEMMs over tokens sorted by expert, then a
deterministic k-way sum.

Layout: ``moe_align_block_size(ids, E, BLOCK_M)`` gives ``sorted_token_ids`` (flattened slot ids
``t*k+j``, grouped by expert, each expert's segment padded to ``BLOCK_M`` with the sentinel ``T*k``)
and one ``expert_id`` per ``BLOCK_M`` rows. Every program owns one ``[BLOCK_M, BLOCK_N]`` tile of
one expert.

* GEMM1 reads the A rows ``hidden[slot // k]`` straight from ``hidden`` (the gather is fused into
  the load), multiplies by the gate rows and the up rows of ``gate_up_proj[e]`` in the same K loop
  (two fp32 accumulators) and stores ``act(gate) * up`` in the epilogue: ``[T*k, I]`` in the
  activation dtype, indexed by slot.
* GEMM2 reads those rows, multiplies by ``down_proj[e]``, scales the fp32 accumulator by the routing
  weight of the slot and stores the row in the activation dtype into a ``[T*k, H]`` buffer (the
  scatter is fused into the store).
* Decode: when ``T*k*4 <= E`` (vLLM's "naive block assignment") the align pass is skipped and
  block ``b`` holds slot ``b`` alone (``expert_ids`` = the ids themselves): one launch fewer, and at
  that size nearly every block would hold a single slot anyway.
* Combine (vLLM's ``moe_sum``): ``out[t] = sum_j rows[t*k + j]`` in fp32, cast once, the k terms in
  slot order: deterministic (same bits run to run, batch-invariant), no atomics and no
  zero-initialised buffer. Slots whose id lies outside ``[0, E)`` (expert-parallel sentinels) are
  never computed and the sum skips their rows, so they add exactly 0 whatever their weight.

Tokens are processed in chunks of up to ``CHUNK_TOKENS`` (vLLM's default chunk size), fewer only
where the chunk's intermediate buffers would not fit in free memory: every expert's weights are
read once per chunk.

fp32 inputs use TF32 tensor cores only where torch allows them for its own fp32 matmuls
(``torch.backends.cuda.matmul.allow_tf32``, which ``torch.set_float32_matmul_precision`` sets);
otherwise IEEE fp32.

Tile configs (BLOCK_M/N/K, GROUP_M, num_warps, num_stages) come from JSON files named
``fused_moe_E=<E>,N=<I>,H=<H>,dtype=<dtype>,device=<name>.json``, each mapping a token count M to a
config (nearest M wins), looked up first in the user's config folder (:func:`user_config_dir`,
where :func:`tune` writes), then in the packaged ``vlmkernels/configs/`` (configs committed from
GPU runs), else :func:`default_config`.
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

from .launch import launcher

log = logging.getLogger("vlmkernels")

PACKAGED_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_DIR_ENV = "VLMKERNELS_CONFIG_DIR"  # overrides the user config folder
CHUNK_TOKENS = 32 * 1024  # vLLM's VLLM_FUSED_MOE_CHUNK_SIZE
CPU_BUFFER_BYTES = 1 << 30  # chunk buffers' cap for CPU tensors (the interpreter): no free-memory query
UNCHECKED_BUFFER_BYTES = 64 << 20  # buffers this small skip the free-memory query (decode, graph capture)
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
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped ordering: ``GROUP_M`` row tiles walk the column tiles
    together, so consecutive programs share weight tiles in L2."""
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m


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
    pid_m, pid_n = grouped_pid(tl.program_id(0), tl.cdiv(EM, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

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

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if (expert < 0) | (expert >= num_experts):
        return  # a dropped slot (expert-parallel sentinel): _moe_sum_kernel never reads its row

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
    c_ptrs = c_ptr + slot64[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_sum_kernel(rows_ptr, ids_ptr, out_ptr, H, num_experts, stride_row, stride_out,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """``out[t] = sum_j rows[t*k + j]`` over the slots routed to an expert in ``[0, E)``: fp32
    accumulation in slot order, one rounding to the output dtype. Dropped slots' rows are never
    read (nothing wrote them)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + t * TOP_K + j)
        kept = (expert >= 0) & (expert < num_experts)
        row = tl.load(rows_ptr + (t * TOP_K + j) * stride_row + offs, mask=col_ok & kept, other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


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


def user_config_dir() -> str:
    """Where :func:`tune` writes and :func:`get_config` looks first: ``$VLMKERNELS_CONFIG_DIR``, else
    ``$XDG_CACHE_HOME/vlmkernels/configs``, else ``~/.cache/vlmkernels/configs``."""
    if os.environ.get(CONFIG_DIR_ENV):
        return os.environ[CONFIG_DIR_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vlmkernels", "configs")


def _config_table(file_name: str) -> dict[int, dict] | None:
    """The first table found: the user's (tuned on this machine) before the packaged one."""
    for folder in (user_config_dir(), PACKAGED_CONFIG_DIR):
        table = _load_configs(os.path.join(folder, file_name))
        if table:
            return table
    return None


def get_config(M: int, E: int, N: int, H: int, dtype: torch.dtype, device: torch.device) -> dict:
    table = _config_table(config_file_name(E, N, H, dtype, device_name(device)))
    if not table:
        return default_config(M, E, N, H, dtype, device.type)
    best = min(table, key=lambda m: abs(m - M))
    return dict(default_config(M, E, N, H, dtype, device.type), **table[best])


def write_configs(best: dict[int, dict], E: int, N: int, H: int, dtype: torch.dtype, device: str,
                  config_dir: str | None = None) -> str:
    """Write a tuned table where :func:`get_config` finds it (``config_dir``, default
    :func:`user_config_dir`); returns the file's path."""
    folder = config_dir or user_config_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, config_file_name(E, N, H, dtype, device))
    with open(path, "w") as f:
        json.dump({"_triton_version": triton.__version__, **{str(m): c for m, c in best.items()}}, f, indent=1)
    _load_configs.cache_clear()
    return path


# ---- launcher -------------------------------------------------------------------------------------

def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for fp32 inputs only where torch allows it for its own fp32
    matmuls (``torch.backends.cuda.matmul.allow_tf32``, set by ``set_float32_matmul_precision``).
    16-bit inputs ignore it; so does the interpreter, whose bf16 upcast is exact in TF32 anyway."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def chunk_tokens(T: int, k: int, inter: int, H: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: up to ``CHUNK_TOKENS``, fewer only where a chunk's buffers (``[C*k, I]``
    activations, ``[C*k, H]`` slot rows, ids and align output) would exceed :func:`_buffer_budget`."""
    per_token = k * ((inter + H) * dtype.itemsize + 8)
    chunk = min(T, CHUNK_TOKENS)
    if chunk * per_token <= UNCHECKED_BUFFER_BYTES:
        return chunk
    return max(1, min(chunk, _buffer_budget(device) // per_token))


def _buffer_budget(device: torch.device) -> int:
    """Half the free memory on CUDA (the rest stays for the caller and fragmentation); on CPU a fixed cap."""
    if device.type != "cuda":
        return CPU_BUFFER_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    # blocks torch's caching allocator holds but does not use are free to this op too
    return (free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)) // 2


def _launch(a, b, c, w, sorted_ids, expert_ids, num_post_pad, *, N, K, num_valid, up_offset,
            a_row_div, gated, activation, mul_weight, cfg, naive):
    EM = num_valid * cfg["BLOCK_M"] if naive else sorted_ids.numel()
    if EM == 0:
        return
    grid = (triton.cdiv(EM, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, c, w if w is not None else c,
        sorted_ids, expert_ids, num_post_pad,
        N, K, EM, num_valid, b.shape[0], up_offset,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=a_row_div, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
        MUL_ROUTED_WEIGHT=mul_weight, DOT_PRECISION=dot_precision(a.dtype),
        # the interpreter's bf16 tl.dot is wrong (triton 3.8): it gets the products in fp32
        DOT_UPCAST=a.device.type == "cpu" and a.dtype == torch.bfloat16, NAIVE=naive,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def _moe_sum(rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor, num_experts: int) -> None:
    T, H = out.shape
    block_h = min(1024, triton.next_power_of_2(H))
    _moe_sum_kernel[(T, triton.cdiv(H, block_h))](
        rows, ids, out, H, num_experts, rows.stride(0), out.stride(0), TOP_K=ids.shape[1], BLOCK_H=block_h,
    )


def _align(ids: torch.Tensor, num_experts: int, block_m: int):
    from .. import ops  # the align op lives in the moe family; imported lazily to avoid a cycle

    return ops.moe_align_block_size(ids, num_experts, block_m)


@launcher
def fused_moe(hidden, gate_up_proj, down_proj, weights, ids, activation="silu", config=None):
    """Triton fused experts; inputs already validated by :func:`vlmkernels.ops.fused_moe`, ``weights``
    and ``ids`` contiguous."""
    T, H = hidden.shape
    inter = gate_up_proj.shape[1] // 2
    k = ids.shape[1]
    out = hidden.new_empty((T, H))
    if T == 0 or k == 0 or H == 0:  # nothing to compute (the reference returns the same)
        return out.zero_()
    chunk = chunk_tokens(T, k, inter, H, hidden.dtype, hidden.device)
    # one pair of buffers for every chunk; every row the sum reads is written first: no zero fill
    act = hidden.new_empty((chunk * k, inter))
    rows = hidden.new_empty((chunk * k, H))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        _fused_moe_chunk(hidden[t0:t1], gate_up_proj, down_proj, weights[t0:t1], ids[t0:t1],
                         act, rows, out[t0:t1], activation, config)
    return out


def _fused_moe_chunk(hidden, gate_up_proj, down_proj, weights, ids, act, rows, out, activation, config):
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
    act, rows = act[:T * k], rows[:T * k]
    common = dict(num_valid=T * k, activation=activation, cfg=cfg, naive=naive)
    _launch(hidden, gate_up_proj, act, None, sorted_ids, expert_ids, num_post_pad,
            N=inter, K=H, up_offset=inter, a_row_div=k, gated=True, mul_weight=False, **common)
    _launch(act, down_proj, rows, weights.reshape(-1), sorted_ids, expert_ids, num_post_pad,
            N=H, K=inter, up_offset=0, a_row_div=1, gated=False, mul_weight=True, **common)
    _moe_sum(rows, ids, out, E)


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
        if n in ("a_ptr", "b_ptr", "c_ptr"):
            types[n] = "*" + dtype
        elif n == "w_ptr":
            types[n] = "*fp32"
        elif n.endswith("_ptr"):
            types[n] = "*i32"
    values = dict(A_ROW_DIV=2 if gated else 1, GATED=gated, ACTIVATION=ACTIVATION_CODES[activation],
                  MUL_ROUTED_WEIGHT=not gated, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                  DOT_UPCAST=False, NAIVE=naive, **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")})
    return compile_for(_moe_gemm_kernel, types, values, arch=arch, num_warps=cfg["num_warps"],
                       num_stages=cfg["num_stages"])


def aot_compile_sum(dtype: str = "bf16", top_k: int = 8, arch: int = 90, ids_dtype: str = "i32"):
    """Compile the k-way sum for ``sm_<arch>`` without a GPU (see :func:`aot_compile`)."""
    from .aot import aot_compile as compile_for

    types = {"rows_ptr": "*" + dtype, "out_ptr": "*" + dtype, "ids_ptr": "*" + ids_dtype}
    return compile_for(_moe_sum_kernel, types, dict(TOP_K=top_k, BLOCK_H=1024), arch=arch)


TUNE_SPACE = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=g, num_warps=w, num_stages=s)
              for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (32, 64, 128)
              for g in (1, 8) for w in (4, 8) for s in (3, 4)
              if not (bm == 128 and bn == 128 and bk == 128)]


def tune(E: int, N: int, H: int, dtype: torch.dtype, top_k: int, Ms=(1, 16, 64, 256, 1024, 4096),
         space=None, write: bool = True, config_dir: str | None = None) -> dict[int, dict]:
    """Time every config of ``space`` on the current GPU for each token count M; with ``write``, save
    the fastest per M in ``config_dir`` (default :func:`user_config_dir`, never the installed package),
    where :func:`get_config` reads it. Run on the target GPU; minutes. Copy the file into
    ``vlmkernels/configs/`` to ship it with the package."""
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
        log.info("fused_moe tune: wrote %s", write_configs(best, E, N, H, dtype, device_name(dev), config_dir))
    return best
