"""Q-Former benches: the whole patched Q-Former against HF's, the attention op alone, CPU systems.

* GPU: HF ``Blip2QFormerModel`` at BLIP-2 dims (12 layers, hidden 768, 12 heads, FFN 3072, encoder
  1408, cross-attention every 2nd layer, 32 queries; Lk 257 = EVA ViT-g/14 at 224 px and 577 =
  CLIP-L/336), batch 1 and 64, bf16 and fp32, forward and forward+backward (dropout 0: both sides
  run the same math) with BLIP-2's all-ones image mask, HF's SDPA path as the baseline, the
  patched copy (``backend="auto"``) against it. ``bytes`` is the Q-Former's weights plus its inputs
  and output, so the ``roofline`` column of a batch-1 row is the weight-read floor (anchor: 63 us
  bf16, 126 us fp32 on an H100) over the measured time; ``weight_floor_us`` in those rows' shape
  gives the floor at 3.35 TB/s.
* GPU: the attention op alone against ``F.scaled_dot_product_attention`` (its best backend for the
  dtype: flash for bf16, memory-efficient for fp32) and FlexAttention (compiled) when importable, on
  the same ``[B, 32, 12, 64]`` queries over 257 / 577 keys.
* CPU: python_ref ``blip2`` / ``instructblip`` ("small") patched with ``backend="auto"`` against the
  unpatched model, forward and forward+backward of the loss (auto keeps HF's code on CPU tensors, so
  the ratio shows that patching costs nothing there); ``--full`` adds the forced reference backend.
"""

from __future__ import annotations

import copy
import functools
import warnings

import torch
import torch.nn.functional as F

from ..harness import Case, Inputs, SkipSuite
from .common import DTYPES, functional, log, our_backends, randn

FAMILY = "qformer"
QUERIES, HIDDEN, HEADS, ENCODER = 32, 768, 12, 1408
BLIP2_QFORMER = dict(hidden_size=HIDDEN, num_hidden_layers=12, num_attention_heads=HEADS, intermediate_size=3072,
                     encoder_hidden_size=ENCODER, cross_attention_frequency=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
HBM_BYTES_PER_S = 3.35e12  # H100 SXM, the anchor's weight-read floor


def _mode(model, training: bool):
    """``model`` in train/eval mode, switching only when needed (``.train()`` walks every submodule:
    host time that would land inside the timed call)."""
    if model.training != training:
        model.train(training)
    return model


def _quiet_patch(model, **kw):
    import vlmkernels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vlmkernels.patch(model, **kw)


# ---- whole Q-Former (GPU) -------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _qformers(dname: str, device: str) -> dict:
    """HF's SDPA Q-Former at BLIP-2 dims and its patched copy (same weights), built once per dtype."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(**BLIP2_QFORMER)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        hf = Blip2QFormerModel(cfg).to(DTYPES[dname])
    ours = copy.deepcopy(hf)
    report = _quiet_patch(ours, families=["qformer"])
    if not report:
        raise RuntimeError(f"patch() found no Q-Former: {report}")
    return {"hf-sdpa": hf, "ours-auto": ours}


@functools.lru_cache(maxsize=None)
def _parameter_count() -> int:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    with torch.device("meta"):
        return sum(p.numel() for p in Blip2QFormerModel(Blip2QFormerConfig(**BLIP2_QFORMER)).parameters())


def _flops(B: int, Lk: int) -> float:
    """Matmul FLOPs of one Q-Former forward (self-attention + FFN per layer, cross layers' q/o and K/V)."""
    L, D, I, n = BLIP2_QFORMER["num_hidden_layers"], HIDDEN, BLIP2_QFORMER["intermediate_size"], QUERIES
    cross = L // BLIP2_QFORMER["cross_attention_frequency"]
    per_layer = 2 * n * (4 * D * D + 2 * D * I) + 2 * 2 * n * n * D
    per_cross = 2 * n * 2 * D * D + 2 * Lk * 2 * ENCODER * D + 2 * 2 * n * Lk * D
    return B * (L * per_layer + cross * per_cross)


def qformer_cases(full: bool, device: str, shapes=None, dnames=("bfloat16", "float32")) -> list[Case]:
    if device != "cuda" and shapes is None:  # BLIP-2 dims on the CPU: seconds per call, HF's code either way
        return []
    if functional("attention") is None or functional("qformer_cross_kv") is None:
        return []
    shapes = shapes or [(B, Lk) for B in (1, 64) for Lk in (257, 577)]

    def one(B, Lk, dname, mode):
        dtype = DTYPES[dname]
        models = Inputs(lambda _: _qformers(dname, device), nbytes=0)

        def make(i):
            q = randn((B, QUERIES, HIDDEN), dtype, device, seed=i).requires_grad_(mode != "fwd")
            # the all-ones image mask BLIP-2's get_image_features passes
            return q, randn((B, Lk, ENCODER), dtype, device, seed=100 + i), torch.ones(B, Lk, dtype=torch.long,
                                                                                   device=device)

        io_bytes = (B * QUERIES * HIDDEN * 2 + B * Lk * ENCODER) * dtype.itemsize
        inp = Inputs(make, nbytes=io_bytes)

        def provider(name):
            def fwd():
                m = _mode(models.first()[name], False)
                q, s, mask = inp()
                with torch.no_grad():
                    return m(query_embeds=q, encoder_hidden_states=s, encoder_attention_mask=mask).last_hidden_state

            def train():
                m = _mode(models.first()[name], True)
                q, s, mask = inp()
                out = m(query_embeds=q, encoder_hidden_states=s, encoder_attention_mask=mask).last_hidden_state
                out.float().sum().backward()
                m.zero_grad(set_to_none=True)
                q.grad = None
            return fwd if mode == "fwd" else train

        weights = _parameter_count() * dtype.itemsize
        shape = {"B": B, "Lk": Lk, "layers": 12, "hidden": HIDDEN, "encoder": ENCODER, "queries": QUERIES}
        if B == 1:
            shape["weight_floor_us"] = round(weights / HBM_BYTES_PER_S * 1e6)
        return Case("qformer", FAMILY, shape, dname, {n: provider(n) for n in ("hf-sdpa", "ours-auto")}, "hf-sdpa",
                    mode=mode, x="B", nbytes=weights + io_bytes, flops=_flops(B, Lk) * (1 if mode == "fwd" else 3),
                    inputs=[models, inp], timing="events",
                    note="batch-1 floor: the weights read once (63 us bf16, 126 us fp32 at 3.35 TB/s)")

    return [one(B, Lk, dname, mode) for dname in dnames for mode in ("fwd", "fwd+bwd")
            for (B, Lk) in shapes]


# ---- the attention op alone ---------------------------------------------------------------------

def _flex():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention, dynamic=False)


def attention_cases(full: bool, device: str, shapes=None, dnames=None) -> list[Case]:
    attention = functional("attention")
    if attention is None:
        return []
    if shapes is None:
        # CPU: only the reference backend (python_ref's einsum math) runs there; full mode times it anyway
        shapes = [(B, Lk) for B in (1, 8, 64) for Lk in (257, 577)] if device == "cuda" else \
            ([(8, 257)] if full else [])
    if dnames is None:
        dnames = ("bfloat16", "float32") if device == "cuda" else ("float32",)
    flex = _flex() if device == "cuda" else None

    def one(B, Lk, dname, H=HEADS, d=HIDDEN // HEADS, Lq=QUERIES):
        dtype = DTYPES[dname]

        def make(i):
            return (randn((B, Lq, H, d), dtype, device, seed=i), randn((B, Lk, H, d), dtype, device, seed=50 + i),
                    randn((B, Lk, H, d), dtype, device, seed=90 + i))

        nbytes = (2 * B * Lq + 2 * B * Lk) * H * d * dtype.itemsize
        inp = Inputs(make, nbytes=nbytes)

        def sdpa():  # HF's layout: [B, H, L, d] views of the projections
            q, k, v = (t.transpose(1, 2) for t in inp())
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v)

        providers = {"torch-sdpa": sdpa}
        if flex is not None:
            def flex_call():
                q, k, v = (t.transpose(1, 2) for t in inp())
                with torch.no_grad():
                    return flex(q, k, v)
            providers["flex_attention"] = flex_call
        for b in our_backends("attention", device):
            providers[f"ours-{b}"] = lambda b=b: attention(*inp(), backend=b)
        return Case("attention", FAMILY, {"B": B, "Lq": Lq, "Lk": Lk, "H": H, "d": d}, dname, providers,
                    "torch-sdpa", x="B", nbytes=nbytes, flops=4 * B * H * Lq * Lk * d, inputs=[inp])

    return [one(B, Lk, dname) for dname in dnames for (B, Lk) in shapes]


# ---- CPU: python_ref systems patched vs unpatched -------------------------------------------------

def system_cases(full: bool, device: str, names=("blip2", "instructblip"), size: str = "small",
                 batch: int = 2) -> list[Case]:
    if device != "cpu":
        return []
    try:
        import python_ref
    except Exception as e:  # noqa: BLE001
        log(f"  qformer systems: python_ref is not importable ({type(e).__name__}: {e})")
        return []
    backends = ["auto"] + (["reference"] if full else [])

    def cases_for(name):
        def build(_):
            torch.manual_seed(0)
            base = python_ref.build(name, size)
            models = {"unpatched": base}
            for b in backends:
                m = copy.deepcopy(base)
                if not _quiet_patch(m, families=["qformer"], backend=b):
                    raise RuntimeError(f"patch() found no Q-Former in python_ref {name}")
                models[f"ours-{b}"] = m
            return models

        models = Inputs(build, nbytes=0, uses=2)
        inp = Inputs(lambda i: python_ref.example_inputs(name, batch_size=batch, seed=i, size=size,
                                                         model=models.first()["unpatched"]), nbytes=0, uses=2)

        def fwd(p):
            def run():
                m = _mode(models.first()[p], False)
                with torch.no_grad():
                    return m(**inp())
            return run

        def train(p):
            def run():
                m = _mode(models.first()[p], True)
                m(**inp()).loss.backward()
                m.zero_grad(set_to_none=True)
            return run

        names_ = ["unpatched"] + [f"ours-{b}" for b in backends]
        shape = {"system": name, "size": size, "batch": batch}
        return [Case(f"qformer:{name}", FAMILY, shape, "float32", {p: make(p) for p in names_}, "unpatched",
                     mode=mode, inputs=[models, inp])
                for mode, make in (("fwd", fwd), ("fwd+bwd", train))]

    return [c for name in names for c in cases_for(name)]


def smoke_cases(device: str = "cpu") -> list[Case]:
    """One tiny case for tests/test_bench_smoke.py: the attention op against SDPA."""
    return attention_cases(False, device, shapes=[(2, 7)], dnames=("float32",))


def cases(full: bool, device: str) -> list[Case]:
    try:
        import vlmkernels  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise SkipSuite(f"vlmkernels is not importable: {type(e).__name__}: {e}")
    out = []
    for make in (qformer_cases, attention_cases, system_cases):
        try:
            out += make(full, device)
        except Exception as e:  # noqa: BLE001 - a half-landed op must not stop the other benches
            log(f"  {make.__name__}: skipped ({type(e).__name__}: {e})")
    return out
