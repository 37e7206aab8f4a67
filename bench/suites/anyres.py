"""AnyRes benches: uint8 images -> normalized tiles, patch embedding, feature packing.

Baselines: HF's LLaVA-NeXT image processors (torchvision backend, the v5 default, and the PIL
backend) configured as llava-v1.6 ships them (336 tiles, CLIP mean/std); HF's CLIP embeddings
module plus its pre-LayerNorm for patch_embed; HF's ``LlavaNextModel.pack_image_features`` for
anyres_pack. CPU per-image sizes are issue 4's 640x480 .. 4032x3024 at 2 threads, from uint8
tensors (``anyres_tile``) and, as users pass them, from PIL images through a patched processor
(``anyres_tile[pil]``, issue 15).
"""

from __future__ import annotations

import types

import torch

from ..harness import Case, Inputs, SkipSuite
from .common import DTYPES, compile_modes, compile_provider_name, compiled, functional, log, our_backends, randn, reference

FAMILY = "anyres"
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TILE = 336
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CPU_SIZES = ((480, 640), (768, 1024), (1536, 2048), (3024, 4032))  # (H, W)


def _hf_processors():
    """{provider: processor} for the HF LLaVA-NeXT processors this transformers version has."""
    import transformers

    kw = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    out = {}
    tv = getattr(transformers, "LlavaNextImageProcessor", None)
    pil = getattr(transformers, "LlavaNextImageProcessorPil", None)
    if pil is None:  # transformers 4.x: the "slow" class is the PIL one, the torchvision one is *Fast
        pil, tv = tv, getattr(transformers, "LlavaNextImageProcessorFast", None)
    for name, cls in (("hf-torchvision", tv), ("hf-pil", pil)):
        if cls is None:
            continue
        try:
            out[name] = cls(**kw)
        except Exception as e:  # noqa: BLE001 - torchvision missing etc.
            log(f"  anyres_tile: {name} unavailable ({type(e).__name__}: {e})")
    return out


def _image_batch(B: int, H: int, W: int, device: str) -> Inputs:
    """Rotating inputs: lists of B random uint8 [3, H, W] images on the device."""
    def make(i):
        g = torch.Generator(device=device).manual_seed(i)
        return [torch.randint(0, 256, (3, H, W), dtype=torch.uint8, device=device, generator=g) for _ in range(B)]
    return Inputs(make, nbytes=B * 3 * H * W)


def tile_cases(full: bool, device: str) -> list[Case]:
    tile = functional("anyres_tile")
    if tile is None:
        return []
    ref = reference("anyres_tile")
    procs = _hf_processors()

    def gpu_case(B, H, W):
        # a batch of B images, uint8 on the GPU -> normalized tiles (issue 4's roofline row)
        inp = _image_batch(B, H, W, device)
        providers = {}
        if "hf-torchvision" in procs:
            p = procs["hf-torchvision"]
            providers["hf-torchvision"] = lambda: p(images=inp(), return_tensors="pt", device=device)
        if ref is not None:
            providers["python_ref"] = lambda: ref(inp(), PINPOINTS, TILE, CLIP_MEAN, CLIP_STD)
        for b in our_backends("anyres_tile", device):
            providers[f"ours-{b}"] = lambda b=b: tile(inp(), PINPOINTS, TILE, CLIP_MEAN, CLIP_STD, backend=b)
        if not providers:
            return None
        base = "hf-torchvision" if "hf-torchvision" in providers else next(iter(providers))
        out_bytes = B * 5 * 3 * TILE * TILE * 4  # 4 grid tiles + global view, fp32
        return Case("anyres_tile", FAMILY, {"batch": B, "H": H, "W": W}, "uint8->float32", providers, base,
                    x="H", nbytes=B * 3 * H * W + out_bytes, inputs=[inp], timing="events")

    def cpu_case(H, W):
        def make(i):
            return torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        inp = Inputs(make, nbytes=3 * H * W)
        inputs = [inp]
        providers = {}
        if "hf-torchvision" in procs:
            p_tv = procs["hf-torchvision"]
            providers["hf-torchvision"] = lambda: p_tv(images=inp(), return_tensors="pt")
        if "hf-pil" in procs:
            from PIL import Image

            p_pil = procs["hf-pil"]
            # the PIL backend's natural input is a PIL image: converted outside the timed call
            pil_img = Inputs(lambda i: Image.fromarray(make(i).permute(1, 2, 0).numpy()), nbytes=3 * H * W)
            inputs.append(pil_img)
            providers["hf-pil"] = lambda: p_pil(images=pil_img(), return_tensors="pt")
        if ref is not None and full:  # python_ref's exact-Pillow float64 resize is slow: --full only
            providers["python_ref"] = lambda: ref([inp()], PINPOINTS, TILE, CLIP_MEAN, CLIP_STD)
        for b in our_backends("anyres_tile", device):
            providers[f"ours-{b}"] = lambda b=b: tile([inp()], PINPOINTS, TILE, CLIP_MEAN, CLIP_STD, backend=b)
        if not providers:
            return None
        base = "hf-torchvision" if "hf-torchvision" in providers else next(iter(providers))
        return Case("anyres_tile", FAMILY, {"H": H, "W": W}, "uint8->float32", providers, base, x="H",
                    inputs=inputs, note="per image, 2 threads; issue 4 targets >= 3x torchvision, >= 20x PIL")

    if device == "cuda":
        batches = [(32, 768, 1024)] + ([(32, 1536, 2048), (8, 3024, 4032)] if full else [])
        cases = [gpu_case(*b) for b in batches]
    else:
        # issue 4's four sizes are the headline CPU comparison: quick mode keeps them all
        cases = [cpu_case(*hw) for hw in CPU_SIZES] + [_pil_case(procs, *hw) for hw in CPU_SIZES]
    return [c for c in cases if c is not None]


def _pil_case(procs: dict, H: int, W: int) -> Case | None:
    """A PIL image (what users pass) through HF's two processors and through a patched one (ours:
    Pillow's memory read in place, its one block or the row runs of its several blocks)."""
    if "hf-pil" not in procs or functional("anyres_tile") is None:
        return None
    import copy

    import vlmkernels
    from PIL import Image

    def make(i):
        g = torch.Generator().manual_seed(i)
        return Image.fromarray(torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=g).numpy())

    inp = Inputs(make, nbytes=3 * H * W)
    patched = copy.deepcopy(procs["hf-pil"])
    vlmkernels.patch(patched, families=["anyres"])
    providers = {name: (lambda p=p: p(images=inp(), return_tensors="pt")) for name, p in procs.items()}
    providers["ours-cpu"] = lambda: patched(images=inp(), return_tensors="pt")
    return Case("anyres_tile[pil]", FAMILY, {"H": H, "W": W}, "PIL->float32", providers, "hf-pil", x="H",
                inputs=[inp], note="PIL input, per image, 2 threads; issue 15 targets >= 20x PIL, >= 5x torchvision")


def _hf_clip_embed(D: int, dtype, device, tile: int = TILE, patch: int = 14):
    """HF CLIPVisionEmbeddings + pre_layrnorm (CLIP-L/14-336 by default), weights random."""
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    cfg = CLIPVisionConfig(hidden_size=D, image_size=tile, patch_size=patch, num_hidden_layers=1,
                           num_attention_heads=max(1, D // 64), intermediate_size=4 * D)
    emb = CLIPVisionEmbeddings(cfg)
    ln = torch.nn.LayerNorm(D, eps=cfg.layer_norm_eps)
    with torch.no_grad():
        for p in list(emb.parameters()) + list(ln.parameters()):
            p.copy_(torch.randn_like(p) * 0.02)
    return emb.to(device, dtype).requires_grad_(False), ln.to(device, dtype).requires_grad_(False)


def embed_cases(full: bool, device: str, tiles=None, D: int = 1024, tile: int = TILE, patch: int = 14,
                compile: bool = True) -> list[Case]:
    embed = functional("patch_embed")
    if embed is None:
        return []
    ref = reference("patch_embed")
    if device == "cuda":
        tiles = tiles or ((5, 160) if not full else (5, 40, 160, 640))  # one 2x2+global image .. 128 images
        dname = "bfloat16"
    else:
        tiles = tiles or (5,)
        dname = "float32"
    dtype = DTYPES[dname]
    try:
        emb, ln = _hf_clip_embed(D, dtype, device, tile, patch)
    except Exception as e:  # noqa: BLE001
        log(f"  patch_embed: HF CLIP embeddings unavailable ({type(e).__name__}: {e})")
        return []
    weight = emb.patch_embedding.weight
    cls, pos = emb.class_embedding, emb.position_embedding.weight

    def hf(pixels):
        with torch.no_grad():
            return ln(emb(pixels))

    def one(N):
        inp = Inputs(lambda i: randn((N, 3, tile, tile), dtype, device, seed=i),
                     nbytes=N * 3 * tile * tile * dtype.itemsize)
        providers = {"hf-eager": lambda: hf(inp())}
        for mode in compile_modes(full, device):
            if (device == "cpu" and not full) or not compile:
                break  # compiling a 1024-wide conv + LN on a 2-core box costs more than the quick run
            providers[compile_provider_name(mode)] = lambda c=compiled(hf, mode): c(inp())
        if ref is not None:
            providers["python_ref"] = lambda: ref(inp(), weight, None, class_embedding=cls, position_embedding=pos,
                                                  pre_layernorm=ln)
        for b in our_backends("patch_embed", device):
            providers[f"ours-{b}"] = lambda b=b: embed(inp(), weight, None, class_embedding=cls,
                                                       position_embedding=pos, pre_layernorm=ln, backend=b)
        P, K = (tile // patch) ** 2, 3 * patch * patch
        io = (N * 3 * tile * tile + N * (P + 1) * D + D * K + (P + 1) * D) * dtype.itemsize
        return Case("patch_embed", FAMILY, {"tiles": N, "D": D, "p": patch, "S": tile}, dname, providers,
                    "hf-eager", x="tiles", nbytes=io, flops=2 * N * P * K * D, inputs=[inp])

    return [one(N) for N in tiles]


def encode_cases(full: bool, device: str) -> list[Case]:
    """uint8 images -> CLIP-L/14-336 patch embeddings (2x2 grid + global view per 4:3 image): HF's
    torchvision processor followed by HF's CLIP embeddings + pre-LN, against anyres_encode (tiler +
    uint8 GEMM) and, on CUDA, its one-kernel variant. Issue 4's GPU row: <= 20 us per image."""
    encode = functional("anyres_encode")
    if encode is None:
        return []
    procs = _hf_processors()
    if device == "cuda":
        configs, dname = ([8, 32] if full else [32]), "bfloat16"
    else:
        configs, dname = [1], "float32"
    dtype = DTYPES[dname]
    try:
        emb, ln = _hf_clip_embed(1024, dtype, device)
    except Exception as e:  # noqa: BLE001
        log(f"  anyres_encode: HF CLIP embeddings unavailable ({type(e).__name__}: {e})")
        return []
    weight, cls, pos = emb.patch_embedding.weight, emb.class_embedding, emb.position_embedding.weight
    H, W = 768, 1024

    def one(B):
        inp = _image_batch(B, H, W, device)
        providers = {}
        if "hf-torchvision" in procs:
            p = procs["hf-torchvision"]

            def hf():
                kw = {"device": device} if device == "cuda" else {}
                px = p(images=inp(), return_tensors="pt", **kw)["pixel_values"]
                with torch.no_grad():
                    return ln(emb(px.flatten(0, 1).to(device, dtype)))
            providers["hf-torchvision+clip"] = hf
        args = lambda: (inp(), PINPOINTS, TILE, CLIP_MEAN, CLIP_STD, weight)  # noqa: E731
        kw = dict(class_embedding=cls, position_embedding=pos, pre_layernorm=ln)
        providers["ours-two-kernel"] = lambda: encode(*args(), **kw)
        if device == "cuda":
            providers["ours-fused"] = lambda: encode(*args(), **kw, fused=True)
        base = "hf-torchvision+clip" if "hf-torchvision+clip" in providers else "ours-two-kernel"
        return Case("anyres_encode", FAMILY, {"images": B, "H": H, "W": W, "D": 1024}, f"uint8->{dname}", providers,
                    base, x="images", inputs=[inp], timing="events",
                    note="per call for the whole batch; per image = time / images")

    return [one(B) for B in configs]


def _hf_pack():
    """HF LlavaNextModel.pack_image_features bound to a stand-in holding just what it reads."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    cfg = types.SimpleNamespace(image_grid_pinpoints=PINPOINTS,
                                vision_config=types.SimpleNamespace(image_size=TILE, patch_size=14))
    owner = types.SimpleNamespace(config=cfg)
    return lambda feats, sizes, newline: LlavaNextModel.pack_image_features(owner, feats, sizes, "default", newline)


def pack_cases(full: bool, device: str) -> list[Case]:
    pack = functional("anyres_pack")
    if pack is None:
        return []
    ref = reference("anyres_pack")
    side = TILE // 14
    if device == "cuda":
        configs = [(1, 4096), (16, 4096)] + ([(64, 4096)] if full else [])
        dname = "bfloat16"
    else:
        configs = [(2, 1024)] + ([(8, 4096)] if full else [])
        dname = "float32"
    dtype = DTYPES[dname]
    try:
        hf = _hf_pack()
    except Exception as e:  # noqa: BLE001
        log(f"  anyres_pack: HF pack_image_features unavailable ({type(e).__name__}: {e})")
        hf = None
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    def one(B, C):
        # images of mixed aspect: each picks a 2x2, 1x2 or 2x1 grid, so tiles per image vary
        sizes = torch.tensor([[(768, 1024), (480, 1280), (1280, 480), (672, 672)][i % 4] for i in range(B)])
        tiles_per = []
        for hw in sizes.tolist():
            rows, cols = get_anyres_image_grid_shape(hw, PINPOINTS, TILE)  # HF's own grid choice
            tiles_per.append(rows * cols + 1)
        total = sum(tiles_per)
        inp = Inputs(lambda i: (randn((total, side * side, C), dtype, device, seed=i),
                                randn((C,), dtype, device, seed=500 + i)),
                     nbytes=total * side * side * C * dtype.itemsize)
        sizes_dev = sizes.to(device)
        providers = {}
        if hf is not None:
            def hf_call():
                feats, newline = inp()
                with torch.no_grad():
                    return hf(list(torch.split(feats, tiles_per)), sizes_dev, newline)
            providers["hf-pack_image_features"] = hf_call
        if ref is not None:
            providers["python_ref"] = lambda: (lambda f, n: ref(f, sizes, PINPOINTS, TILE, n))(*inp())
        for b in our_backends("anyres_pack", device):
            providers[f"ours-{b}"] = lambda b=b: (lambda f, n: pack(f, sizes, PINPOINTS, TILE, n, backend=b))(*inp())
        if not providers:
            return None
        base = "hf-pack_image_features" if hf is not None else next(iter(providers))
        feat_bytes = total * side * side * C * dtype.itemsize
        return Case("anyres_pack", FAMILY, {"images": B, "C": C, "tiles": total}, dname, providers, base,
                    x="images", nbytes=2 * feat_bytes, inputs=[inp], timing="events")

    return [c for c in (one(*bc) for bc in configs) if c is not None]


def smoke_cases(device: str = "cpu") -> list[Case]:
    """One tiny case (for tests/test_bench_smoke.py): a 2-tile patch embedding, D=32, 28px tiles."""
    return embed_cases(False, device, tiles=(2,), D=32, tile=28, patch=14, compile=False)


def cases(full: bool, device: str) -> list[Case]:
    try:
        import vlmkernels  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise SkipSuite(f"vlmkernels is not importable: {type(e).__name__}: {e}")
    out = []
    for make in (tile_cases, embed_cases, encode_cases, pack_cases):
        try:
            out += make(full, device)
        except Exception as e:  # noqa: BLE001 - a half-landed op must not stop the other benches
            log(f"  {make.__name__}: skipped ({type(e).__name__}: {e})")
    return out
