"""patch() with the gated_fusion rules on python_ref's multi-encoder models and HF LLaVA projectors:
logits and gradients match the unpatched model (forced backends), auto on CPU keeps the original code,
unpatch restores, copies stay patched, and the report says what was patched and what was skipped."""

import copy
import pickle

import pytest
import torch
from torch import nn

import python_ref
import vlmkernels
import vlmkernels.ops as vops
from python_ref import fusion
from tests.helpers import assert_close, loss_grads
from vlmkernels.patching import patch_info

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = ["gated_fusion"]
OPS = ("gated_fusion", "expert_mix", "vision_router", "concat_linear", "split_linear", "mlp_projector")

# name -> (python_ref architecture, builder kwargs, {patched path: rule}, {skipped path: reason fragment},
#          the ops the patched model calls)
ROUTED = {"": "leo", "router": "vision_router"}
MGF = {"multi_granularity_fusion": "multi_granularity_fusion"}
HF_PROJ = {"model.multi_modal_projector": "hf_mlp_projector"}
MODELS = {
    "minigpt5": ("minigpt5", {}, {"gate": "sigmoid_gate"}, {}, {"gated_fusion"}),
    "minigpt5_gmu": ("minigpt5", {"gate_variant": "gmu"}, {"gate": "sigmoid_gate"}, {}, {"gated_fusion"}),
    "leo": ("leo", {}, ROUTED, {"mix": "weighted sum"}, {"expert_mix", "vision_router", "mlp_projector"}),
    "leo_topk": ("leo", {"top_k": 2}, ROUTED, {"mix": "weighted sum"}, {"expert_mix", "vision_router", "mlp_projector"}),
    "leo_published": ("leo", {"variant": "published"}, {"": "leo"}, {}, {"split_linear"}),
    "florence_vl": ("florence_vl", {}, MGF, {}, {"concat_linear"}),
    "florence_vl_dbfusion": ("florence_vl", {"fusion_variant": "dbfusion"}, MGF, {}, {"concat_linear", "mlp_projector"}),
    # Florence-2 features under 3 task prompts (4 streams) into DBFusion
    "florence_vl_published": ("florence_vl", {"variant": "published"}, MGF, {}, {"concat_linear", "mlp_projector"}),
    "dynamic_vision_selector": ("dynamic_vision_selector", {}, {"router": "vision_router"}, {"mix": "N times"},
                                {"vision_router"}),
    "dynamic_vision_selector_topk": ("dynamic_vision_selector", {"top_k": 2}, {"router": "vision_router"},
                                     {"mix": "N times"}, {"vision_router"}),
    "llava_v15": ("llava_v15", {}, HF_PROJ, {}, {"mlp_projector"}),
    "llava_next": ("llava_next", {}, HF_PROJ, {}, {"mlp_projector"}),
    "llava_onevision": ("llava_onevision", {}, HF_PROJ, {}, {"mlp_projector"}),
}
# one small model per op under the Triton interpreter
TRITON_MODELS = ("minigpt5", "minigpt5_gmu", "leo_topk", "leo_published", "florence_vl_dbfusion", "llava_v15")


def build(name, seed=0):
    arch, kwargs = MODELS[name][:2]
    torch.manual_seed(seed)
    model = python_ref.build(arch, "tiny", **kwargs).eval()
    return model, python_ref.example_inputs(arch, batch_size=2, seed=1, model=model)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def op_calls(monkeypatch):
    """Records (op, backend) for every gated_fusion op a patched forward calls."""
    calls = []
    for op in OPS:
        real = getattr(vops, op)
        monkeypatch.setattr(vops, op, lambda *a, _op=op, _real=real, **k: calls.append((_op, k.get("backend")))
                            or _real(*a, **k))
    return calls


def _check_report(report, name, backend):
    patched, skipped = MODELS[name][2:4]
    got = {e.path: e.rule for e in report.patched}
    assert got == patched and all(e.family == "gated_fusion" and e.backend == backend for e in report.patched), \
        str(report)
    reasons = {e.path: e.reason for e in report.skipped}
    assert reasons.keys() == skipped.keys(), str(report)
    for path, fragment in skipped.items():
        assert fragment in reasons[path], str(report)


def _parity(name, backend, op_calls):
    """Patched vs unpatched logits and loss gradients; returns (patched model, inputs, report, logits)."""
    model, inputs = build(name)
    twin = copy.deepcopy(model)
    want = logits(model, inputs)
    want_grads = loss_grads(twin, inputs)
    report = vlmkernels.patch(model, families=FAMILY, backend=backend)
    _check_report(report, name, backend)
    got = logits(model, inputs)
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4, msg=name)
    assert {op for op, _ in op_calls} == MODELS[name][4] and {b for _, b in op_calls} == {backend}
    grads = loss_grads(model, inputs)
    for pname, g in want_grads.items():
        if g is None:
            assert grads[pname] is None, pname
            continue
        assert_close(grads[pname], g, atol=1e-5 * g.abs().max().item() + 1e-7, rtol=1e-4, msg=f"{name} {pname}")
    return model, inputs, report, want


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_matches_reference_backend(name, op_calls):
    model, inputs, report, want = _parity(name, "reference", op_calls)
    assert vlmkernels.unpatch(model) == len(report.patched)
    leftover = [(p, k) for p, m in model.named_modules() for k in ("forward", "_encode_document", "_encode_published")
                if k in m.__dict__]
    assert not leftover
    assert torch.equal(logits(model, inputs), want), "unpatched: bit for bit the original"


@pytest.mark.parametrize("name", TRITON_MODELS)
def test_patched_model_matches_triton_backend(name, op_calls):
    _parity(name, "triton", op_calls)


@pytest.mark.parametrize("name", ["leo_topk", "florence_vl", "minigpt5_gmu", "llava_next"])
def test_auto_on_cpu_keeps_the_original_code(name, op_calls):
    model, inputs = build(name)
    twin = copy.deepcopy(model)
    want, want_grads = logits(model, inputs), loss_grads(twin, inputs)
    report = vlmkernels.patch(model, families=FAMILY)
    _check_report(report, name, "auto")
    assert torch.equal(logits(model, inputs), want)
    grads = loss_grads(model, inputs)
    assert all(g is None and grads[k] is None or torch.equal(grads[k], g) for k, g in want_grads.items())
    assert op_calls == []


def test_autocast_runs_the_original_code(op_calls):
    model, inputs = build("florence_vl")
    want = logits(model, inputs)
    vlmkernels.patch(model, families=FAMILY, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = logits(model, inputs)
    assert op_calls == [] and got.dtype == torch.bfloat16
    assert_close(got.float(), want, atol=0.1 * want.abs().max().item(), rtol=0.1)


def _infos(model):
    return {p: patch_info(m) for p, m in model.named_modules() if patch_info(m) is not None}


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["leo_published", "minigpt5_gmu", "dynamic_vision_selector_topk"])
def test_copies_stay_patched(name, how, op_calls):
    model, inputs = build(name)
    vlmkernels.patch(model, families=FAMILY, backend="reference")
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert _infos(clone) == _infos(model) and _infos(clone)
    torch.testing.assert_close(logits(clone, inputs), logits(model, inputs), rtol=0, atol=0)
    n = len(op_calls)
    logits(clone, inputs)
    assert len(op_calls) > n, "the copy must run the patched code"
    assert vlmkernels.unpatch(clone) == len(_infos(model))
    assert _infos(clone) == {} and _infos(model)


# ---- the router rule and the MoE family ------------------------------------------------------------

@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_expert_router_dense_and_top_k(top_k, op_calls):
    router = fusion.ExpertRouter(13, 4, hidden=7, top_k=top_k).double()
    feats = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    image_type = torch.tensor([-1, 2, -1, 0, 3, -1])
    twin = copy.deepcopy(router)
    want, want_forced = twin(feats, None), twin(feats, image_type)
    report = vlmkernels.patch(router, backend="reference")  # every family: vision_router outranks moe's rule
    assert [(e.family, e.rule) for e in report.patched] == [("gated_fusion", "vision_router")], str(report)
    got, got_forced = router(feats), router(feats, image_type)
    assert got.dtype == want.dtype
    assert_close(got, want)
    assert_close(got_forced, want_forced)
    probe = torch.randn(6, 4, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * probe).sum(), feats)
    (g_want,) = torch.autograd.grad((want * probe).sum(), feats)
    assert_close(g_got, g_want)
    with pytest.raises(ValueError, match="image_type"):
        router(feats, torch.tensor([0, 0, 0, 0, 0, 9]))


def test_moe_family_alone_keeps_its_top_k_router_rule():
    router = fusion.ExpertRouter(12, 4, top_k=2)
    report = vlmkernels.patch(router, families=["moe"], backend="reference")
    assert [(e.family, e.rule) for e in report.patched] == [("moe", "expert_router")]


# ---- HF LLaVA projectors -------------------------------------------------------------------------

def _llava(act="gelu", feature_layer=-2, bias=True):
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=28, patch_size=7),
        text_config=transformers.LlamaConfig(hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=96),
        image_token_index=90, projector_hidden_act=act, vision_feature_layer=feature_layer,
        multimodal_projector_bias=bias,
    )
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def _llava_inputs(model, batch=2):
    n = (28 // 7) ** 2
    ids = torch.cat([torch.full((batch, n), 90), torch.randint(0, 80, (batch, 5))], dim=1)
    return dict(input_ids=ids, pixel_values=torch.randn(batch, 3, 28, 28), labels=ids)


@pytest.mark.parametrize("act,feature_layer,bias", [
    ("gelu", -2, True), ("gelu_pytorch_tanh", [-2, -1], True), ("gelu", [-1, -2], False), ("gelu_new", -1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_llava_projector(act, feature_layer, bias, dtype, op_calls):
    model = _llava(act, feature_layer, bias).to(dtype)
    twin = copy.deepcopy(model)
    inputs = _llava_inputs(model)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    report = vlmkernels.patch(model, families=FAMILY, backend="reference")
    assert report.paths() == ["model.multi_modal_projector"] and not report.skipped, str(report)
    out, want = model(**inputs), twin(**inputs)
    atol, rtol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)
    assert_close(out.logits, want.logits, atol=atol * want.logits.abs().max().item(), rtol=rtol)
    out.loss.backward()
    want.loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        if q.grad is not None and "multi_modal_projector" in name:
            assert_close(p.grad, q.grad, atol=atol * q.grad.abs().max().item() + 1e-7, rtol=rtol, msg=name)
    assert set(op_calls) == {("mlp_projector", "reference")}


@pytest.mark.parametrize("act", ["silu", "quick_gelu", "relu"])
def test_hf_llava_projector_unfused_activation_is_skipped(act):
    model = _llava(act)
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(model, families=FAMILY, backend="reference")
    (entry,) = report.skipped
    assert entry.path == "model.multi_modal_projector" and "is not fused" in entry.reason


def test_hf_projector_with_a_custom_forward_is_not_matched():
    model = _llava()
    proj = model.model.multi_modal_projector
    custom = type("LlavaMultiModalProjector", (type(proj),), {"forward": lambda self, x: self.linear_2(x)})
    custom.__module__ = "my_models"
    proj.__class__ = custom
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(model, families=FAMILY)
    assert not report.skipped


def test_compiled_patched_projector_fullgraph():
    proj = _llava().model.multi_modal_projector
    x = torch.randn(2, 9, 24)
    want = proj(x)
    vlmkernels.patch(proj, families=FAMILY, backend="reference")
    compiled = torch.compile(proj, fullgraph=True, backend="eager")
    assert_close(compiled(x), want)


# ---- structure the rules refuse -------------------------------------------------------------------

def test_unsupported_projector_layer_is_skipped_with_the_reason():
    mgf = fusion.MultiGranularityFusion([6, 5], 8, variant="dbfusion")
    mgf.proj[1] = nn.SiLU()
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(mgf, families=FAMILY, backend="reference")
    assert "layer 1 (SiLU)" in report.skipped[0].reason


def test_patched_multi_granularity_fusion_checks_feature_widths():
    mgf = fusion.MultiGranularityFusion([6, 5], 8)
    vlmkernels.patch(mgf, families=FAMILY, backend="reference")
    with pytest.raises(ValueError, match="widths"):
        mgf(torch.randn(2, 3, 5), torch.randn(2, 3, 6))
    out = mgf(torch.randn(2, 3, 6), torch.randn(2, 3, 5))
    assert out.shape == (2, 3, 8)


# ---- the fusion modules on their own: both dtypes, both backends, gradients to inputs and weights ----

FUSION_MODULES = {
    "sigmoid_gate": (lambda: fusion.SigmoidGate(13, 13), [(2, 7, 13), (2, 7, 13)]),
    "sigmoid_gate_gmu": (lambda: fusion.SigmoidGate(11, 5, out_dim=7, variant="gmu"), [(2, 3, 11), (2, 3, 5)]),
    "mgf_document": (lambda: fusion.MultiGranularityFusion([6, 5, 7], 9), [(2, 5, 6), (2, 5, 5), (2, 5, 7)]),
    "mgf_dbfusion": (lambda: fusion.MultiGranularityFusion([6, 5], 9, variant="dbfusion"), [(3, 4, 6), (3, 4, 5)]),
    "router_top_k": (lambda: fusion.ExpertRouter(13, 5, hidden=7, top_k=2), [(6, 13)]),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(FUSION_MODULES))
def test_fusion_module_forward_and_backward(name, dtype, backend):
    make, shapes = FUSION_MODULES[name]
    module = make().to(dtype)
    twin = copy.deepcopy(module)
    inputs = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    report = vlmkernels.patch(module, families=FAMILY, backend=backend)
    assert report.paths() == [""], str(report)
    outs = [m(*inputs) for m in (module, twin)]
    got, want = outs
    assert got.dtype == want.dtype == dtype
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    assert_close(got, want, atol=atol * want.abs().max().item(), rtol=rtol, msg=name)
    probe = torch.randn_like(want)
    grads = [torch.autograd.grad((o.float() * probe.float()).sum(), [*inputs, *m.parameters()], allow_unused=True)
             for o, m in zip(outs, (module, twin))]
    for i, (g, w) in enumerate(zip(*grads)):
        if w is None:
            assert g is None or not g.any(), f"{name}: gradient {i}"
            continue
        assert_close(g, w, atol=(1e-5 if dtype == torch.float32 else 3e-2) * w.abs().max().item() + 1e-7,
                     rtol=rtol, msg=f"{name}: gradient {i}")


def test_fusion_modules_inside_any_model_are_picked_up():
    class TwoTower(nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse = fusion.SigmoidGate(8, 8)
            self.route = fusion.ExpertRouter(8, 3)
            self.project = fusion.MultiGranularityFusion([8, 8], 6, variant="dbfusion")

        def forward(self, a, b):
            fused = self.fuse(a, b)
            w = self.route(fused.mean(1))
            return self.project(fused, a * w[:, :1, None])

    model = TwoTower()
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    want = model(a, b)
    report = vlmkernels.patch(model, families=FAMILY, backend="reference")
    assert {e.path: e.rule for e in report.patched} == {
        "fuse": "sigmoid_gate", "route": "vision_router", "project": "multi_granularity_fusion"}, str(report)
    assert_close(model(a, b), want)


def test_too_many_streams_for_one_launch_are_skipped():
    mgf = fusion.MultiGranularityFusion([4] * 6, 8)
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(mgf, families=FAMILY, backend="reference")
    assert "6 feature streams" in report.skipped[0].reason


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["minigpt5_gmu", "leo_topk", "leo_published", "florence_vl_dbfusion", "llava_next"])
def test_cuda_patched_model_matches_bf16(name):
    model, inputs = build(name)
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in inputs.items()}
    want = logits(model, inputs)
    report = vlmkernels.patch(model, families=FAMILY)
    _check_report(report, name, "auto")
    got = logits(model, inputs)
    assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=3e-2, msg=name)


def test_patched_modules_name_the_bad_argument():
    gate, router = fusion.SigmoidGate(4, 4), fusion.ExpertRouter(5, 3)
    vlmkernels.patch(gate, families=FAMILY, backend="reference")
    vlmkernels.patch(router, families=FAMILY, backend="reference")
    with pytest.raises(ValueError, match="equal leading dims"):
        gate(torch.randn(2, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="b must have dtype"):
        gate(torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="pooled must be 2-D"):
        router(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="image_type"):
        router(torch.randn(2, 5), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("arch", ["llava", "llava_next", "llava_next_video", "llava_onevision"])
def test_every_hf_llava_projector_class_is_patched(arch):
    import importlib

    from vlmkernels.patching.gated_fusion import HF_PROJECTORS

    modeling = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    (cls,) = [getattr(modeling, n) for n in HF_PROJECTORS if hasattr(modeling, n)]
    config_cls = cls.__init__.__annotations__.get("config")
    config_cls = getattr(modeling, config_cls) if isinstance(config_cls, str) else config_cls
    cfg = config_cls(vision_config=transformers.CLIPVisionConfig(hidden_size=12, num_attention_heads=2),
                     text_config=transformers.LlamaConfig(hidden_size=20, num_attention_heads=2, num_key_value_heads=2),
                     vision_feature_layer=[-3, -1])
    torch.manual_seed(0)
    proj = cls(cfg)
    x = torch.randn(2, 7, 24, requires_grad=True)
    want = proj(x)
    report = vlmkernels.patch(proj, families=FAMILY, backend="triton")
    assert [e.rule for e in report.patched] == ["hf_mlp_projector"], str(report)
    got = proj(x)
    assert_close(got, want)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    assert_close(gx, wx)


def test_linear_subclasses_are_skipped_not_read():
    """A subclass of nn.Linear (e.g. a quantized layer) may hold weights the ops cannot read."""
    model = _llava()
    lin = model.model.multi_modal_projector.linear_1
    lin.__class__ = type("QuantLinear", (nn.Linear,), {})
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(model, families=FAMILY, backend="reference")
    assert "not nn.Linear" in report.skipped[0].reason


def test_every_family_together():
    """The default patch(): the gated_fusion rules beside the other families' (CLIP embeddings, Q-Former)."""
    model, inputs = build("minigpt5_gmu")
    want = logits(model, inputs)
    report = vlmkernels.patch(model, backend="reference")
    assert {"gated_fusion", "qformer"} <= {e.family for e in report.patched}, str(report)
    assert report.paths("gated_fusion") == ["gate"]
    assert_close(logits(model, inputs), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)
