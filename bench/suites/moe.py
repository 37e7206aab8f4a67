"""MoE routing benches: route, grouped route, align, route+align, fused experts, token top-k.

Baselines are what a user runs today: the router chains of HF Mixtral/Qwen-MoE (softmax -> topk ->
renorm -> cast) and DeepSeek-V3 (sigmoid -> +bias -> group top-2 sum -> group mask -> topk ->
gather -> renorm -> scale), written as those models write them; transformers' experts
implementations (eager loop, grouped_mm, batched_mm) through its experts interface; torch.topk +
gather for token selection. Shapes follow issue 3's bench table (Qwen3-30B-A3B and Mixtral).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..harness import Case, Inputs, SkipSuite
from .common import (DTYPES, compile_modes, compile_provider_name, compiled, functional, log, nbytes,
                     our_backends, randn, reference)

FAMILY = "moe"


# ---- the user's alternative: HF router code ------------------------------------------------------

def hf_softmax_router(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, cast_back: bool = False):
    """Mixtral (always renormalizes, fp32 weights) / Qwen-MoE (renorm iff norm_topk_prob, weights cast
    back to the logits dtype) router math after the gate projection."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    if cast_back:
        top_w = top_w.to(logits.dtype)
    return top_w, top_i


def hf_deepseek_v3_router(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                          norm_topk_prob: bool = True, routed_scaling_factor: float = 2.5):
    """DeepSeek-V3 router math after the (fp32) gate projection, step for step as HF writes it."""
    scores = logits.float().sigmoid()
    T, E = scores.shape
    choice = scores + bias.unsqueeze(0)
    group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    choice = choice.masked_fill(~score_mask.bool(), 0.0)
    top_i = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    top_w = scores.gather(1, top_i)
    if norm_topk_prob:
        top_w = top_w / (top_w.sum(dim=-1, keepdim=True) + 1e-20)
    return top_w * routed_scaling_factor, top_i


def hf_expert_grouping(top_i: torch.Tensor, num_experts: int):
    """What HF's grouped_mm path does to group (token, slot) entries by expert: sort, count, offsets."""
    flat = top_i.reshape(-1)
    perm = torch.argsort(flat, stable=True)
    counts = torch.histc(flat.float(), bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    return perm, offsets


# ---- shapes --------------------------------------------------------------------------------------

def _route_shapes(full: bool, device: str):
    """(T, E, k) for softmax routing and (T, E, k, groups, topk_groups) for grouped sigmoid routing."""
    if device == "cuda":
        if full:
            plain = [(t, e, k) for (e, k) in ((8, 2), (64, 8), (128, 8), (256, 8)) for t in (1, 16, 128, 1024, 4096, 16384)]
            grouped = [(t, 256, 8, 8, 4) for t in (1, 16, 128, 1024, 4096, 16384)]
        else:
            plain = [(16, 8, 2), (4096, 8, 2), (16, 128, 8), (4096, 128, 8)]
            grouped = [(16, 256, 8, 8, 4), (4096, 256, 8, 8, 4)]
    else:
        if full:
            plain = [(t, e, k) for (e, k) in ((8, 2), (64, 8), (128, 8)) for t in (16, 256, 4096)]
            grouped = [(t, 256, 8, 8, 4) for t in (16, 256, 4096)]
        else:
            plain = [(4096, 64, 8), (64, 128, 8)]
            grouped = [(1024, 256, 8, 8, 4)]
    return plain, grouped


def _logits_dtype(device: str) -> str:
    # bf16 logits on the GPU (the model's activations); fp32 on CPU, where models usually run in fp32
    return "bfloat16" if device == "cuda" else "float32"


def _add_ours(providers: dict, op: str, device: str, call) -> None:
    for b in our_backends(op, device):
        providers[f"ours-{b}"] = (lambda b=b: call(b))


def route_cases(full: bool, device: str, plain=None, grouped=None, compile: bool = True) -> list[Case]:
    route = functional("moe_topk_route")
    if route is None:
        return []
    ref = reference("moe_topk_route")
    dname = _logits_dtype(device)
    dtype = DTYPES[dname]
    if plain is None or grouped is None:
        plain, grouped = _route_shapes(full, device)
    modes = compile_modes(full, device) if compile else []

    # one function per case, so that every provider closes over its own case's inputs
    def softmax_case(T, E, k):
        inp = Inputs(lambda i: randn((T, E), dtype, device, seed=i), nbytes=T * E * dtype.itemsize)
        providers = {"hf-eager": lambda: hf_softmax_router(inp(), k)}
        for mode in modes:
            c = compiled(hf_softmax_router, mode)
            providers[compile_provider_name(mode)] = lambda c=c: c(inp(), k)
        if ref is not None:
            providers["python_ref"] = lambda: ref(inp(), k)
        _add_ours(providers, "moe_topk_route", device, lambda b: route(inp(), k, backend=b))
        return Case("moe_topk_route", FAMILY, {"T": T, "E": E, "k": k}, dname, providers, "hf-eager",
                    x="T", nbytes=T * E * dtype.itemsize + T * k * 8, inputs=[inp])

    def grouped_case(T, E, k, G, TG):
        bias = randn((E,), torch.float32, device, seed=99, scale=0.1)
        inp = Inputs(lambda i: randn((T, E), torch.float32, device, seed=i), nbytes=T * E * 4)
        kw = dict(scoring="sigmoid", bias=bias, num_groups=G, topk_groups=TG, scaling_factor=2.5)
        providers = {"hf-eager": lambda: hf_deepseek_v3_router(inp(), bias, k, G, TG)}
        for mode in modes:
            c = compiled(hf_deepseek_v3_router, mode)
            providers[compile_provider_name(mode)] = lambda c=c: c(inp(), bias, k, G, TG)
        if ref is not None:
            providers["python_ref"] = lambda: ref(inp(), k, **kw)
        _add_ours(providers, "moe_topk_route", device, lambda b: route(inp(), k, backend=b, **kw))
        return Case("moe_topk_route[grouped]", FAMILY, {"T": T, "E": E, "k": k, "groups": G, "topk_groups": TG},
                    "float32", providers, "hf-eager", x="T", nbytes=T * E * 4 + T * k * 8, inputs=[inp])

    return [softmax_case(*s) for s in plain] + [grouped_case(*s) for s in grouped]


def align_cases(full: bool, device: str) -> list[Case]:
    align = functional("moe_align_block_size")
    if align is None:
        return []
    ref = reference("moe_align_block_size")
    if device == "cuda":
        shapes = [(16, 8, 128, 64), (4096, 8, 128, 64), (16384, 8, 256, 64)] if not full else \
            [(t, k, e, 64) for (e, k) in ((8, 2), (128, 8), (256, 8)) for t in (1, 16, 256, 1024, 4096, 16384)]
    else:
        shapes = [(4096, 8, 64, 64)] if not full else [(t, 8, 64, 64) for t in (16, 256, 4096, 16384)]

    def one(T, k, E, B):
        def make(i):
            g = torch.Generator(device=device).manual_seed(i)
            return torch.randint(0, E, (T, k), device=device, dtype=torch.int32, generator=g)
        inp = Inputs(make, nbytes=T * k * 4)
        # baseline: the sort/histc/cumsum HF's grouped_mm path runs to group entries by expert
        providers = {"hf-sort-histc": lambda: hf_expert_grouping(inp(), E)}
        if ref is not None:
            providers["python_ref"] = lambda: ref(inp(), E, B)
        _add_ours(providers, "moe_align_block_size", device, lambda b: align(inp(), E, B, backend=b))
        out_bytes = (T * k + E * (B - 1)) * 4
        return Case("moe_align_block_size", FAMILY, {"T": T, "k": k, "E": E, "block": B}, "int32", providers,
                    "hf-sort-histc", x="T", nbytes=T * k * 4 + out_bytes, inputs=[inp],
                    note="python_ref is the vLLM-layout reference; hf-sort-histc is HF's grouping")

    return [one(*s) for s in shapes]


def route_align_cases(full: bool, device: str) -> list[Case]:
    """CPU route + align together against the eager chain, as issue 3's CPU target states it."""
    route, align = functional("moe_topk_route"), functional("moe_align_block_size")
    if route is None or align is None or device != "cpu":
        return []
    backends = [b for b in our_backends("moe_topk_route", device) if b in our_backends("moe_align_block_size", device)]
    T, E, k, B = 4096, 64, 8, 64
    inp = Inputs(lambda i: randn((T, E), torch.float32, device, seed=i), nbytes=T * E * 4)

    def eager():
        w, i = hf_softmax_router(inp(), k)
        return w, hf_expert_grouping(i, E)

    def ours(b):
        w, i = route(inp(), k, backend=b)
        return w, align(i, E, B, backend=b)

    providers = {"hf-eager": eager}
    for b in backends:
        providers[f"ours-{b}"] = lambda b=b: ours(b)
    return [Case("route+align", FAMILY, {"T": T, "E": E, "k": k, "block": B}, "float32", providers, "hf-eager",
                 x="T", inputs=[inp])]


# ---- fused experts -------------------------------------------------------------------------------

def _hf_experts(E: int, H: int, I: int, dtype, device):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    with torch.device("meta"):
        experts = Qwen3MoeExperts(cfg)
    experts = experts.to_empty(device=device).to(dtype).requires_grad_(False)
    experts.gate_up_proj.copy_(randn(experts.gate_up_proj.shape, dtype, device, seed=1, scale=H ** -0.5))
    experts.down_proj.copy_(randn(experts.down_proj.shape, dtype, device, seed=2, scale=I ** -0.5))
    return experts, cfg


def _hf_experts_call(experts, cfg, impl: str):
    def run(x, ids, w):
        cfg._experts_implementation = impl  # the switch transformers' experts interface reads
        with torch.no_grad():
            return experts(x, ids, w)
    return run


def fused_moe_cases(full: bool, device: str) -> list[Case]:
    fused = functional("fused_moe")
    if fused is None:
        return []
    ref = reference("fused_moe")
    try:
        _hf_experts(2, 8, 8, torch.float32, "cpu")
        hf_ok = True
    except Exception as e:  # noqa: BLE001
        log(f"  fused_moe: HF experts unavailable ({type(e).__name__}: {e}); timing python_ref as the baseline")
        hf_ok = False
    if device == "cuda":
        models = {"qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2)}
        tokens = (1, 16, 256, 4096) if full else (16, 4096)
        dname = "bfloat16"
    else:
        models = {"qwen3-moe-mini": (16, 256, 128, 4)}
        tokens = (16, 256) if full else (64,)
        dname = "float32"
    dtype = DTYPES[dname]
    def one(experts, cfg, wg, wd, model, E, H, I, k, T):
        def make(i):
            g = torch.Generator(device=device).manual_seed(100 + i)
            x = randn((T, H), dtype, device, seed=i)
            ids = torch.argsort(torch.rand((T, E), generator=g, device=device), dim=-1)[:, :k]
            w = torch.softmax(torch.rand((T, k), generator=g, device=device), -1)
            return x, ids, w
        inp = Inputs(make, nbytes=T * H * dtype.itemsize * 2 + T * k * 16)
        providers = {}
        if experts is not None:
            for impl in ("grouped_mm", "batched_mm", "eager"):
                if impl == "batched_mm" and T * k * 3 * H * I * dtype.itemsize > (16 << 30):
                    continue  # batched_mm copies the weights per (token, slot)
                if impl == "eager" and device == "cuda" and T > 256 and not full:
                    continue  # a Python loop over experts: minutes at prefill sizes
                call = _hf_experts_call(experts, cfg, impl)
                providers[f"hf-{impl}"] = lambda call=call: call(*inp())
        if ref is not None:
            providers["python_ref"] = lambda: (lambda x, ids, w: ref(x, wg, wd, w, ids))(*inp())
        _add_ours(providers, "fused_moe", device,
                  lambda b: (lambda x, ids, w: fused(x, wg, wd, w, ids, backend=b))(*inp()))
        if not providers:
            return None
        base = "hf-grouped_mm" if "hf-grouped_mm" in providers else next(iter(providers))
        hit = min(E, T * k)  # experts whose weights must be read at least once
        return Case("fused_moe", FAMILY, {"model": model, "T": T, "E": E, "H": H, "I": I, "k": k}, dname,
                    providers, base, x="T", inputs=[inp], timing="events",
                    nbytes=nbytes(wg, wd) * hit / E + 2 * T * H * dtype.itemsize, flops=2 * T * k * 3 * H * I)

    cases = []
    for model, (E, H, I, k) in models.items():
        if hf_ok:
            experts, cfg = _hf_experts(E, H, I, dtype, device)
            wg, wd = experts.gate_up_proj, experts.down_proj
        else:
            experts = cfg = None
            wg = randn((E, 2 * I, H), dtype, device, seed=1, scale=H ** -0.5)
            wd = randn((E, H, I), dtype, device, seed=2, scale=I ** -0.5)
        for T in tokens:
            case = one(experts, cfg, wg, wd, model, E, H, I, k, T)
            if case is not None:
                cases.append(case)
    return cases


def select_cases(full: bool, device: str) -> list[Case]:
    select = functional("topk_select_tokens")
    if select is None:
        return []
    ref = reference("topk_select_tokens")
    if device == "cuda":
        shapes = [(8, 576, 1024, 64), (32, 576, 1024, 144)] + ([(64, 2304, 1024, 256)] if full else [])
        dname = "bfloat16"
    else:
        shapes = [(4, 576, 256, 64)] + ([(8, 576, 1024, 144)] if full else [])
        dname = "float32"
    dtype = DTYPES[dname]

    def eager(scores, tokens, k):
        idx = torch.topk(scores, k, dim=1).indices
        return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), idx

    def one(B, N, D, k, mode):
        def make(i):
            tokens = randn((B, N, D), dtype, device, seed=i).requires_grad_(mode != "fwd")
            return randn((B, N), torch.float32, device, seed=1000 + i), tokens

        inp = Inputs(make, nbytes=B * N * D * dtype.itemsize)

        def wrap(fn):
            if mode == "fwd":
                def run():
                    with torch.no_grad():
                        return fn(*inp())
                return run

            def run_bwd():
                sel, _ = fn(*inp())
                sel.sum().backward()
            return run_bwd

        providers = {"torch-topk-gather": wrap(lambda s, t: eager(s, t, k))}
        if ref is not None:
            providers["python_ref"] = wrap(lambda s, t: ref(s, t, k))
        for b in our_backends("topk_select_tokens", device):
            providers[f"ours-{b}"] = wrap(lambda s, t, b=b: select(s, t, k, backend=b))
        moved = B * N * 4 + 2 * B * k * D * dtype.itemsize
        return Case("topk_select_tokens", FAMILY, {"B": B, "N": N, "D": D, "k": k}, dname, providers,
                    "torch-topk-gather", mode=mode, x="B", inputs=[inp],
                    nbytes=moved if mode == "fwd" else 2 * moved + B * N * D * dtype.itemsize,
                    timing="auto" if mode == "fwd" else "events")

    return [one(*shape, mode) for shape in shapes for mode in ("fwd", "fwd+bwd")]


def smoke_cases(device: str = "cpu") -> list[Case]:
    """One tiny case (for tests/test_bench_smoke.py): grouped routing, no compile."""
    return route_cases(False, device, plain=[], grouped=[(8, 16, 2, 4, 2)], compile=False)


def cases(full: bool, device: str) -> list[Case]:
    try:
        import vlmkernels  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise SkipSuite(f"vlmkernels is not importable: {type(e).__name__}: {e}")
    out = []
    for make in (route_cases, align_cases, route_align_cases, fused_moe_cases, select_cases):
        try:
            out += make(full, device)
        except Exception as e:  # noqa: BLE001 - a half-landed op must not stop the other benches
            log(f"  {make.__name__}: skipped ({type(e).__name__}: {e})")
    return out
