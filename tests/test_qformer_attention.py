"""Q-Former attention: python_ref == HF's math (SDPA and the HF module), every backend == the float64
reference forward and backward (masks, empty rows, packed keys, dropout, split-KV), bad inputs, opcheck,
torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import vlmkernels  # noqa: F401  (defines the ops)
from python_ref.ops.qformer import qformer_attention as ref_attention
from python_ref.ops.qformer import qformer_attention_backward as ref_attention_backward
from tests.helpers import assert_close, run_without_interpreter
from vlmkernels import library, ops
from vlmkernels.triton import qformer_attention as tri

OP = torch.ops.vlmkernels.attention.default
BWD = torch.ops.vlmkernels.attention_backward.default
HAS_CPU = library.cpp_kernel("attention", "CPU")  # the C++ backend (csrc/ops/attention.cpp) is built
BACKENDS = ["reference", "triton"] + (["cpu"] if HAS_CPU else [])
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="vlmkernels._C (the cpu backend) is not built")


def make_qkv(B, Lq, H, d, Lk, dtype=torch.float32, seed=0, total_k=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, H, d, generator=g)
    kv_shape = (total_k, H, d) if total_k is not None else (B, Lk, H, d)
    k = torch.randn(kv_shape, generator=g)
    v = torch.randn(kv_shape, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(B, Lk, seed=0, empty_rows=(0,)):
    """Random keep-mask [B, Lk] with the batch rows in ``empty_rows`` fully masked (when B allows)."""
    g = torch.Generator().manual_seed(seed + 1)
    m = torch.rand(B, Lk, generator=g) > 0.3
    for b in empty_rows:
        if b < B:
            m[b] = False
    return m


def f64(*ts):
    return [t.double() if t is not None and t.is_floating_point() else t for t in ts]


def ref_with_grads(q, k, v, grad, **kw):
    """float64 python_ref output and autograd gradients (autograd through the explicit math)."""
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out, _ = ref_attention(*leaves, **kw)
    out.backward(grad.double())
    return out.detach(), [t.grad for t in leaves]


def run_with_grads(q, k, v, grad, backend, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, backend=backend, **kw)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def check_grads(got, want, dtype, msg):
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), f"{msg} d{name} has non-finite values"
        assert_close(a, b, dtype=dtype, msg=f"{msg} d{name}")


# ---- python_ref == HF's Q-Former attention math ---------------------------------------------------

def test_reference_matches_sdpa_with_masks():
    B, Lq, H, d, Lk = 3, 7, 2, 16, 13
    q, k, v = f64(*make_qkv(B, Lq, H, d, Lk))
    kpm = padding_mask(B, Lk, empty_rows=())
    am = torch.rand(B, Lq, Lk) > 0.4
    am[..., 0] = True  # every row keeps a key: SDPA would give NaN otherwise
    keep = kpm[:, None, :] & am
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=keep[:, None]).transpose(1, 2)
    got, lse = ref_attention(q, k, v, key_padding_mask=kpm, attn_mask=am)
    assert_close(got, want)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * d**-0.5
    assert_close(lse, s.masked_fill(~keep[:, None], float("-inf")).logsumexp(-1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_matches_hf_qformer_cross_attention_module(impl):
    """HF's Blip2QFormerMultiHeadAttention (cross) on its own projections == ops.attention."""
    from transformers import Blip2QFormerConfig
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention

    cfg = Blip2QFormerConfig(hidden_size=64, num_attention_heads=4, encoder_hidden_size=40,
                             intermediate_size=128, num_hidden_layers=2)
    cfg._attn_implementation = impl
    mod = Blip2QFormerMultiHeadAttention(cfg, is_cross_attention=True).eval()
    B, Lq, Lk, H, d = 2, 5, 11, 4, 16
    hidden, enc = torch.randn(B, Lq, 64), torch.randn(B, Lk, 40)
    kpm = padding_mask(B, Lk, empty_rows=())
    kpm[:, 0] = True
    if impl == "eager":  # HF's additive float mask
        mask = torch.zeros(B, 1, Lq, Lk).masked_fill(~kpm[:, None, None, :], torch.finfo(torch.float32).min)
    else:
        mask = kpm[:, None, None, :].expand(B, 1, Lq, Lk)
    with torch.no_grad():
        want, _ = mod(hidden, encoder_hidden_states=enc, encoder_attention_mask=mask)
        q = mod.query(hidden).view(B, Lq, H, d)
        k = mod.key(enc).view(B, Lk, H, d)
        v = mod.value(enc).view(B, Lk, H, d)
        for backend in BACKENDS:
            got = ops.attention(q, k, v, key_padding_mask=kpm, backend=backend)
            assert_close(got.reshape(B, Lq, H * d), want, msg=backend)


# ---- every backend == float64 reference: forward and backward -------------------------------------

CASES = [  # (B, Lq, H, d, Lk): odd key counts, the Q-Former head dims, short and odd query lengths
    (2, 7, 2, 32, 1),
    (2, 1, 2, 64, 5),
    (2, 37, 1, 88, 5),
    (1, 32, 2, 64, 257),
    (2, 7, 1, 88, 257),
    (1, 32, 1, 32, 577),
    (1, 37, 1, 32, 1000),
    (1, 7, 1, 128, 33),
    (1, 100, 1, 32, 77),  # InstructBLIP: 32 queries + instruction tokens, two query blocks
]


def case_id(c):
    return "B{}Lq{}H{}d{}Lk{}".format(*c)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_parity(backend, case):
    B, Lq, H, d, Lk = case
    q, k, v = make_qkv(*case, seed=Lk + d)
    grad = torch.randn(B, Lq, H, d)
    kpm = padding_mask(B, Lk, seed=Lk)  # batch row 0 fully masked
    want, want_grads = ref_with_grads(q, k, v, grad, key_padding_mask=kpm)
    got, got_grads = run_with_grads(q, k, v, grad, backend, key_padding_mask=kpm)
    assert_close(got, want, msg=f"{backend} out")
    assert (got[0] == 0).all(), "a fully masked row must return zeros"
    check_grads(got_grads, want_grads, torch.float32, backend)
    assert (got_grads[0][0] == 0).all(), "a fully masked row gets zero dq"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unmasked_and_scale(backend):
    q, k, v = make_qkv(2, 7, 2, 32, 19)
    grad = torch.randn_like(q)
    for scale in (None, 0.37):
        want, want_grads = ref_with_grads(q, k, v, grad, scale=scale)
        got, got_grads = run_with_grads(q, k, v, grad, backend, scale=scale)
        assert_close(got, want, msg=f"{backend} scale={scale}")
        check_grads(got_grads, want_grads, torch.float32, f"{backend} scale={scale}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_mask_and_padding_mask(backend):
    """gemini's cross-modal mask: each query keeps keys of other modalities; ANDed with padding; some
    rows fully masked by attn_mask alone."""
    B, Lq, H, d, Lk = 2, 9, 2, 32, 23
    q, k, v = make_qkv(B, Lq, H, d, Lk, seed=3)
    q_mod, k_mod = torch.arange(Lq) % 3, torch.arange(Lk) % 3
    am = (q_mod[:, None] != k_mod[None, :]).expand(B, Lq, Lk).clone()
    am[1, 4] = False
    kpm = padding_mask(B, Lk, seed=5, empty_rows=())
    grad = torch.randn_like(q)
    for masks in (dict(attn_mask=am), dict(attn_mask=am, key_padding_mask=kpm)):
        want, want_grads = ref_with_grads(q, k, v, grad, **masks)
        got, got_grads = run_with_grads(q, k, v, grad, backend, **masks)
        assert_close(got, want, msg=f"{backend} {list(masks)}")
        assert (got[1, 4] == 0).all()
        check_grads(got_grads, want_grads, torch.float32, f"{backend} {list(masks)}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_dtypes(backend, dtype):
    B, Lq, H, d, Lk = 2, 32, 2, 64, 41
    q, k, v = make_qkv(B, Lq, H, d, Lk, dtype=dtype, seed=7)
    q = q * 0.5
    grad = torch.randn(B, Lq, H, d).to(dtype)
    kpm = padding_mask(B, Lk, seed=2)
    want, want_grads = ref_with_grads(q, k, v, grad, key_padding_mask=kpm)
    got, got_grads = run_with_grads(q, k, v, grad, backend, key_padding_mask=kpm)
    assert got.dtype == dtype
    assert_close(got, want, dtype=dtype, msg=f"{backend} {dtype}")
    check_grads(got_grads, want_grads, dtype, f"{backend} {dtype}")


def test_float64_reference_backend_and_gradcheck():
    q, k, v = f64(*make_qkv(2, 3, 1, 8, 5))
    kpm = padding_mask(2, 5, empty_rows=(1,))
    am = torch.rand(2, 3, 5) > 0.2
    out = ops.attention(q, k, v, key_padding_mask=kpm, attn_mask=am, backend="reference")
    assert out.dtype == torch.float64
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: ops.attention(a, b, c, key_padding_mask=kpm, attn_mask=am, backend="reference"), leaves)
    with pytest.raises(TypeError, match="float64"):
        ops.attention(q, k, v, backend="triton")


# ---- packed keys (cu_seqlens_k) == padded ---------------------------------------------------------

def pack(k, lengths):
    return torch.cat([k[b, :n] for b, n in enumerate(lengths)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_padded(backend):
    B, Lq, H, d = 3, 7, 2, 32
    lengths = [5, 0, 29]  # an image without keys: its rows are zeros
    Lk = max(lengths)
    q, k, v = make_qkv(B, Lq, H, d, Lk, seed=11)
    kpm = torch.arange(Lk)[None, :] < torch.tensor(lengths)[:, None]
    grad = torch.randn_like(q)
    want, want_grads = run_with_grads(q, k, v, grad, "reference", key_padding_mask=kpm)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    kp, vp = pack(k, lengths), pack(v, lengths)
    got, (dq, dk, dv) = run_with_grads(q, kp, vp, grad, backend, cu_seqlens_k=cu)
    assert_close(got, want, msg=f"{backend} packed out")
    assert (got[1] == 0).all()
    assert_close(dq, want_grads[0], msg=f"{backend} packed dq")
    assert_close(dk, pack(want_grads[1], lengths), msg=f"{backend} packed dk")
    assert_close(dv, pack(want_grads[2], lengths), msg=f"{backend} packed dv")


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_with_packed_masks(backend):
    """Packed layouts of the masks: key_padding_mask [total_k], attn_mask [Lq, total_k]."""
    B, Lq, H, d = 2, 5, 1, 32
    lengths = [17, 6]
    total = sum(lengths)
    q, k, v = make_qkv(B, Lq, H, d, None, seed=13, total_k=total)
    cu = torch.tensor([0, 17, 23], dtype=torch.int32)
    kpm = torch.rand(total) > 0.3
    am = torch.rand(Lq, total) > 0.3
    grad = torch.randn_like(q)
    kw = dict(cu_seqlens_k=cu, key_padding_mask=kpm, attn_mask=am)
    want, want_grads = ref_with_grads(q, k, v, grad, **kw)
    got, got_grads = run_with_grads(q, k, v, grad, backend, **kw)
    assert_close(got, want, msg=backend)
    check_grads(got_grads, want_grads, torch.float32, backend)
    # the same as each image on its own, dense
    for b, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        one = ops.attention(q[b:b + 1], k[None, lo:hi], v[None, lo:hi], key_padding_mask=kpm[None, lo:hi],
                            attn_mask=am[None, :, lo:hi], backend=backend)
        assert_close(got[b:b + 1], one, msg=f"{backend} image {b}")


# ---- dropout ------------------------------------------------------------------------------------

def draw_keep(shape, p, seed):
    torch.manual_seed(seed)
    return torch.rand(shape) >= p


@pytest.mark.parametrize("packed", [False, True])
def test_dropout_same_seed_same_result_across_backends(packed):
    B, Lq, H, d, Lk, p = 2, 7, 2, 32, 23, 0.3
    q, k, v = make_qkv(B, Lq, H, d, Lk, seed=17)
    kw, mask_shape = {}, (B, H, Lq, Lk)
    if packed:
        k, v = k.reshape(B * Lk, H, d), v.reshape(B * Lk, H, d)
        kw = dict(cu_seqlens_k=torch.tensor([0, Lk, 2 * Lk], dtype=torch.int32))
        mask_shape = (H, Lq, B * Lk)
    grad = torch.randn_like(q)
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(123)
        results[backend] = run_with_grads(q, k, v, grad, backend, dropout_p=p, **kw)
    keep = draw_keep(mask_shape, p, 123)
    assert 0 < keep.sum() < keep.numel()
    want, want_grads = ref_with_grads(q, k, v, grad, dropout_mask=keep, dropout_p=p, **kw)
    no_drop = ops.attention(q, k, v, **kw)
    for backend, (got, got_grads) in results.items():
        assert_close(got, want, msg=f"{backend} dropout out")
        check_grads(got_grads, want_grads, torch.float32, f"{backend} dropout")
        assert not torch.allclose(got, no_drop)
    torch.manual_seed(124)
    other = ops.attention(q, k, v, dropout_p=p, **kw)
    assert not torch.allclose(other, results["reference"][0]), "another seed must draw another mask"


def test_dropout_zero_is_deterministic_and_draws_nothing():
    q, k, v = make_qkv(1, 3, 1, 16, 4)
    state = torch.get_rng_state()
    ops.attention(q, k, v, dropout_p=0.0)
    assert torch.equal(state, torch.get_rng_state())


# ---- kernel launch shapes forced on the interpreter ------------------------------------------------

@pytest.mark.parametrize("splits", [2, 3, 9])  # 9 > key blocks: some splits are empty
def test_split_kv_forward(splits):
    B, Lq, H, d, Lk = 2, 37, 2, 32, 200
    q, k, v = make_qkv(B, Lq, H, d, Lk, seed=19)
    kpm = padding_mask(B, Lk, seed=19)
    am = torch.rand(B, Lq, Lk) > 0.2
    keep = draw_keep((B, H, Lq, Lk), 0.25, 5)
    kw = dict(key_padding_mask=kpm, attn_mask=am, dropout_mask=keep, dropout_p=0.25)
    want, want_lse = ref_attention(*f64(q, k, v), **kw)
    got, lse = tri.attention_forward(q, k, v, kpm, am, None, None, keep, 0.25, splits=splits)
    assert_close(got, want, msg=f"splits={splits}")
    assert_close(lse, want_lse.float(), msg=f"splits={splits} lse")
    assert torch.isinf(lse[0]).all() and (lse[0] > 0).all(), "no kept key: lse = +inf"


def test_split_kv_forward_packed():
    B, Lq, H, d = 3, 7, 2, 64
    lengths = [130, 3, 0]
    total = sum(lengths)
    q, k, v = make_qkv(B, Lq, H, d, None, seed=23, total_k=total)
    cu = torch.tensor([0, 130, 133, 133], dtype=torch.int32)
    want, want_lse = ref_attention(*f64(q, k, v), cu_seqlens_k=cu)
    got, lse = tri.attention_forward(q, k, v, None, None, cu, None, None, 0.0, splits=4)
    assert_close(got, want)
    assert_close(lse, want_lse.float())
    # packed masks and dropout on the split path too
    kpm, am = torch.rand(total) > 0.2, torch.rand(Lq, total) > 0.2
    keep = draw_keep((H, Lq, total), 0.3, 4)
    kw = dict(key_padding_mask=kpm, attn_mask=am, cu_seqlens_k=cu, dropout_mask=keep, dropout_p=0.3)
    want, want_lse = ref_attention(*f64(q, k, v), **kw)
    got, lse = tri.attention_forward(q, k, v, kpm, am, cu, None, keep, 0.3, splits=3)
    assert_close(got, want, msg="packed, masked, dropout")
    assert_close(lse, want_lse.float(), msg="packed, masked, dropout lse")


@pytest.mark.parametrize("fuse_dq,n_programs", [(True, 1), (False, 1), (False, 2), (False, 7)])
def test_backward_launch_shapes(fuse_dq, n_programs):
    B, Lq, H, d, Lk = 2, 11, 2, 32, 150
    q, k, v = make_qkv(B, Lq, H, d, Lk, seed=29)
    kpm = padding_mask(B, Lk, seed=29)
    keep = draw_keep((B, H, Lq, Lk), 0.2, 9)
    kw = dict(key_padding_mask=kpm, dropout_mask=keep, dropout_p=0.2)
    out, lse = ref_attention(q, k, v, **kw)
    grad = torch.randn_like(q)
    want = ref_attention_backward(*f64(grad, q, k, v, out), lse.double(), **kw)
    got = tri.attention_backward(grad, q, k, v, out, lse, kpm, None, None, None, keep, 0.2,
                                 n_programs=n_programs, fuse_dq=fuse_dq)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, msg=f"d{name} fuse_dq={fuse_dq} n_programs={n_programs}")


def test_reference_backward_matches_autograd():
    """python_ref's hand-written vjp == autograd through its forward (float64, masks, dropout, packed)."""
    B, Lq, H, d = 2, 5, 2, 8
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    q, k, v = f64(*make_qkv(B, Lq, H, d, None, seed=31, total_k=16))
    kw = dict(cu_seqlens_k=cu, key_padding_mask=torch.rand(16) > 0.2, attn_mask=torch.rand(Lq, 16) > 0.2,
              dropout_mask=torch.rand(H, Lq, 16) > 0.3, dropout_p=0.3)
    grad = torch.randn(B, Lq, H, d, dtype=torch.float64)
    out, want = ref_with_grads(q, k, v, grad, **kw)
    _, lse = ref_attention(q, k, v, **kw)
    got = ref_attention_backward(grad, q, k, v, out, lse, **kw)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, msg=f"d{name}")


def test_strided_inputs():
    """k/v as views of one wider projection output (the hoisted cross K/V layout) and a transposed q."""
    B, Lq, H, d, Lk = 2, 6, 2, 32, 9
    kv = torch.randn(B, Lk, 3, 2, H * d)
    k, v = kv[:, :, 1, 0].unflatten(-1, (H, d)), kv[:, :, 1, 1].unflatten(-1, (H, d))
    q = torch.randn(B, H, Lq, d).transpose(1, 2)
    grad = torch.randn(B, Lq, H, d)
    want, want_grads = ref_with_grads(q, k, v, grad)
    for backend in BACKENDS:
        got, got_grads = run_with_grads(q, k, v, grad, backend)
        assert_close(got, want, msg=backend)
        check_grads(got_grads, want_grads, torch.float32, f"{backend} strided")
        # the backward op with a strided saved output, lse and incoming gradient
        out, lse = OP(q, k, v, None, None, None, None, None, 0.0, backend)
        lse_t = lse.transpose(1, 2).contiguous().transpose(1, 2)
        out_t = out.transpose(1, 2).contiguous().transpose(1, 2)
        grads = BWD(grad.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, out_t, lse_t,
                    None, None, None, None, None, 0.0, backend)
        check_grads(grads, want_grads, torch.float32, f"{backend} strided backward op")


def test_split_heuristic(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(tri, "_sm_count", lambda index: 132)  # H100
    assert tri.num_splits(cuda, 12, 257, 64) == 2  # B=1, H=12, Lk=257: 5 key blocks
    assert tri.num_splits(cuda, 12, 1000, 64) == 8
    assert tri.num_splits(cuda, 132, 1000, 64) == 1  # a full wave
    assert tri.num_splits(cuda, 12, 64, 64) == 1  # one key block
    assert tri.num_splits(torch.device("cpu"), 1, 1000, 64) == 1


# ---- empty inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 4, 2, 16, 5), (2, 0, 2, 16, 5), (2, 4, 2, 16, 0), (2, 4, 0, 16, 5),
                                   (2, 4, 2, 0, 5)])
def test_empty(backend, shape):
    B, Lq, H, d, Lk = shape
    q, k, v = make_qkv(*shape)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = OP(*leaves, None, None, None, None, None, 0.0, backend)
    assert out.shape == (B, Lq, H, d) and lse.shape == (B, H, Lq)
    assert (out == 0).all()
    if d:
        assert (lse == float("inf")).all()
    else:  # every score is 0: lse = log(Lk), as the reference says
        assert_close(lse, torch.full_like(lse, Lk).log())
    out.sum().backward()
    assert all(t.grad is not None and (t.grad == 0).all() for t in leaves)


# ---- bad inputs -----------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    q, k, v = make_qkv(2, 3, 2, 16, 5)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    kp, vp = k.reshape(10, 2, 16)[:5], v.reshape(10, 2, 16)[:5]
    bad = [
        (dict(q=q[0]), ValueError, "q must be 4-D"),
        (dict(k=k[:1]), ValueError, "batch"),
        (dict(k=k[:, :, :1], v=v[:, :, :1]), ValueError, "heads"),
        (dict(k=k[..., :8], v=v[..., :8]), ValueError, "head dim"),
        (dict(v=v[:, :4]), ValueError, "v must have k's shape"),
        (dict(k=k.double()), TypeError, "k must have q's dtype"),
        (dict(q=q.int(), k=k.int(), v=v.int()), TypeError, "q must be float"),
        (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be a bool"),
        (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (dict(attn_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "attn_mask must have shape"),
        (dict(attn_mask=torch.ones(2, 3, 5, dtype=torch.uint8)), TypeError, "attn_mask must be a bool"),
        (dict(cu_seqlens_k=cu.long(), k=kp, v=vp), TypeError, "cu_seqlens_k must be an int32"),
        (dict(cu_seqlens_k=cu[:2], k=kp, v=vp), ValueError, r"cu_seqlens_k must be \[B\+1\]"),
        (dict(cu_seqlens_k=cu), ValueError, "k must be 3-D"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 2], dtype=torch.int32), k=kp[:2], v=vp[:2]), ValueError,
         "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 2, 4], dtype=torch.int32), k=kp, v=vp), ValueError, "total_k"),
        (dict(cu_seqlens_k=torch.tensor([1, 2, 5], dtype=torch.int32), k=kp, v=vp), ValueError, "from 0"),
        (dict(cu_seqlens_k=cu, k=kp, v=vp, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
         "packed keys"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(k=k.to("meta"), v=v.to("meta")), ValueError, "one device"),
    ]
    for backend in BACKENDS:
        for kw, exc, match in bad:
            args = dict(q=q, k=k, v=v)
            args.update(kw)
            with pytest.raises(exc, match=match):
                ops.attention(args.pop("q"), args.pop("k"), args.pop("v"), backend=backend, **args)
    # the op itself (forced backends, no functional API) runs the same checks
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="dropout_mask must have shape"):
            OP(q, k, v, None, None, None, None, torch.ones(2, 2, 3, 4, dtype=torch.bool), 0.5, backend)
        with pytest.raises(ValueError, match="needs a dropout_mask"):
            OP(q, k, v, None, None, None, None, None, 0.5, backend)
    out, lse = OP(q, k, v, None, None, None, None, None, 0.0, "reference")
    with pytest.raises(ValueError, match="lse must have shape"):
        BWD(out, q, k, v, out, lse[:, :1], None, None, None, None, None, 0.0, "reference")
    with pytest.raises(TypeError, match="grad must have q's dtype"):
        BWD(out.double(), q, k, v, out, lse, None, None, None, None, None, 0.0, "reference")


# ---- opcheck and compile --------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    B, Lq, H, d, Lk = 2, 5, 2, 16, 7
    q, k, v = make_qkv(B, Lq, H, d, Lk)
    kpm = padding_mask(B, Lk)
    keep = torch.rand(B, H, Lq, Lk) > 0.2
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(OP, (*leaves, kpm, None, None, 0.5, keep, 0.2, backend))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    torch.library.opcheck(OP, (q, k.reshape(B * Lk, H, d)[:7], v.reshape(B * Lk, H, d)[:7], None, None, cu,
                               None, None, 0.0, backend))
    out, lse = OP(q, k, v, kpm, None, None, None, keep, 0.2, backend)
    torch.library.opcheck(BWD, (torch.randn_like(q), q, k, v, out, lse, kpm, None, None, None, keep, 0.2, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_with_backward(backend):
    B, Lq, H, d, Lk = 2, 5, 2, 16, 9
    q, k, v = make_qkv(B, Lq, H, d, Lk)
    kpm = padding_mask(B, Lk)

    def loss(q, k, v):
        return ops.attention(q, k, v, key_padding_mask=kpm, backend=backend).square().sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves).backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*eager).backward()
    for a, b in zip(leaves, eager):
        assert_close(a.grad, b.grad)


def test_compile_fullgraph_dropout_draws_the_same_mask():
    q, k, v = make_qkv(1, 4, 1, 16, 6)
    f = torch.compile(lambda q, k, v: ops.attention(q, k, v, dropout_p=0.4), fullgraph=True, backend="eager")
    torch.manual_seed(5)
    got = f(q, k, v)
    torch.manual_seed(5)
    assert_close(got, ops.attention(q, k, v, dropout_p=0.4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_region_keeps_the_inputs_dtype(backend):
    """An autocast region does not cast a custom op's inputs: the op computes in their dtype, and the
    outputs' dtypes are the fake's."""
    q, k, v = make_qkv(2, 5, 2, 16, 9)
    want, want_lse = OP(q, k, v, None, None, None, None, None, 0.0, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, lse = OP(q, k, v, None, None, None, None, None, 0.0, backend)
    assert got.dtype == torch.float32 and lse.dtype == torch.float32
    assert_close(got, want)
    assert_close(lse, want_lse)


def test_registry_preferences():
    from vlmkernels import registry

    assert registry.select("attention", "auto", "cpu")[0] == ("cpu" if HAS_CPU else "reference")
    assert registry.select("attention_backward", "auto", "cpu")[0] == ("cpu" if HAS_CPU else "reference")
    assert registry._entry("attention").preference["cuda"][0] == "triton"
    assert registry._entry("attention_backward").preference["cuda"][0] == "triton"


def test_kernels_compile_for_sm90():
    run_without_interpreter(
        "from vlmkernels.triton.qformer_attention import aot_compile\n"
        "for dt in ('bf16', 'fp32'):\n"
        "    for d in (64, 88):\n"
        "        for kern in ('fwd', 'dkdv', 'dq', 'combine'):\n"
        "            assert aot_compile(kern, dt, d=d).asm['cubin']\n"
        "assert aot_compile('fwd', 'fp16', d=128, varlen=True, PARTIAL=True).asm['cubin']\n"
        "assert aot_compile('dkdv', 'fp16', d=32, varlen=True, FUSE_DQ=True).asm['cubin']\n"
        "# the largest tiles (fp32, d=128 padded, BLOCK_M=64) fit an H100's 227 KiB of shared memory\n"
        "assert aot_compile('dkdv', 'fp32', d=128, Lq=64).metadata.shared <= 227 * 1024\n")


# ---- on a GPU: compiled kernels (real bf16/fp16 tensor-core dots, the auto split-KV and launch shapes) --

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Lk,d", [(1, 257, 64), (1, 577, 88), (16, 257, 64), (3, 1000, 128)])
def test_cuda_parity(B, Lk, d, dtype):
    """BLIP-2 shapes (12 heads, 32 queries): B=1 takes the split-KV forward and the two-kernel backward,
    B=16 fills the SMs (no split, fused dQ)."""
    H, Lq = 12, 32
    q, k, v = (t.cuda() for t in make_qkv(B, Lq, H, d, Lk, dtype=dtype, seed=B + Lk))
    kpm = padding_mask(B, Lk, seed=Lk).cuda()
    grad = torch.randn(B, Lq, H, d, device="cuda").to(dtype)
    want, want_grads = ref_with_grads(q, k, v, grad, key_padding_mask=kpm)
    got, got_grads = run_with_grads(q, k, v, grad, "triton", key_padding_mask=kpm)
    assert_close(got, want, dtype=dtype, msg=f"cuda {dtype}")
    check_grads(got_grads, want_grads, dtype, f"cuda {dtype}")


@pytest.mark.cuda
def test_cuda_packed_dropout_and_auto_backend():
    B, Lq, H, d = 4, 37, 12, 64
    lengths = [257, 5, 0, 577]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    q, k, v = (t.cuda() for t in make_qkv(B, Lq, H, d, None, dtype=torch.bfloat16, total_k=sum(lengths)))
    grad = torch.randn(B, Lq, H, d, device="cuda").to(torch.bfloat16)
    results = {}
    for backend in ("auto", "reference"):
        torch.manual_seed(7)
        results[backend] = run_with_grads(q, k, v, grad, backend, cu_seqlens_k=cu, dropout_p=0.1)
    (got, got_grads), (want, want_grads) = results["auto"], results["reference"]
    assert_close(got, want, dtype=torch.bfloat16)
    check_grads(got_grads, want_grads, torch.bfloat16, "cuda packed dropout")


# ---- the C++ cpu backend (csrc/ops/attention.cpp): flash path, composite path, lse from any backend --

@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 8])
def test_cpu_blip2_shapes(B, dtype):
    """BLIP-2's cross-attention (12 heads, 32 queries, 257 keys, d=64), padded keys with a fully masked
    image, against the float64 reference."""
    H, Lq, Lk, d = 12, 32, 257, 64
    q, k, v = make_qkv(B, Lq, H, d, Lk, dtype=dtype, seed=B)
    kpm = padding_mask(B, Lk, seed=B)
    grad = torch.randn(B, Lq, H, d).to(dtype)
    want, want_grads = ref_with_grads(q, k, v, grad, key_padding_mask=kpm)
    got, got_grads = run_with_grads(q, k, v, grad, "cpu", key_padding_mask=kpm)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_close(got, want, dtype=dtype, msg=f"cpu {dtype}")
    assert (got[0] == 0).all()
    check_grads(got_grads, want_grads, dtype, f"cpu {dtype}")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("packed,dropout", [(False, False), (False, True), (True, False), (True, True)])
def test_cpu_lse_and_empty_rows_match_reference(dtype, packed, dropout):
    """(out, lse) of the cpu op == the reference's (lse +inf on rows without a kept key, same dtype),
    on the flash path and the composite one, with rows masked by attn_mask alone and by padding."""
    B, Lq, H, d, Lk = 3, 6, 2, 32, 11
    q, k, v = make_qkv(B, Lq, H, d, Lk, dtype=dtype, seed=41)
    kpm = padding_mask(B, Lk, seed=41)  # batch 0: no key
    am = torch.rand(B, Lq, Lk) > 0.3
    am[1, 2] = False
    am[2, :, 0] = True
    keep = torch.rand(B, H, Lq, Lk) > 0.25 if dropout else None
    p = 0.25 if dropout else 0.0
    cu = None
    if packed:
        k, v = k.reshape(B * Lk, H, d), v.reshape(B * Lk, H, d)
        kpm, am = kpm.reshape(-1), am.permute(1, 0, 2).reshape(Lq, B * Lk)
        kpm[Lk:Lk + 3] = False
        cu = torch.tensor([0, Lk, 2 * Lk, 3 * Lk], dtype=torch.int32)
        keep = keep.permute(1, 2, 0, 3).reshape(H, Lq, B * Lk) if dropout else None
    args = (kpm, am, cu, None, keep, p)
    out, lse = OP(q, k, v, *args, "cpu")
    want, want_lse = ref_attention(*f64(q, k, v), key_padding_mask=kpm, attn_mask=am, cu_seqlens_k=cu,
                                   dropout_mask=keep, dropout_p=p)
    ref_out, ref_lse = OP(q, k, v, *args, "reference")
    assert out.dtype == dtype and lse.dtype == ref_lse.dtype and lse.shape == (B, H, Lq)
    assert out.is_contiguous() and lse.is_contiguous()
    assert torch.isfinite(out).all()
    assert_close(out, want, dtype=dtype)
    assert_close(lse, want_lse.to(lse.dtype), dtype=dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "rows without a kept key: lse = +inf"
    assert (lse[torch.isinf(lse)] > 0).all()
    assert (out.transpose(1, 2)[torch.isinf(lse)] == 0).all()
    # the backward op takes lse from either backend and gives the same gradients, NaN-free
    grad = torch.randn(B, Lq, H, d).to(dtype)
    want_g = ref_attention_backward(*f64(grad, q, k, v), want, want_lse, key_padding_mask=kpm, attn_mask=am,
                                    cu_seqlens_k=cu, dropout_mask=keep, dropout_p=p)
    for o, l in ((out, lse), (ref_out, ref_lse)):
        got_g = BWD(grad, q, k, v, o, l, *args, "cpu")
        check_grads(got_g, want_g, dtype, f"cpu {dtype}")
        for g in got_g:
            assert g.is_contiguous()
    ref_g = BWD(grad, q, k, v, out, lse, *args, "reference")
    check_grads(ref_g, want_g, dtype, f"reference from cpu lse {dtype}")


@needs_cpu
def test_cpu_float64_gradcheck():
    for kw in (dict(key_padding_mask=padding_mask(2, 5, empty_rows=(1,)), attn_mask=torch.rand(2, 3, 5) > 0.2),
               dict(dropout_mask=torch.rand(2, 1, 3, 5) > 0.3, dropout_p=0.3),
               dict(cu_seqlens_k=torch.tensor([0, 0, 4], dtype=torch.int32))):
        q, k, v = f64(*make_qkv(2, 3, 1, 8, 5))
        if "cu_seqlens_k" in kw:
            k, v = k[0, :4], v[0, :4]
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        drop = kw.pop("dropout_mask", None)
        p = kw.pop("dropout_p", 0.0)

        def f(a, b, c):
            return OP(a, b, c, kw.get("key_padding_mask"), kw.get("attn_mask"), kw.get("cu_seqlens_k"), None, drop,
                      p, "cpu")[0]

        assert f(*leaves).dtype == torch.float64
        assert torch.autograd.gradcheck(f, leaves)


@needs_cpu
def test_cpu_autograd_saves_backend_and_scale():
    """The C++ autograd node runs the backward op with the forward's backend and scale."""
    q, k, v = make_qkv(2, 4, 2, 16, 9, seed=43)
    grad = torch.randn_like(q)
    want, want_grads = ref_with_grads(q, k, v, grad, scale=0.21)
    for backend in ("cpu", "reference", "auto"):
        got, got_grads = run_with_grads(q, k, v, grad, backend, scale=0.21)
        assert_close(got, want, msg=backend)
        check_grads(got_grads, want_grads, torch.float32, backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention(leaves[0], k, v)  # only q needs a gradient
    out.sum().backward()
    assert leaves[0].grad is not None and leaves[1].grad is None
