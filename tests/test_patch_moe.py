"""patch() on tiny HF MoE models (random weights, offline) and on python_ref's top-k selectors."""

import pytest
import torch

import vlmkernels
from python_ref import fusion
from tests.helpers import assert_close

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              max_position_embeddings=64)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=6,
                                            num_experts_per_tok=2))


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=24, num_experts=8,
                                              num_experts_per_tok=3, norm_topk_prob=False))


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=40,
                                              moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                              norm_topk_prob=True))


def _olmoe():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return OlmoeForCausalLM(OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4, num_experts_per_tok=2))


def _deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(
        **COMMON, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16))


def _qwen3_vl_moe_text():
    from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextModel

    return Qwen3VLMoeTextModel(Qwen3VLMoeTextConfig(**COMMON, head_dim=16, intermediate_size=40,
                                                    moe_intermediate_size=16, num_experts=8,
                                                    num_experts_per_tok=2))


def _glm4_moe():
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    return Glm4MoeForCausalLM(Glm4MoeConfig(**COMMON, head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                            n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                                            first_k_dense_replace=0))


def _glm4v_moe_text():
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextModel

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
    return Glm4vMoeTextModel(Glm4vMoeTextConfig(**COMMON, head_dim=16, intermediate_size=40, moe_intermediate_size=16,
                                                n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                                                first_k_dense_replace=1, rope_parameters=rope))


MODELS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
          "deepseek_v3": _deepseek_v3, "qwen3_vl_moe_text": _qwen3_vl_moe_text, "glm4_moe": _glm4_moe,
          "glm4v_moe_text": _glm4v_moe_text}


def build(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    with torch.no_grad():  # spread router logits so that no two experts tie in bf16
        for mod in model.modules():
            if type(mod).__name__.endswith(("TopKRouter", "TopkRouter")):
                mod.weight.normal_(0, 1.0)
                if hasattr(mod, "e_score_correction_bias"):
                    mod.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model.to(dtype)


def run(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def token_ids(n=9):
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(7))


def expected_paths(model):
    names = [p for p, m in model.named_modules()
             if type(m).__name__.endswith(("Router", "TopkRouter", "Experts")) and "MLP" not in type(m).__name__]
    return sorted(names)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_logits_match(name, dtype):
    # "reference": on CPU, backend="auto" keeps HF's experts forward (test_auto_cpu_experts_keep_hf_forward)
    model = build(name, dtype)
    ids = token_ids()
    want = run(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = vlmkernels.patch(model, families=["moe"], backend="reference")
    assert sorted(report.paths("moe")) == expected_paths(model) and not report.skipped, str(report)
    assert {e.rule for e in report.patched} == {"hf_router", "hf_experts"}
    got = run(model, ids)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = want.abs().max().item()
    assert_close(got, want, atol=rtol * scale, rtol=rtol, msg=f"{name} {dtype}")
    assert vlmkernels.unpatch(model) == len(report.patched)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(run(model, ids), want)  # unpatched: bit-for-bit the original


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_router_outputs_keep_hf_dtypes_and_values(backend):
    """A router patched alone (its experts left to HF) keeps HF's dtypes, int64 ids included."""
    for name in ("mixtral", "qwen3_moe", "deepseek_v3"):
        model = build(name, torch.bfloat16)
        router = next(m for m in model.modules() if type(m).__name__.endswith(("TopKRouter", "TopkRouter")))
        x = torch.randn(5, 32, dtype=torch.bfloat16)
        logits0, w0, i0 = router(x)
        report = vlmkernels.patch(router, families=["moe"], backend=backend)  # auto on CPU keeps HF's forward
        assert report.paths() == [""], str(report)
        logits1, w1, i1 = router(x)
        assert (logits1.dtype, w1.dtype, i1.dtype) == (logits0.dtype, w0.dtype, i0.dtype), name
        assert torch.equal(logits1, logits0)
        # same experts per row (HF's DeepSeek order is unsorted): compare after sorting by id
        o0, o1 = i0.sort(-1), i1.sort(-1)
        assert torch.equal(o0.values, o1.values), name
        assert_close(w1.gather(1, o1.indices), w0.gather(1, o0.indices), msg=name)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_blocks_keep_int32_ids(monkeypatch, name, backend):
    """Router -> experts in a patched block: moe_topk_route's int32 ids reach fused_moe as they are
    (no int32 -> int64 -> int32 round trip)."""
    import vlmkernels.ops as vops

    seen = []
    real = vops.fused_moe
    monkeypatch.setattr(vops, "fused_moe", lambda h, gu, dn, w, ids, **k: seen.append(ids.dtype)
                        or real(h, gu, dn, w, ids, **k))
    model = build(name)
    ids = token_ids(5)
    want = run(model, ids)
    vlmkernels.patch(model, families=["moe"], backend=backend)
    assert_close(run(model, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert seen and set(seen) == {torch.int32}


def test_router_with_unpatched_experts_hands_on_int64_ids():
    """Experts left to HF (here: a layout fused_moe lacks) get int64 ids: HF's eager path one-hots them."""
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True
    model.config._experts_implementation = "eager"
    ids = token_ids(5)
    want = run(model, ids)
    for _ in range(2):  # the second call finds everything patched already
        report = vlmkernels.patch(model, families=["moe"], backend="reference")
        assert "model.layers.0.mlp.experts" in {e.path for e in report.skipped}
    got_ids = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, a, out: got_ids.append(out[2].dtype))
    assert_close(run(model, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert got_ids == [torch.int64, torch.int32]
    vlmkernels.unpatch(model)
    vlmkernels.patch(model.model.layers[1].mlp.gate, families=["moe"], backend="reference")
    got_ids.clear()
    assert_close(run(model, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert got_ids == [torch.int64, torch.int64]  # a router patched alone: its experts are HF's


def test_triton_backend_patched_mixtral():
    model = build("mixtral")
    ids = token_ids(5)
    want = run(model, ids)
    vlmkernels.patch(model, families=["moe"], backend="triton")
    assert_close(run(model, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_compile_fullgraph_patched_qwen3_moe():
    model = build("qwen3_moe")
    ids = token_ids(6)
    want = run(model, ids)
    vlmkernels.patch(model, families=["moe"], backend="reference")
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert_close(run(compiled, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_experts_interface_registered_and_selectable():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    import vlmkernels.patching.moe  # noqa: F401  (registers on import)

    assert "vlmkernels" in ALL_EXPERTS_FUNCTIONS
    model = build("olmoe")
    ids = token_ids()
    want = run(model, ids)
    before = model.config._experts_implementation
    other = build("olmoe")
    model.set_experts_implementation("vlmkernels")
    assert_close(run(model, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    vlmkernels.patch(other, families=["moe"])
    assert other.config._experts_implementation == before  # patch() flips no model's implementation


def test_unsupported_experts_are_skipped_not_broken():
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True
    report = vlmkernels.patch(model, families=["moe"])
    skipped = {e.path: e.reason for e in report.skipped}
    assert "has_bias" in skipped["model.layers.0.mlp.experts"]
    assert "model.layers.1.mlp.experts" in report.paths()


def test_unknown_activation_is_skipped():
    model = build("qwen3_moe")
    model.model.layers[1].mlp.experts.act_fn = torch.nn.ReLU()
    report = vlmkernels.patch(model, families=["moe"])
    assert "not fused" in {e.path: e.reason for e in report.skipped}["model.layers.1.mlp.experts"]


def test_patched_experts_training_mode_gets_gradients():
    model = build("mixtral").train()
    twin = build("mixtral").train()
    twin.load_state_dict(model.state_dict())
    vlmkernels.patch(model, families=["moe"], backend="reference")
    for m in (model, twin):
        m(input_ids=token_ids(4), labels=token_ids(4)).loss.backward()
    for name in ("gate_up_proj", "down_proj"):
        got = getattr(model.model.layers[0].mlp.experts, name).grad
        want = getattr(twin.model.layers[0].mlp.experts, name).grad
        assert got is not None and got.abs().sum() > 0
        assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4, msg=name)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_auto_cpu_keeps_hf_forwards(monkeypatch, name):
    """backend="auto" on CPU tensors: routers and experts are patched but run HF's own forwards (no
    vlmkernels op is called; training included); a forced backend runs the ops."""
    import vlmkernels.ops as vops

    calls = []
    for op in ("fused_moe", "moe_topk_route"):
        real = getattr(vops, op)
        monkeypatch.setattr(vops, op, lambda *a, _op=op, _real=real, **k: calls.append((_op, k["backend"]))
                            or _real(*a, **k))
    model = build(name)
    ids = token_ids(5)
    want = run(model, ids)
    report = vlmkernels.patch(model, families=["moe"])
    assert {e.rule for e in report.patched} == {"hf_router", "hf_experts"}
    assert torch.equal(run(model, ids), want)
    model.train()(input_ids=ids, labels=ids).loss.backward()
    assert calls == []
    vlmkernels.unpatch(model)
    vlmkernels.patch(model.eval(), families=["moe"], backend="reference")
    assert_close(run(model, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert set(calls) == {("fused_moe", "reference"), ("moe_topk_route", "reference")}


# ---- python_ref -------------------------------------------------------------------------------------

def test_topk_token_selector_rule():
    sel = fusion.TopKTokenSelector(5)
    scores = torch.randn(3, 11)
    scores[0, 2] = scores[0, 7]  # a tie: lowest index first
    tokens = torch.randn(3, 11, 8, requires_grad=True)
    want_sel, want_idx = sel(scores, tokens)
    report = vlmkernels.patch(sel, families=["moe"])
    assert report.paths() == [""]
    got_sel, got_idx = sel(scores, tokens)
    assert got_idx.dtype == want_idx.dtype and torch.equal(got_idx, want_idx)
    assert_close(got_sel, want_sel)
    got_sel.sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() == 3 * 5 * 8
    with pytest.raises(ValueError):
        sel(torch.randn(2, 4), torch.randn(2, 4, 8))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_expert_router_rule(top_k):
    torch.manual_seed(3)
    router = fusion.ExpertRouter(12, 4, top_k=top_k)
    feats = torch.randn(6, 12)
    image_type = torch.tensor([-1, 2, -1, 0, 3, -1])
    want, want_forced = router(feats), router(feats, image_type)
    report = vlmkernels.patch(router, families=["moe"])
    assert report.paths() == [""]
    assert_close(router(feats), want)
    assert_close(router(feats, image_type), want_forced)
    assert ((router(feats) > 0).sum(-1) == top_k).all()
    with pytest.raises(ValueError, match="image_type"):
        router(feats, torch.tensor([0, 0, 0, 0, 0, 9]))


def test_dense_expert_router_is_skipped():
    router = fusion.ExpertRouter(12, 4, top_k=None)
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(router, families=["moe"])
    assert report.skipped and "dense" in report.skipped[0].reason


@pytest.mark.parametrize("name,kwargs,path,rule", [
    ("dynamic_qformer", {}, "selector", "topk_token_selector"),
    ("leo", {"top_k": 2}, "router", "expert_router"),
    ("dynamic_vision_selector", {"top_k": 2}, "router", "expert_router"),
])
def test_python_ref_architectures(name, kwargs, path, rule):
    import python_ref

    model = python_ref.build(name, "tiny", **kwargs).eval()
    inputs = python_ref.example_inputs(name, batch_size=2, seed=0)
    with torch.no_grad():
        want = model(**inputs).logits
    report = vlmkernels.patch(model, families=["moe"])
    assert report.paths() == [path] and [e.rule for e in report.patched] == [rule], str(report)
    with torch.no_grad():
        got = model(**inputs).logits
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5, msg=name)


def test_forced_backend_without_an_implementation_skips_the_module():
    model = build("mixtral")
    ids = token_ids(5)
    want = run(model, ids)
    report = vlmkernels.patch(model, families=["moe"], backend="cpu")  # fused_moe has no C++ CPU kernel
    skipped = {e.path: e.reason for e in report.skipped}
    assert "fused_moe has no cpu implementation" in skipped["model.layers.0.mlp.experts"]
    assert "model.layers.0.mlp.gate" in report.paths()
    assert_close(run(model, ids), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_cuda_patched_logits_match_bf16(name):
    model = build(name, torch.bfloat16).cuda()
    ids = token_ids(33).cuda()
    want = run(model, ids)
    report = vlmkernels.patch(model, families=["moe"])
    assert not report.skipped, str(report)
    got = run(model, ids)
    assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2, msg=name)
