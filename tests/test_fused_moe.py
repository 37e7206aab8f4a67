"""fused_moe: parity with HF v5's experts math and with python_ref, every backend runnable here."""

import json
import os

import pytest
import torch

import vlmkernels
from python_ref.ops.moe_experts import fused_moe as ref_fused_moe
from tests.helpers import assert_close, run_without_interpreter, tol
from vlmkernels import ops
from vlmkernels.triton import fused_moe as tri

OP = torch.ops.vlmkernels.fused_moe.default


def make_inputs(T, H, E, inter, k, dtype=torch.float32, weights_dtype=torch.float32, ids_dtype=torch.int64,
                device="cpu"):
    """Random layer with distinct experts per token; scales keep activations O(1)."""
    g = torch.Generator().manual_seed(1000 * T + 10 * E + k)
    hidden = torch.randn(T, H, generator=g).to(device, dtype)
    gate_up = (torch.randn(E, 2 * inter, H, generator=g) / H**0.5).to(device, dtype)
    down = (torch.randn(E, H, inter, generator=g) / inter**0.5).to(device, dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.empty(0, k)
    weights = torch.rand(T, k, generator=g).softmax(-1)
    return hidden, gate_up, down, weights.to(device, weights_dtype), ids.to(device, ids_dtype)


def hf_experts(hidden, gate_up, down, weights, ids, impl="eager", act="silu"):
    """transformers' own experts forward (Mixtral's v5 class) on the same weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, two_i, H = gate_up.shape
    cfg = MixtralConfig(hidden_size=H, intermediate_size=two_i // 2, num_local_experts=E,
                        num_experts_per_tok=ids.shape[1], hidden_act=act)
    cfg._experts_implementation = impl
    mod = MixtralExperts(cfg).to(hidden.dtype)
    with torch.no_grad():
        mod.gate_up_proj.copy_(gate_up)
        mod.down_proj.copy_(down)
        return mod(hidden, ids.long(), weights)


def f64_reference(hidden, gate_up, down, weights, ids, activation="silu"):
    return ref_fused_moe(hidden.double(), gate_up.double(), down.double(), weights.double(), ids,
                         activation=activation)


# ---- reference == HF ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_reference_matches_hf_experts(dtype, impl):
    args = make_inputs(11, 24, 6, 16, 2, dtype)  # grouped_mm wants 16-byte strides
    got = ref_fused_moe(*args)
    want = hf_experts(*args, impl=impl)
    assert got.dtype == want.dtype == dtype
    assert_close(got, want, msg=f"reference vs HF {impl}")


# ---- every backend vs python_ref ---------------------------------------------------------------

SHAPES = [  # (T, H, E, I, k): odd and prime sizes, k=1 and k=E, one expert
    (7, 20, 5, 12, 2),
    (13, 33, 3, 17, 3),
    (1, 16, 4, 16, 1),
    (5, 19, 1, 7, 1),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}H{}E{}I{}k{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_backends_match_reference(backend, shape, dtype):
    args = make_inputs(*shape, dtype=dtype)
    out = ops.fused_moe(*args, backend=backend)
    assert out.dtype == dtype and out.shape == args[0].shape
    atol, rtol = tol(dtype)
    if dtype != torch.float32:  # the intermediate act(gate)*up is rounded to dtype, like HF
        atol, rtol = 2 * atol, 2 * rtol
    assert_close(out, f64_reference(*args).to(dtype) if dtype == torch.float32 else ref_fused_moe(*args),
                 atol=atol, rtol=rtol, msg=f"{backend} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_hf_experts(dtype):
    args = make_inputs(9, 32, 8, 16, 2, dtype)
    assert_close(ops.fused_moe(*args, backend="triton"), hf_experts(*args, impl="eager"), msg="triton vs HF")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_triton_activations(activation):
    args = make_inputs(6, 20, 4, 12, 2)
    out = ops.fused_moe(*args, activation=activation, backend="triton")
    assert_close(out, f64_reference(*args, activation=activation).float(), msg=activation)
    hf_act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[activation]
    assert_close(out, hf_experts(*args, act=hf_act), msg=f"{activation} vs HF")


def test_triton_int32_ids_bf16_weights_and_strided_inputs():
    hidden, gate_up, down, weights, ids = make_inputs(8, 20, 5, 12, 2, weights_dtype=torch.bfloat16,
                                                      ids_dtype=torch.int32)
    want = ref_fused_moe(hidden, gate_up, down, weights, ids)
    # hidden as a column slice, expert weights stored transposed: the kernel takes any strides
    hidden_s = torch.cat([hidden, torch.randn(8, 3)], 1)[:, :20]
    gate_up_t = gate_up.transpose(1, 2).contiguous().transpose(1, 2)
    down_t = down.transpose(1, 2).contiguous().transpose(1, 2)
    assert not hidden_s.is_contiguous() and not gate_up_t.is_contiguous()
    out = ops.fused_moe(hidden_s, gate_up_t, down_t, weights.t().contiguous().t(), ids, backend="triton")
    assert_close(out, want, msg="strided")


def test_duplicate_expert_in_row_and_nan_isolated():
    hidden, gate_up, down, weights, ids = make_inputs(6, 16, 4, 8, 2)
    ids[2] = torch.tensor([3, 3])  # the same expert twice: both slots count
    hidden[4, 5] = float("nan")
    out = ops.fused_moe(hidden, gate_up, down, weights, ids, backend="triton")
    want = ref_fused_moe(hidden, gate_up, down, weights, ids)
    assert torch.isnan(out[4]).all() and not torch.isnan(out[torch.arange(6) != 4]).any()
    assert_close(out, want, msg="dup/nan")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_tokens(backend):
    args = make_inputs(0, 16, 4, 8, 2)
    out = ops.fused_moe(*args, backend=backend)
    assert out.shape == (0, 16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_dims_agree_across_backends(backend):
    out = ops.fused_moe(*make_inputs(3, 0, 4, 8, 2), backend=backend)  # H = 0: an empty result
    assert out.shape == (3, 0)
    out = ops.fused_moe(*make_inputs(3, 16, 4, 8, 0), backend=backend)  # k = 0: no expert adds anything
    assert out.shape == (3, 16) and not out.any()
    hidden, gate_up, down, weights, ids = make_inputs(3, 16, 4, 8, 2)
    with pytest.raises(ValueError, match="gate_up_proj"):  # I = 0 is rejected by every backend alike
        ops.fused_moe(hidden, gate_up[:, :0], down[..., :0], weights, ids, backend=backend)


def test_default_id_check_skips_tensors_without_data():
    """meta and fake tensors have no values to check: the default check_ids must not read them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = [t.to("meta") for t in make_inputs(3, 16, 4, 8, 2)]
    assert ops.fused_moe(*meta).shape == (3, 16)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in make_inputs(3, 16, 4, 8, 2)]
        assert ops.fused_moe(*fake).shape == (3, 16)


def test_auto_backend_on_cpu_is_reference():
    assert vlmkernels.registry.select("fused_moe", "auto", "cpu")[0] == "reference"
    assert vlmkernels.registry._entry("fused_moe").preference["cuda"][0] == "triton"


# ---- autograd ------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_reference_backward_is_the_autograd_vjp(activation):
    from python_ref.ops.moe_experts import fused_moe_backward as ref_backward

    args = [t.double() for t in make_inputs(7, 12, 4, 6, 3)[:4]]
    ids = make_inputs(7, 12, 4, 6, 3)[4]
    ids[1] = torch.tensor([2, 2, 0])  # a repeated expert within a row
    leaves = [t.clone().requires_grad_() for t in args]
    grad = torch.randn(7, 12, dtype=torch.float64)
    want = torch.autograd.grad(ref_fused_moe(*leaves, ids, activation=activation), leaves, grad)
    got = ref_backward(grad, *args, ids, activation=activation)
    for g, w, name in zip(got, want, ("hidden", "gate_up", "down", "weights")):
        assert_close(g, w, msg=f"{activation} d{name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_matches_float64_autograd(backend):
    hidden, gate_up, down, weights, ids = make_inputs(5, 12, 3, 8, 2)
    leaves = [t.clone().requires_grad_() for t in (hidden, gate_up, down, weights)]
    ops.fused_moe(*leaves, ids, backend=backend).square().sum().backward()
    refs = [t.double().requires_grad_() for t in (hidden, gate_up, down, weights)]
    ref_fused_moe(*refs, ids).square().sum().backward()
    for got, want, name in zip(leaves, refs, ("hidden", "gate_up", "down", "weights")):
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad.float(), atol=1e-4, rtol=1e-4, msg=f"grad {name}")


def test_backward_only_requested_inputs_and_bf16():
    hidden, gate_up, down, weights, ids = make_inputs(4, 16, 4, 8, 2, torch.bfloat16)
    hidden.requires_grad_()
    ops.fused_moe(hidden, gate_up, down, weights, ids).float().sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16 and gate_up.grad is None
    h64 = hidden.detach().double().requires_grad_()
    ref_fused_moe(h64, gate_up.double(), down.double(), weights.double(), ids).sum().backward()
    assert_close(hidden.grad, h64.grad.to(torch.bfloat16), atol=4e-2, rtol=4e-2)


# ---- errors ---------------------------------------------------------------------------------

def test_errors_name_the_argument():
    hidden, gate_up, down, weights, ids = make_inputs(4, 16, 4, 8, 2)
    cases = [
        ((hidden[0], gate_up, down, weights, ids), ValueError, "hidden"),
        ((hidden, gate_up[:, :-1], down, weights, ids), ValueError, "gate_up_proj"),
        ((hidden, gate_up, down[:, :, :-1], weights, ids), ValueError, "down_proj"),
        ((hidden, gate_up.double(), down, weights, ids), TypeError, "gate_up_proj"),
        ((hidden.double(), gate_up.double(), down.double(), weights, ids), TypeError, "hidden"),
        ((hidden, gate_up, down, weights[:, :1], ids), ValueError, "weights"),
        ((hidden, gate_up, down, weights, ids[:3]), ValueError, "ids"),
        ((hidden, gate_up, down, weights, ids.float()), TypeError, "ids"),
        ((hidden, gate_up, down, weights, ids + 3), ValueError, r"ids must be in \[0, E=4\)"),
        ((hidden, gate_up, down, weights, ids - 1), ValueError, "ids must be in"),
    ]
    for args, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            ops.fused_moe(*args)
    with pytest.raises(ValueError, match="activation"):
        ops.fused_moe(hidden, gate_up, down, weights, ids, activation="relu")
    with pytest.raises(ValueError, match="backend"):
        ops.fused_moe(hidden, gate_up, down, weights, ids, backend="nope")


TINY_CFG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1)


@pytest.mark.parametrize("backend,naive", [("reference", None), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("bad_weight", [0.3, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unchecked_out_of_range_ids_are_dropped(backend, naive, bad_weight, dtype):
    """EP sentinels add exactly 0 to their token, even with a NaN/Inf weight (no 0 * NaN)."""
    hidden, gate_up, down, weights, ids = make_inputs(5, 16, 4, 8, 2, dtype)
    bad, w = ids.clone(), weights.clone()
    bad[1, 0], bad[3, 1] = 4, -1
    w[1, 0] = w[3, 1] = bad_weight
    keep = bad.ge(0) & bad.lt(4)
    want = ref_fused_moe(hidden, gate_up, down, torch.where(keep, weights, 0), ids)
    assert_close(ref_fused_moe(hidden, gate_up, down, w, bad), want, atol=0, rtol=0, msg="python_ref")
    if backend == "triton":
        got = tri.fused_moe(hidden, gate_up, down, w, bad, config=dict(TINY_CFG, NAIVE=naive))
    else:
        got = ops.fused_moe(hidden, gate_up, down, w, bad, backend=backend, check_ids=False)
    assert torch.isfinite(got).all()
    atol, rtol = tol(dtype)
    assert_close(got, want, atol=2 * atol, rtol=2 * rtol, msg="dropped ids")
    with pytest.raises(ValueError, match="ids must be in"):
        ops.fused_moe(hidden, gate_up, down, w, bad, check_ids=True)


def test_op_level_checks_without_functional():
    hidden, gate_up, down, weights, ids = make_inputs(4, 16, 4, 8, 2)
    with pytest.raises(ValueError, match="down_proj"):
        OP(hidden, gate_up, down[:, :-1], weights, ids, "silu", "reference")


# ---- opcheck and compile ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    hidden, gate_up, down, weights, ids = make_inputs(5, 16, 3, 8, 2)
    torch.library.opcheck(OP, (hidden, gate_up, down, weights, ids, "silu", backend))
    if backend == "reference":  # with grads: also traces the backward op through its fake
        leaves = [t.clone().requires_grad_() for t in (hidden, gate_up, down, weights)]
        torch.library.opcheck(OP, (*leaves, ids, "gelu", backend))


def test_opcheck_backward_op():
    hidden, gate_up, down, weights, ids = make_inputs(5, 16, 3, 8, 2)
    grad = torch.randn_like(hidden)
    torch.library.opcheck(torch.ops.vlmkernels.fused_moe_backward.default,
                          (grad, hidden, gate_up, down, weights, ids, "silu", "reference"))
    with pytest.raises(ValueError, match="grad"):
        ops.fused_moe_backward(grad[:, :3], hidden, gate_up, down, weights, ids)


def test_compile_fullgraph():
    args = make_inputs(6, 16, 4, 8, 2)

    def f(h, gu, dn, w, i):
        return ops.fused_moe(h, gu, dn, w, i, backend="reference") * 2

    got = torch.compile(f, fullgraph=True, backend="eager")(*args)
    assert_close(got, 2 * ref_fused_moe(*args))


def test_compile_fullgraph_training_step():
    hidden, gate_up, down, weights, ids = make_inputs(6, 16, 4, 8, 2)

    def loss(*leaves):
        return ops.fused_moe(*leaves, ids, backend="reference").square().sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, gate_up, down, weights)]
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (hidden, gate_up, down, weights)]
    loss(*eager).backward()
    for a, b in zip(leaves, eager):
        assert_close(a.grad, b.grad)


# ---- tile configs ----------------------------------------------------------------------------

def test_config_files_nearest_m(tmp_path, monkeypatch):
    name = tri.config_file_name(8, 16, 32, torch.bfloat16, "cpu")
    table = {"1": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
             "256": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}}
    (tmp_path / name).write_text(json.dumps(table))
    monkeypatch.setattr(tri, "PACKAGED_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv(tri.CONFIG_DIR_ENV, str(tmp_path / "user"))  # empty: the packaged file is used
    tri._load_configs.cache_clear()
    dev = torch.device("cpu")
    assert tri.get_config(3, 8, 16, 32, torch.bfloat16, dev)["BLOCK_K"] == 64
    assert tri.get_config(200, 8, 16, 32, torch.bfloat16, dev)["num_warps"] == 8
    # no file for this shape: the default
    assert tri.get_config(3, 8, 16, 64, torch.bfloat16, dev) == tri.default_config(3, 8, 16, 64, torch.bfloat16, "cpu")
    assert tri.default_config(4, 64, 128, 256, torch.bfloat16, "cuda")["BLOCK_M"] == 16
    assert tri.default_config(4096, 64, 128, 256, torch.bfloat16, "cuda")["BLOCK_M"] == 64


def test_user_config_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv(tri.CONFIG_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tri.user_config_dir() == str(tmp_path / "xdg" / "vlmkernels" / "configs")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tri.user_config_dir() == str(tmp_path / "home" / ".cache" / "vlmkernels" / "configs")
    monkeypatch.setenv(tri.CONFIG_DIR_ENV, str(tmp_path / "mine"))
    assert tri.user_config_dir() == str(tmp_path / "mine")


def test_tuned_configs_go_to_the_user_folder_and_win(tmp_path, monkeypatch):
    """tune() writes into the user folder (never the installed package), which get_config reads
    before the packaged configs."""
    packaged, user = tmp_path / "packaged", tmp_path / "user"
    packaged.mkdir()
    monkeypatch.setattr(tri, "PACKAGED_CONFIG_DIR", str(packaged))
    monkeypatch.setenv(tri.CONFIG_DIR_ENV, str(user))
    shape = (8, 16, 32, torch.float16)
    shipped = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)
    (packaged / tri.config_file_name(*shape, "cpu")).write_text(json.dumps({"16": shipped}))
    tri._load_configs.cache_clear()
    dev = torch.device("cpu")
    assert tri.get_config(16, *shape, dev)["num_stages"] == 2
    tuned = dict(shipped, num_stages=5)
    path = tri.write_configs({16: tuned}, *shape, "cpu")
    assert path == str(user / tri.config_file_name(*shape, "cpu"))
    assert json.loads(open(path).read())["_triton_version"]
    assert tri.get_config(16, *shape, dev)["num_stages"] == 5
    other = tri.write_configs({16: tuned}, *shape, "cpu", config_dir=str(tmp_path / "given"))
    assert other.startswith(str(tmp_path / "given"))
    assert sorted(p.name for p in packaged.iterdir()) == [tri.config_file_name(*shape, "cpu")]


def test_packaged_configs_are_valid():
    """Every shipped file parses and holds complete configs keyed by token count."""
    keys = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}
    files = [f for f in os.listdir(tri.PACKAGED_CONFIG_DIR) if f.endswith(".json")]
    for f in files:
        assert f.startswith("fused_moe_E="), f
        table = tri._load_configs(os.path.join(tri.PACKAGED_CONFIG_DIR, f))
        assert table and all(keys <= set(cfg) for cfg in table.values()), f


class _KernelRecorder:
    """Stands in for a Triton kernel: records each launch's arguments, then runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_tf32_follows_torch(monkeypatch, allow_tf32):
    """fp32 GEMMs get TF32 tensor cores exactly when torch allows them for its own matmuls."""
    rec = _KernelRecorder(tri._moe_gemm_kernel)
    monkeypatch.setattr(tri, "_moe_gemm_kernel", rec)
    args = make_inputs(6, 16, 4, 8, 2)
    before = torch.backends.cuda.matmul.allow_tf32  # a cuBLASModule setting: monkeypatch cannot undo it
    try:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        tri.fused_moe(*args)
        assert tri.dot_precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert [kw["DOT_PRECISION"] for _, kw in rec.calls] == ["tf32" if allow_tf32 else "ieee"] * 2


def test_tf32_follows_float32_matmul_precision(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert tri.dot_precision(torch.float32) == "tf32"
        torch.set_float32_matmul_precision("highest")
        assert tri.dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slot_rows_in_activation_dtype(monkeypatch, dtype):
    """Both GEMMs write activation-dtype rows (no fp32 per-slot buffer, no zero fill); the k-way sum
    is deterministic."""
    rec = _KernelRecorder(tri._moe_gemm_kernel)
    monkeypatch.setattr(tri, "_moe_gemm_kernel", rec)
    args = make_inputs(7, 20, 5, 12, 3, dtype)
    shapes = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: shapes.append(tuple(a[0] if a else k["size"]))
                        or real_zeros(*a, **k))
    out = tri.fused_moe(*args)
    monkeypatch.undo()
    assert [a[2].dtype for a, _ in rec.calls] == [dtype, dtype]  # c: act rows, then slot rows
    assert (7 * 3, 20) not in shapes  # no zero-filled per-slot buffer
    assert torch.equal(out, tri.fused_moe(*args))
    atol, rtol = tol(dtype)
    assert_close(out, ref_fused_moe(*args), atol=2 * atol, rtol=2 * rtol)


def test_triton_with_explicit_config_block_32():
    args = make_inputs(9, 40, 3, 24, 2)
    cfg = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    out = tri.fused_moe(*args, config=cfg)
    assert_close(out, f64_reference(*args).float(), msg="BLOCK_M=32")


# ---- GPU --------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 33, 300])
def test_cuda_triton_matches_reference(dtype, T):
    args = make_inputs(T, 256, 8, 128, 2, dtype, device="cuda")
    out = ops.fused_moe(*args)
    want = f64_reference(*args).to(dtype)
    atol, rtol = tol(dtype)
    assert_close(out, want, atol=2 * atol, rtol=2 * rtol, msg=f"cuda {dtype} T={T}")


@pytest.mark.parametrize("naive", [False, True])
def test_token_chunking(monkeypatch, naive):
    """Chunk boundaries inside the batch (the last chunk short) change nothing."""
    args = make_inputs(11, 16, 4, 8, 2)
    want = tri.fused_moe(*args, config=dict(TINY_CFG, NAIVE=naive))
    monkeypatch.setattr(tri, "CHUNK_TOKENS", 4)
    rec = _KernelRecorder(tri._moe_sum_kernel)
    monkeypatch.setattr(tri, "_moe_sum_kernel", rec)
    got = tri.fused_moe(*args, config=dict(TINY_CFG, NAIVE=naive))
    assert len(rec.calls) == 3  # 4 + 4 + 3 tokens
    assert torch.equal(got, want)
    assert_close(got, f64_reference(*args).float(), msg="chunked")


def test_chunks_are_large_and_bounded_by_free_memory(monkeypatch):
    """Chunks of vLLM's size (every expert's weights read once per 32K tokens), fewer tokens only
    where the buffers would not fit in half the free memory."""
    bf16, cpu, cuda = torch.bfloat16, torch.device("cpu"), torch.device("cuda")
    assert tri.CHUNK_TOKENS == 32 * 1024
    assert tri.chunk_tokens(10**6, 4, 512, 1024, bf16, cpu) == 32 * 1024
    assert tri.chunk_tokens(100, 4, 512, 1024, bf16, cpu) == 100
    # Qwen3-30B-A3B (k=8, I=768, H=2048): 45 KB of buffers per token
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert tri.chunk_tokens(10**6, 8, 768, 2048, bf16, cuda) == 32 * 1024
    per_token = 8 * ((768 + 2048) * 2 + 8)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * per_token, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 600 * per_token)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200 * per_token)
    assert tri.chunk_tokens(10**6, 8, 768, 2048, bf16, cuda) == (1000 + 400) // 2
    # small batches never query the device (decode steps, CUDA graph capture)
    monkeypatch.setattr(torch.cuda, "mem_get_info", None)
    assert tri.chunk_tokens(64, 8, 768, 2048, bf16, cuda) == 64
    monkeypatch.setattr(tri, "CPU_BUFFER_BYTES", 10 * per_token)
    assert tri.chunk_tokens(10**6, 8, 768, 2048, bf16, cpu) == 10


@pytest.mark.parametrize("T,k,E", [(3, 2, 5), (1, 2, 8)])
def test_naive_and_aligned_block_layouts_agree(T, k, E):
    args = make_inputs(T, 20, E, 12, k)
    want = f64_reference(*args).float()
    for naive in (True, False):
        assert_close(tri.fused_moe(*args, config=dict(TINY_CFG, NAIVE=naive)), want, msg=f"naive={naive}")


def test_kernel_compiles_for_sm90():
    """Both GEMM variants build to a cubin for sm_90 (no GPU needed; runs outside the interpreter)."""
    run_without_interpreter(
        "from vlmkernels.triton.fused_moe import aot_compile\n"
        "for dt, gated, naive in (('bf16', True, False), ('fp32', False, False), ('fp16', True, True)):\n"
        "    assert aot_compile(dt, gated, naive=naive).asm['cubin']\n"
        "from vlmkernels.triton.fused_moe import aot_compile_sum\n"
        "for dt in ('bf16', 'fp32'):\n"
        "    assert aot_compile_sum(dt).asm['cubin']\n")


@pytest.mark.cuda
def test_cuda_tune_picks_a_working_config():
    space = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3),
             dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)]
    best = tri.tune(8, 128, 256, torch.bfloat16, 2, Ms=(1, 64), space=space, write=False)
    assert set(best) == {1, 64} and all(cfg in space for cfg in best.values())


@pytest.mark.cuda
def test_cuda_backward_and_graph_capture():
    hidden, gate_up, down, weights, ids = make_inputs(33, 64, 8, 32, 2, torch.bfloat16, device="cuda")
    out = torch.empty_like(hidden)
    ops.fused_moe(hidden, gate_up, down, weights, ids)  # warm up (compile) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(ops.fused_moe(hidden, gate_up, down, weights, ids))
    graph.replay()
    assert_close(out, ref_fused_moe(hidden, gate_up, down, weights, ids), atol=4e-2, rtol=4e-2)
    # every gradient against float64 autograd of python_ref on the same bf16 values, with a random
    # upstream gradient (a .sum() would send the same one everywhere); the CPU bf16 test's tolerance
    leaves = [t.clone().requires_grad_() for t in (hidden, gate_up, down, weights)]
    g = torch.randn(hidden.shape, device="cuda")
    torch.autograd.backward(ops.fused_moe(*leaves, ids).float(), g)
    refs = [t.detach().cpu().double().requires_grad_() for t in (hidden, gate_up, down, weights)]
    want = torch.autograd.grad(ref_fused_moe(*refs, ids.cpu()), refs, g.cpu().double())
    for got, ref, leaf in zip(leaves, want, (hidden, gate_up, down, weights)):
        assert got.grad.dtype == leaf.dtype
        assert_close(got.grad.cpu().double(), ref, atol=4e-2 * max(1.0, ref.abs().max().item()), rtol=4e-2)
