"""End to end: patched against unpatched, for each python_ref architecture and each supported HF
model (MoE language models here; the HF VLMs come through python_ref's "published" architectures).

Size "small" on CPU and "base" on the GPU. Forward time for every model; a training step
(forward + backward of the loss) where the patch swapped in modules that hold trainable weights.
Peak memory is recorded on the GPU by the harness. A model in which ``patch()`` finds nothing is
reported and skipped: there is nothing to compare.
"""

from __future__ import annotations

import copy
import warnings

import torch

from ..harness import Case, Inputs, SkipSuite
from .common import log

FAMILY = "e2e"
QUICK_ARCHS = ("llava_next", "dynamic_qformer", "leo")
# variants whose fusion points are the ones vlmkernels patches (top-k selection)
VARIANTS = {"leo": {"top_k": 2}, "dynamic_vision_selector": {"top_k": 2}}
HF_MOE = ("qwen3_moe", "mixtral", "deepseek_v3", "olmoe")
QUICK_HF = ("qwen3_moe",)


def batch_size(device: str) -> int:
    # one sample on the GPU: a 7B "base" model's training step must fit beside two copies of it
    return 1 if device == "cuda" else 2


def _hf_moe_model(name: str, size: str):
    """A randomly initialised HF MoE causal LM: "small" for CPU, "base" a one-layer slice of the real model."""
    import transformers as tf

    small = size != "base"
    common = dict(vocab_size=512 if small else 32000, num_hidden_layers=2 if small else 1,
                  hidden_size=128 if small else 2048, num_attention_heads=4 if small else 32,
                  num_key_value_heads=2 if small else 4, max_position_embeddings=512)
    if name == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, moe_intermediate_size=64 if small else 768, num_experts=16 if small else 128,
                                num_experts_per_tok=4 if small else 8, norm_topk_prob=True, head_dim=32 if small else 128)
        return tf.Qwen3MoeForCausalLM(cfg)
    if name == "mixtral":
        cfg = tf.MixtralConfig(**{**common, "hidden_size": 128 if small else 4096},
                               intermediate_size=256 if small else 14336, num_local_experts=8, num_experts_per_tok=2)
        return tf.MixtralForCausalLM(cfg)
    if name == "olmoe":
        cfg = tf.OlmoeConfig(**{**common, "num_key_value_heads": common["num_attention_heads"]},
                             intermediate_size=64 if small else 1024, num_experts=16 if small else 64,
                             num_experts_per_tok=4 if small else 8)
        return tf.OlmoeForCausalLM(cfg)
    if name == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**common, intermediate_size=256 if small else 18432,
                                  moe_intermediate_size=64 if small else 2048,
                                  n_routed_experts=32 if small else 256, num_experts_per_tok=4 if small else 8,
                                  n_group=4 if small else 8, topk_group=2 if small else 4, first_k_dense_replace=0,
                                  kv_lora_rank=32 if small else 512, q_lora_rank=64 if small else 1536,
                                  qk_rope_head_dim=16 if small else 64, qk_nope_head_dim=16 if small else 128,
                                  v_head_dim=16 if small else 128)
        return tf.DeepseekV3ForCausalLM(cfg)
    raise KeyError(name)


def _hf_inputs(model, batch: int, seq: int, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def _loss(out):
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]) and out[0].dim() == 0:
        loss = out[0]
    return loss


def _trainable_patched(model, report) -> bool:
    """True when a patched module holds weights that train (its forward is on the training path)."""
    for path in report.paths():
        sub = model.get_submodule(path) if path else model
        if any(p.requires_grad for p in sub.parameters()):
            return True
    return False


def _probe(make_model, backend: str) -> tuple[bool, bool]:
    """(anything patched, a patched module trains) on the model's "tiny" size, which is cheap to
    build; the timed model is built only when its case runs."""
    import vlmkernels

    model = make_model("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = vlmkernels.patch(model, backend=backend)
    return bool(report), bool(report) and _trainable_patched(model, report)


def _build_on(make_model, size: str, device: str, dtype):
    # constructed on the device itself: random init of a 7B "base" model takes seconds there;
    # a builder that draws from a CPU generator cannot, and is built on the CPU and moved
    if device != "cpu":
        try:
            with torch.device(device):
                return make_model(size).to(dtype)
        except RuntimeError as e:
            log(f"  e2e: building on {device} failed ({str(e)[:120]}); building on the CPU")
    return make_model(size).to(device=device, dtype=dtype)


def _model_cases(label: str, make_model, make_inputs, device: str, dtype, backends: list[str],
                 size: str | None = None) -> list[Case]:
    import vlmkernels

    size = size or ("base" if device == "cuda" else "small")
    usable, trainable = [], False
    for b in backends:
        patched, trains = _probe(make_model, b)
        if patched:
            usable.append(b)
            trainable = trainable or trains
        else:
            log(f"  e2e {label}: patch(backend={b!r}) finds nothing to patch; skipped")
    if not usable:
        return []

    def build_models(_):
        base = _build_on(make_model, size, device, dtype)
        models = {"unpatched": base}
        for b in usable:
            m = copy.deepcopy(base)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vlmkernels.patch(m, backend=b)
            models[f"ours-{b}"] = m
        return models

    models = Inputs(build_models, nbytes=0, uses=2 if trainable else 1)
    inp = Inputs(lambda i: make_inputs(models.first()["unpatched"], i, size), nbytes=0, uses=2 if trainable else 1)
    shape = {"size": size, "batch": batch_size(device)}
    dname = str(dtype).replace("torch.", "")
    names = ["unpatched"] + [f"ours-{b}" for b in usable]

    def fwd(name):
        def run():
            m = models.first()[name]
            m.eval()
            with torch.no_grad():
                return m(**inp())
        return run

    def train(name):
        def run():
            m = models.first()[name]
            m.train()
            loss = _loss(m(**inp()))
            if loss is None:
                raise RuntimeError(f"{label} returned no loss for the training step")
            loss.backward()
            m.zero_grad(set_to_none=True)
        return run

    cases = [Case(f"e2e:{label}", FAMILY, shape, dname, {n: fwd(n) for n in names}, "unpatched",
                  inputs=[models, inp], timing="events")]
    if trainable:
        cases.append(Case(f"e2e:{label}", FAMILY, shape, dname, {n: train(n) for n in names}, "unpatched",
                          mode="fwd+bwd", inputs=[models, inp], timing="events"))
    return cases


def smoke_cases(device: str = "cpu") -> list[Case]:
    """Tiny HF Qwen3-MoE, patched (reference backend: needs no build) against unpatched, for
    tests/test_bench_smoke.py."""
    return _model_cases("hf:qwen3_moe", lambda sz: _hf_moe_model("qwen3_moe", sz),
                        lambda m, i, sz: _hf_inputs(m, batch_size(device), 8, i, device), device, torch.float32,
                        ["reference"], size="tiny")


def cases(full: bool, device: str) -> list[Case]:
    try:
        import python_ref
        import vlmkernels  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise SkipSuite(f"vlmkernels or python_ref is not importable: {type(e).__name__}: {e}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # one backend per device for the end-to-end runs: the one a user gets (auto), plus cuda/triton on GPU
    backends = ["auto"] + ([b for b in ("cuda", "triton") if device == "cuda" and full] if full else [])
    out: list[Case] = []
    try:
        names = list(python_ref.ARCHITECTURES.keys())
    except Exception as e:  # noqa: BLE001 - an architecture module still being written
        log(f"  e2e: python_ref architectures not loadable ({type(e).__name__}: {e}); trying one by one")
        names = list(python_ref.registry.NAMES)
    names = names if full else [n for n in QUICK_ARCHS if n in names]
    for name in names:
        over = VARIANTS.get(name, {})
        label = name + "".join(f",{k}={v}" for k, v in over.items())

        def make_model(sz, name=name, over=over):
            try:
                return python_ref.build(name, sz, **over)
            except TypeError:
                return python_ref.build(name, sz)

        def make_inputs(model, i, sz, name=name):
            batch = python_ref.example_inputs(name, batch_size=batch_size(device), seed=i, size=sz, model=model)
            return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

        try:
            out += _model_cases(label, make_model, make_inputs, device, dtype, backends)
        except Exception as e:  # noqa: BLE001 - one architecture must not stop the others
            log(f"  e2e {label}: skipped ({type(e).__name__}: {str(e)[:200]})")
    for name in HF_MOE if full else QUICK_HF:
        try:
            seq = 64 if device == "cpu" else 512
            out += _model_cases(f"hf:{name}", lambda sz, name=name: _hf_moe_model(name, sz),
                                lambda m, i, sz: _hf_inputs(m, batch_size(device), seq, i, device), device, dtype,
                                backends)
        except Exception as e:  # noqa: BLE001
            log(f"  e2e hf:{name}: skipped ({type(e).__name__}: {str(e)[:200]})")

    return out
