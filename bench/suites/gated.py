"""Gated expert fusion benches (issue 12): the fused ops against the eager chains users write, and
patched against unpatched multi-encoder models.

GPU rows (bf16, B=8, T=576, D=1024, D_out=4096; anchors/gated-fusion.md section 4):

* ``gated_fusion`` (GMU-style gate at D): eager ``cat -> addmm -> sigmoid -> g*a + (1-g)*b`` and that
  chain under ``torch.compile`` (default; ``max-autotune`` -- the fair competitor: it can fuse the mix
  into a Triton mm template, not the cat -- with ``--full``, since its tuning takes minutes:
  ``python -m bench --family gated --full``);
* ``expert_mix`` with N = 2 and 4 experts: eager per-expert ``F.linear`` -> stack -> x gate -> sum;
* ``concat_linear`` + GELU (Florence-VL DBFusion's first layer, 4 x 1024 channels) and
  ``mlp_projector`` (LLaVA-1.5 ``mlp2x_gelu``): ``cat + addmm + gelu (+ addmm)``;
* forward + backward of each against its eager chain (gradients to inputs and weights).

Derived columns: ``roofline`` is the time floor (``flops`` at the run's measured bf16 matmul rate,
or ``bytes`` at its copy bandwidth) over the measured time, i.e. the fraction of the tensor-core rate
reached where the op is compute-bound (all of these are); ``peak_memory`` rows give each provider's
allocation, and the shape's ``saved_MB`` is the size of the intermediates the fused op never writes
(arithmetic, forward).

CPU rows (always): patched (``backend="auto"``) against unpatched python_ref minigpt5 / leo /
florence_vl / dynamic_vision_selector, forward and forward + backward, in the same run
(``bench.suites.e2e``'s model cases, reported under this family). Op rows run on the GPU only: on
the CPU the ops' one backend is python_ref's own math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case, Inputs, SkipSuite
from .common import DTYPES, compile_modes, compile_provider_name, compiled, functional, log, our_backends, randn

FAMILY = "gated"
MB = 1e6


# ---- the user's alternatives: eager chains as the models write them --------------------------------

def eager_gate(a, b, weight, bias):
    g = torch.sigmoid(F.linear(torch.cat([a, b], dim=-1), weight, bias))
    return g * a + (1 - g) * b


def eager_expert_mix(features, gate, weights, biases):
    ys = torch.stack([F.linear(x, w, bi) for x, w, bi in zip(features, weights, biases)], dim=1)
    return (ys * gate[:, :, None, None]).sum(dim=1)


def eager_concat_linear_gelu(features, weight, bias):
    return F.gelu(F.linear(torch.cat(features, dim=-1), weight, bias))


def eager_mlp_projector(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


# ---- op cases ----------------------------------------------------------------------------------------

def _runner(fn, mode: str, grad_of):
    """A provider: ``fn(*args)`` under no_grad (fwd), or forward + ``autograd.grad`` to ``grad_of(args)``
    with a fixed output gradient (fwd+bwd; nothing accumulates into ``.grad`` between calls)."""
    if mode == "fwd":
        def run(args):
            with torch.no_grad():
                return fn(*args)
        return run

    def run_bwd(args):
        out = fn(*args)
        return torch.autograd.grad(out, grad_of(args), torch.ones_like(out))
    return run_bwd


def _weight(shape, dtype, device, seed, train):
    return randn(shape, dtype, device, seed=seed, scale=shape[-1] ** -0.5).requires_grad_(train)


def _op_case(op, shape, dtype, device, mode, eager, ours_call, args, grad_of, *, flops, nbytes, saved, modes=(),
             note=""):
    """One case: the eager chain (baseline), its compiled forms, and ours-<backend> for every backend here."""
    run = lambda fn: _runner(fn, mode, grad_of)  # noqa: E731
    providers = {"eager": (lambda r=run(eager): r(args()))}
    for m in modes:
        c = run(compiled(eager, m))
        providers[compile_provider_name(m)] = lambda c=c: c(args())
    for b in our_backends(op.split("+")[0], device):  # "concat_linear+gelu" times concat_linear
        r = run(lambda *a, b=b: ours_call(*a, backend=b))
        providers[f"ours-{b}"] = lambda r=r: r(args())
    dname = str(dtype).replace("torch.", "")
    factor = 1 if mode == "fwd" else 3  # backward: two GEMMs per forward GEMM
    return Case(op, FAMILY, {**shape, "saved_MB": round(saved / MB, 1)}, dname, providers, "eager", mode=mode,
                x="T", flops=factor * flops, nbytes=factor * nbytes, inputs=[args],
                timing="auto" if mode == "fwd" else "events", note=note)


def _modes(name: str) -> list:
    """``(op, mode, train)`` for the forward and the forward + backward cases of ``vlmkernels.ops.<name>``
    (``train``: the inputs require grad); none while that op has not landed."""
    op = functional(name)
    if op is None:
        return []
    return [(op, mode, mode != "fwd") for mode in ("fwd", "fwd+bwd")]


def gate_cases(B, T, D, dtype, device, modes_fwd):
    M, item = B * T, dtype.itemsize
    out = []
    for op, mode, train in _modes("gated_fusion"):
        w, c = _weight((D, 2 * D), dtype, device, 1, train), _weight((D,), dtype, device, 2, train)
        args = Inputs(lambda i, train=train: (randn((B, T, D), dtype, device, seed=10 + i).requires_grad_(train),
                                              randn((B, T, D), dtype, device, seed=50 + i).requires_grad_(train),
                                              w, c), nbytes=2 * M * D * item)
        # eager writes cat (2D), logits, g, g*a, 1-g, (1-g)*b: 7 (M, D) tensors besides the output
        out.append(_op_case("gated_fusion", {"B": B, "T": T, "D": D}, dtype, device, mode, eager_gate, op, args,
                            lambda a: a, flops=2 * M * 2 * D * D, nbytes=(3 * M * D + 2 * D * D) * item,
                            saved=7 * M * D * item, modes=modes_fwd if mode == "fwd" else ()))
    return out


def mix_cases(B, T, D, D_out, dtype, device, experts=(2, 4)):
    M, item = B * T, dtype.itemsize
    out = []
    modes = _modes("expert_mix")
    for N in experts:
        for op, mode, train in modes:
            ws = [_weight((D_out, D), dtype, device, 3 + i, train) for i in range(N)]
            bs = [_weight((D_out,), dtype, device, 20 + i, train) for i in range(N)]

            def make(i, N=N, ws=ws, bs=bs, train=train):
                feats = [randn((B, T, D), dtype, device, seed=100 * i + e).requires_grad_(train) for e in range(N)]
                gate = torch.softmax(randn((B, N), torch.float32, device, seed=7 + i), -1).to(dtype)
                return feats, gate.requires_grad_(train), ws, bs

            args = Inputs(make, nbytes=N * M * D * item)
            out.append(_op_case(
                "expert_mix", {"B": B, "T": T, "D": D, "D_out": D_out, "N": N}, dtype, device, mode, eager_expert_mix, op,
                args, lambda a: [*a[0], a[1], *a[2], *a[3]], flops=2 * M * N * D * D_out,
                nbytes=(N * M * D + N * D * D_out + M * D_out) * item,
                # N per-expert outputs, their stack and the gated product
                saved=3 * N * M * D_out * item))
    return out


def concat_cases(B, T, D, D_out, dtype, device, streams=4):
    M, item = B * T, dtype.itemsize
    K = streams * D
    out = []
    for op, mode, train in _modes("concat_linear"):
        w, bias = _weight((D_out, K), dtype, device, 4, train), _weight((D_out,), dtype, device, 5, train)
        args = Inputs(lambda i, w=w, bias=bias, train=train: (
            [randn((B, T, D), dtype, device, seed=200 * i + s).requires_grad_(train) for s in range(streams)], w, bias),
            nbytes=M * K * item)
        out.append(_op_case(
            "concat_linear+gelu", {"B": B, "T": T, "D": K, "D_out": D_out}, dtype, device, mode, eager_concat_linear_gelu,
            lambda f, w_, b_, backend: op(f, w_, b_, activation="gelu", backend=backend), args,
            lambda a: [*a[0], a[1], a[2]], flops=2 * M * K * D_out, nbytes=(M * K + K * D_out + M * D_out) * item,
            saved=(M * K + M * D_out) * item, note="Florence-VL DBFusion first layer; cat and pre-GELU not written"))
    return out


def mlp_cases(B, T, D, D_out, dtype, device):
    M, item = B * T, dtype.itemsize
    out = []
    for op, mode, train in _modes("mlp_projector"):
        w1, b1 = _weight((D_out, D), dtype, device, 6, train), _weight((D_out,), dtype, device, 7, train)
        w2, b2 = _weight((D_out, D_out), dtype, device, 8, train), _weight((D_out,), dtype, device, 9, train)
        args = Inputs(lambda i, train=train, ws=(w1, b1, w2, b2): (
            randn((B, T, D), dtype, device, seed=300 + i).requires_grad_(train), *ws), nbytes=M * D * item)
        out.append(_op_case(
            "mlp_projector", {"B": B, "T": T, "D": D, "D_out": D_out}, dtype, device, mode, eager_mlp_projector,
            lambda x, w1_, b1_, w2_, b2_, backend: op(x, w1_, b1_, w2_, b2_, activation="gelu", backend=backend),
            args, lambda a: list(a), flops=2 * M * D_out * (D + D_out),
            nbytes=(M * D + D * D_out + D_out * D_out + M * D_out) * item,
            saved=M * D_out * item, note="LLaVA-1.5 mlp2x_gelu; the pre-GELU activation is not written"))
    return out


def op_cases(full: bool, device: str) -> list[Case]:
    dtype = DTYPES["bfloat16"]
    B, T, D, D_out = 8, 576, 1024, 4096
    # max-autotune (the competitor for the gate) tunes for minutes: --full only, as in every suite
    out = gate_cases(B, T, D, dtype, device, compile_modes(full, device))
    out += mix_cases(B, T, D, D_out, dtype, device)
    out += concat_cases(B, T, D, D_out, dtype, device)
    out += mlp_cases(B, T, D, D_out, dtype, device)
    if full:
        out += mix_cases(B, T, D, D_out, dtype, device, experts=(1, 3, 5))
        out += gate_cases(32, T, D, dtype, device, ["default"])
    return out


# ---- patched vs unpatched models -------------------------------------------------------------------

QUICK_MODELS = {"minigpt5": {}, "leo": {"top_k": 2}, "florence_vl": {}, "dynamic_vision_selector": {"top_k": 2}}
FULL_MODELS = {**QUICK_MODELS, "minigpt5,gmu": {"gate_variant": "gmu"}, "leo,dense": {},
               "leo,published": {"variant": "published"}, "florence_vl,dbfusion": {"fusion_variant": "dbfusion"},
               "dynamic_vision_selector,dense": {}}


def model_cases(full: bool, device: str, size: str | None = None, models: dict | None = None) -> list[Case]:
    import python_ref

    from .e2e import _model_cases, batch_size

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # tiny on the CPU in the quick run: the whole suite within 2 minutes on a 2-core box
    size = size or ("tiny" if device == "cpu" and not full else None)
    out = []
    for label, over in (models or (FULL_MODELS if full else QUICK_MODELS)).items():
        arch = label.split(",")[0]

        def make_model(sz, arch=arch, over=over):
            return python_ref.build(arch, sz, **over)

        def make_inputs(model, i, sz, arch=arch):
            batch = python_ref.example_inputs(arch, batch_size=batch_size(device), seed=i, size=sz, model=model)
            return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

        name = arch + "".join(f",{k}={v}" for k, v in over.items())
        try:
            cases = _model_cases(name, make_model, make_inputs, device, dtype, ["auto"], size=size)
        except Exception as e:  # noqa: BLE001 - one architecture must not stop the others
            log(f"  gated {name}: skipped ({type(e).__name__}: {str(e)[:200]})")
            continue
        for c in cases:  # the e2e machinery, reported as this family's rows
            c.op, c.family = f"patched:{name}", FAMILY
        out += cases
    return out


def smoke_cases(device: str = "cpu") -> list[Case]:
    """One tiny concat_linear + GELU case (eager against ours-reference), for tests/test_bench_smoke.py."""
    op = functional("concat_linear")
    if op is None:
        return []
    w, bias = randn((16, 24), torch.float32, device, seed=1), randn((16,), torch.float32, device, seed=2)
    args = Inputs(lambda i: ([randn((2, 5, 8), torch.float32, device, seed=3 * i + s) for s in range(3)], w, bias))
    providers = {"eager": lambda: eager_concat_linear_gelu(*args())}
    for b in our_backends("concat_linear", device):
        providers[f"ours-{b}"] = lambda b=b: op(*args(), activation="gelu", backend=b)
    return [Case("concat_linear+gelu", FAMILY, {"B": 2, "T": 5, "D": 24, "D_out": 16}, "float32", providers, "eager",
                 x="T", inputs=[args])]


def cases(full: bool, device: str) -> list[Case]:
    try:
        import vlmkernels  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise SkipSuite(f"vlmkernels is not importable: {type(e).__name__}: {e}")
    makers = [op_cases] if device == "cuda" else [model_cases]
    out = []
    for make in makers:
        try:
            out += make(full, device)
        except Exception as e:  # noqa: BLE001 - a half-landed op must not stop the other benches
            log(f"  {make.__name__}: skipped ({type(e).__name__}: {e})")
    return out
