"""patch() on Q-Formers: tiny HF BLIP-2 / InstructBLIP / InstructBLIP-Video (random weights, offline),
python_ref's Q-Former systems and Gemini's masked attention.

On CPU ``backend="auto"`` keeps HF's code (checked here), so parity runs forced backends:
``"reference"`` everywhere and ``"triton"`` (interpreter) on one small model.
"""

import copy
import io
import pickle

import pytest
import torch

import vlmkernels
import vlmkernels.patching.qformer as qformer_rules
from tests.helpers import assert_close, loss_grads
from vlmkernels.patching import patch_info

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, image_size=28,
              patch_size=14)
# 3 layers with cross-attention every 2nd: layers 0 and 2 cross, layer 1 self-attention only
QFORMER = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, vocab_size=100,
               max_position_embeddings=64, cross_attention_frequency=2)
NUM_QUERIES = 5
INSTRUCTION = 7


def _text_config():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=32).to_dict()


def _config(cls, dropout: float):
    q = dict(QFORMER, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return cls(vision_config=VISION, qformer_config=q, text_config=_text_config(), num_query_tokens=NUM_QUERIES)


def _blip2(dropout=0.0):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration(_config(Blip2Config, dropout))


def _instructblip(dropout=0.0):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    return InstructBlipForConditionalGeneration(_config(InstructBlipConfig, dropout))


def _instructblip_video(dropout=0.0):
    from transformers import InstructBlipVideoConfig, InstructBlipVideoForConditionalGeneration

    return InstructBlipVideoForConditionalGeneration(_config(InstructBlipVideoConfig, dropout))


def _instruction(batch):
    """Token ids and a mask whose second row is padded (InstructBLIP's padded instruction)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, QFORMER["vocab_size"], (batch, INSTRUCTION), generator=g)
    mask = torch.ones(batch, INSTRUCTION, dtype=torch.long)
    mask[1, INSTRUCTION - 3:] = 0
    return ids, mask


def _pixels(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def _blip2_features(m, dtype):
    return m.get_image_features(_pixels((2, 3, 28, 28), dtype)).pooler_output


def _instructblip_features(m, dtype):
    return m.get_image_features(_pixels((2, 3, 28, 28), dtype), *_instruction(2)).pooler_output


def _video_features(m, dtype):
    return m.get_video_features(_pixels((2, 3, 3, 28, 28), dtype), *_instruction(2)).pooler_output


HF = {"blip2": (_blip2, _blip2_features), "instructblip": (_instructblip, _instructblip_features),
      "instructblip_video": (_instructblip_video, _video_features)}


def _build(name, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    model = HF[name][0](dropout)
    with torch.no_grad():  # HF initializes the queries to zeros: identical rows give degenerate gradients
        model.query_tokens.normal_(0, 1.0)
    return model.to(dtype).eval()


def _features(name, model, dtype=torch.float32):
    return HF[name][1](model, dtype)


def _close(got, want, rel, msg=""):
    assert got.dtype == want.dtype, f"{msg}: dtype {got.dtype} != {want.dtype}"
    assert_close(got, want, atol=rel * want.abs().max().item(), rtol=rel, msg=msg)


def _close_grads(got: dict, want: dict, msg: str, rel: float = 1e-4, floor: float = 1e-6) -> None:
    """Each gradient within ``rel`` of its own scale, plus ``floor`` of the largest gradient anywhere:
    the attention key biases' exact gradient is zero (softmax ignores a per-row constant), so theirs
    is rounding noise on both sides."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    floor = floor * max(g.abs().max().item() for g in want.values() if g is not None)
    for n, g in want.items():
        if g is None:
            assert got[n] is None, f"{msg}: {n} got a gradient"
            continue
        assert got[n] is not None and got[n].dtype == g.dtype, f"{msg}: {n}"
        assert_close(got[n], g, atol=rel * g.abs().max().item() + floor, rtol=rel, msg=f"{msg} grad {n}")


def _patch(model, backend="reference", **kw):
    report = vlmkernels.patch(model, families=["qformer"], backend=backend, **kw)
    assert report.paths() == ["qformer"] and not report.skipped, str(report)
    return report


def _qformer_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()
            if n.startswith(("qformer.", "query_tokens")) and p.grad is not None}


def _train_step(name, model, weight):
    model.zero_grad(set_to_none=True)
    feats = _features(name, model)
    (feats * weight).sum().backward()
    return feats.detach(), _qformer_grads(model)


# ---- HF models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_hf_image_features_match(name, dtype, rel):
    model = _build(name, dtype)
    with torch.no_grad():
        want = _features(name, model, dtype)
        _patch(model)
        got = _features(name, model, dtype)
        _close(got, want, rel, f"{name} {dtype}")
        assert vlmkernels.unpatch(model) == 1
        assert torch.equal(_features(name, model, dtype), want)  # unpatched: HF's code again


@pytest.mark.parametrize("name,backend", [(n, "reference") for n in HF] + [("instructblip", "triton")])
def test_hf_training_step_gradients_match(name, backend):
    model = _build(name).train()  # dropout 0: an exact comparison
    ref = copy.deepcopy(model)
    weight = torch.randn(_features(name, model).shape, generator=torch.Generator().manual_seed(5))
    want_out, want = _train_step(name, ref, weight)
    _patch(model, backend=backend)
    got_out, got = _train_step(name, model, weight)
    _close(got_out, want_out, 1e-5, name)
    names = {n for n, p in model.named_parameters() if n.startswith(("qformer.", "query_tokens"))}
    assert set(want) == set(got) == names, sorted(names ^ set(got))  # every Q-Former parameter gets one
    _close_grads(got, want, name)


@pytest.mark.parametrize("name", ["blip2", "instructblip"])
def test_hf_training_with_dropout_runs_and_reproduces(name):
    model = _build(name, dropout=0.3).train()
    _patch(model)
    weight = torch.randn(_features(name, model).shape, generator=torch.Generator().manual_seed(5))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(_train_step(name, model, weight))
    (out0, g0), (out1, g1) = runs
    assert torch.isfinite(out0).all() and all(torch.isfinite(g).all() for g in g0.values())
    assert torch.equal(out0, out1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    with torch.no_grad():
        eval_out = _features(name, model.eval())
    assert not torch.allclose(out0, eval_out), "dropout had no effect in training mode"


def test_hf_gradient_checkpointing_is_honored():
    name = "instructblip"
    model = _build(name).train()
    model.activation_checkpointing_enable()
    ref = copy.deepcopy(model)
    weight = torch.randn(_features(name, model).shape, generator=torch.Generator().manual_seed(5))
    _, want = _train_step(name, ref, weight)
    _patch(model)
    calls = []
    for layer in model.qformer.encoder.layer:
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda fn, *a, func=func: calls.append(1) or func(fn, *a)
    _, got = _train_step(name, model, weight)
    assert len(calls) == QFORMER["num_hidden_layers"]
    _close_grads(got, want, "checkpointed")


def test_auto_on_cpu_keeps_hf_code(monkeypatch):
    model = _build("instructblip")
    with torch.no_grad():
        want = _features("instructblip", model)
        report = _patch(model, backend="auto")
        assert patch_info(model.qformer)["backend"] == "auto" and "CPU" in report.patched[0].reason

        def boom(*a, **k):
            raise AssertionError("the patched encoder ran on CPU tensors under backend='auto'")

        monkeypatch.setattr(qformer_rules, "_encoder", boom)
        assert torch.equal(_features("instructblip", model), want)


def _qformer_call(model, **kw):
    """The Q-Former as BLIP-2's get_image_features calls it, on fixed query embeddings and states."""
    g = torch.Generator().manual_seed(9)
    q = model.query_tokens.expand(2, -1, -1)
    states = torch.randn(2, 5, VISION["hidden_size"], generator=g)
    return model.qformer(query_embeds=q, encoder_hidden_states=states,
                         encoder_attention_mask=torch.ones(2, 5, dtype=torch.long), **kw)


def test_output_attentions_runs_hf_and_matches():
    model = _build("blip2")
    model.qformer.config._attn_implementation = "eager"  # HF records attention weights on eager only
    with torch.no_grad():
        want = _qformer_call(model, output_attentions=True, output_hidden_states=True)
        report = _patch(model)
        assert "output_attentions" in report.patched[0].reason
        got = _qformer_call(model, output_attentions=True, output_hidden_states=True)
    assert got.attentions and len(got.cross_attentions) == 2
    assert len(got.hidden_states) == QFORMER["num_hidden_layers"] + 1
    for key in ("last_hidden_state", "pooler_output", "attentions", "cross_attentions", "hidden_states"):
        a, b = getattr(got, key), getattr(want, key)
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x, y), key


def test_output_contract():
    model = _build("blip2")
    with torch.no_grad():
        want = _qformer_call(model)
        tup_want = _qformer_call(model, return_dict=False)
        _patch(model)
        got = _qformer_call(model)
        tup = _qformer_call(model, return_dict=False)
    assert type(got) is type(want) and got.keys() == want.keys()
    _close(got.last_hidden_state, want.last_hidden_state, 1e-5)
    assert torch.equal(got.pooler_output, got.last_hidden_state[:, 0])
    assert isinstance(tup, tuple) and len(tup) == len(tup_want) == 2
    assert torch.equal(tup[0], got.last_hidden_state)


@pytest.mark.parametrize("query_length", [0, 3])
def test_text_rows_match(query_length):
    """BLIP-2's text paths through the Q-Former (use_qformer_text_input): query_length=0 (text only,
    every row takes the text FFN) and query rows followed by padded text rows (ITM)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    qf = Blip2QFormerModel(Blip2QFormerConfig(**QFORMER, encoder_hidden_size=48, use_qformer_text_input=True)).eval()
    x = torch.randn(3, 6, QFORMER["hidden_size"])
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0
    kw = dict(query_embeds=x, query_length=query_length, attention_mask=mask)
    if query_length:
        kw.update(encoder_hidden_states=torch.randn(3, 5, 48), encoder_attention_mask=torch.ones(3, 5))
    with torch.no_grad():
        want = qf(**kw).last_hidden_state
        vlmkernels.patch(qf, families=["qformer"], backend="reference")
        got = qf(**kw).last_hidden_state
    _close(got, want, 1e-5)


@pytest.mark.parametrize("name", ["blip2", "instructblip"])
def test_autocast_bf16(name):
    """Under autocast the kernels run in bf16 like HF's Linear layers; forward and gradients within 2e-2."""
    model = _build(name).train()
    ref = copy.deepcopy(model)
    weight = torch.randn(_features(name, model).shape, generator=torch.Generator().manual_seed(5))
    _patch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_out, want = _train_step(name, ref, weight)
        got_out, got = _train_step(name, model, weight)
    _close(got_out, want_out, 2e-2, "autocast")
    _close_grads(got, want, "autocast", rel=3e-2, floor=1e-3)


def test_cached_weights_follow_in_place_updates():
    """Frozen Q-Former under no_grad: the stacked weights are cached and rebuilt when a weight changes."""
    model = _build("blip2").requires_grad_(False)
    ref = copy.deepcopy(model)
    _patch(model)
    with torch.no_grad():
        _close(_features("blip2", model), _features("blip2", ref), 1e-5)
        for m in (model, ref):
            m.qformer.encoder.layer[2].crossattention.attention.value.weight.mul_(-2.0)
            m.qformer.encoder.layer[0].crossattention.attention.key.bias.add_(0.5)
            m.qformer.encoder.layer[1].attention.attention.value.weight.mul_(1.5)  # the stacked self q/k/v
        _close(_features("blip2", model), _features("blip2", ref), 1e-5, "after an in-place update")
        assert qformer_rules._CACHE.get(model.qformer) is not None


def _torch_roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": copy.deepcopy, "pickle": lambda o: pickle.loads(pickle.dumps(o)), "torch.save": _torch_roundtrip}


@pytest.mark.parametrize("how", list(COPIES))
def test_copies_stay_patched(how):
    model = _build("instructblip")
    ref = copy.deepcopy(model)
    _patch(model, precision="bf16")
    clone = COPIES[how](model)  # before the first forward: HF's output-capture hooks do not pickle
    assert patch_info(clone.qformer) == patch_info(model.qformer) == {
        "family": "qformer", "rule": "hf_qformer", "backend": "reference", "precision": "bf16"}
    fwd = clone.qformer.__dict__["forward"]
    assert fwd.__self__ is clone.qformer and fwd.__func__.__code__ is model.qformer.forward.__func__.__code__
    with torch.no_grad():
        got, want = _features("instructblip", clone), _features("instructblip", model)
        assert torch.equal(got, want)
        assert vlmkernels.unpatch(clone) == 1
        assert torch.equal(_features("instructblip", clone), _features("instructblip", ref))


@pytest.mark.parametrize("precision,rel", [(None, 1e-5), ("bf16", 2e-2)])
def test_compile_fullgraph_patched_qformer(precision, rel):
    model = _build("blip2")
    with torch.no_grad():
        want = _qformer_call(model).last_hidden_state
        _patch(model, precision=precision)
        torch._dynamo.reset()
        compiled = torch.compile(model.qformer, fullgraph=True, backend="aot_eager")
        g = torch.Generator().manual_seed(9)
        q = model.query_tokens.expand(2, -1, -1)
        states = torch.randn(2, 5, VISION["hidden_size"], generator=g)
        got = compiled(query_embeds=q, encoder_hidden_states=states,
                       encoder_attention_mask=torch.ones(2, 5, dtype=torch.long)).last_hidden_state
    _close(got, want, rel)


def test_compile_fullgraph_training_step():
    model = _build("blip2").train()
    ref = copy.deepcopy(model)
    _patch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model.qformer, fullgraph=True, backend="aot_eager")
    states = torch.randn(2, 5, VISION["hidden_size"], generator=torch.Generator().manual_seed(9))
    weight = torch.randn(2, NUM_QUERIES, QFORMER["hidden_size"], generator=torch.Generator().manual_seed(5))
    for m, fn in ((ref, ref.qformer), (model, compiled)):
        fn(query_embeds=m.query_tokens.expand(2, -1, -1), encoder_hidden_states=states).last_hidden_state \
            .mul(weight).sum().backward()
    _close_grads(_qformer_grads(model), _qformer_grads(ref), "compiled training step")


def test_fp16_loaded_blip2_keeps_an_fp32_qformer(tmp_path):
    from transformers import Blip2ForConditionalGeneration

    _build("blip2").save_pretrained(tmp_path)
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16).eval()
    assert model.qformer.layernorm.weight.dtype == torch.float32 and model.vision_model.dtype == torch.float16
    with torch.no_grad():
        want = _features("blip2", model, torch.float16)
        _patch(model)
        got = _features("blip2", model, torch.float16)
    _close(got, want, 2e-3, "fp16-loaded")  # the fp16 language projection rounds both alike


def test_precision_bf16():
    model = _build("blip2")
    with torch.no_grad():
        want = _qformer_call(model).last_hidden_state
        report = _patch(model, precision="bf16")
        assert "precision=bf16" in report.patched[0].reason
        got = _qformer_call(model).last_hidden_state
    assert got.dtype == torch.float32
    _close(got, want, 2e-2, "precision=bf16")
    assert not torch.equal(got, want)  # it really ran in bf16
    with pytest.raises(ValueError, match="precision"):
        vlmkernels.patch(model, precision="fp8")


def test_triton_backend_under_the_interpreter():
    model = _build("instructblip")
    with torch.no_grad():
        want = _features("instructblip", model)
        _patch(model, backend="triton")
        got = _features("instructblip", model)
    _close(got, want, 1e-5, "triton")


# ---- python_ref systems --------------------------------------------------------------------------

PYTHON_REF = {  # name -> modules the qformer family patches
    "blip2": ["model.qformer"], "instructblip": ["model.qformer"], "minigpt4": ["qformer"],
    "minigpt5": ["q_former"], "dynamic_qformer": ["q_former"],
    "gemini": ["layers.0.self_attn", "layers.0.cross_modal_attn"],
}


@pytest.mark.parametrize("name", list(PYTHON_REF))
def test_python_ref_systems_match(name):
    import python_ref

    torch.manual_seed(0)
    model = python_ref.build(name, "tiny").eval()
    inputs = python_ref.example_inputs(name, model=model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        want = ref(**inputs).logits
    want_grads = loss_grads(ref, inputs)
    report = vlmkernels.patch(model, families=["qformer"], backend="reference")
    paths = [p.replace("model.qformer", "qformer") for p in PYTHON_REF[name]]
    assert sorted(report.paths()) == sorted(p for p in PYTHON_REF[name] if p in dict(model.named_modules())) \
        or sorted(report.paths()) == sorted(paths), str(report)
    assert report.paths() and not report.skipped, str(report)
    with torch.no_grad():
        _close(model(**inputs).logits, want, 1e-5, name)
    _close_grads(loss_grads(model, inputs), want_grads, name)


def test_python_ref_gemini_triton():
    import python_ref

    torch.manual_seed(0)
    model = python_ref.build("gemini", "tiny").eval()
    inputs = python_ref.example_inputs("gemini", model=model)
    with torch.no_grad():
        want = model(**inputs).logits
        vlmkernels.patch(model, families=["qformer"], backend="triton")
        got = model(**inputs).logits
    _close(got, want, 1e-5, "gemini triton")


def test_unsupported_activation_is_skipped_with_the_reason():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    qf = Blip2QFormerModel(Blip2QFormerConfig(**QFORMER, encoder_hidden_size=48, hidden_act="gelu_new"))
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(qf, families=["qformer"], backend="reference")
    assert "exact (erf) GELU" in report.skipped[0].reason, str(report)
    assert patch_info(qf) is None


def test_four_d_mask_runs_hf_code(monkeypatch):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    qf = Blip2QFormerModel(Blip2QFormerConfig(**QFORMER, encoder_hidden_size=48)).eval()
    x, states = torch.randn(2, 4, QFORMER["hidden_size"]), torch.randn(2, 5, 48)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[1, :, :, 3] = False
    with torch.no_grad():
        want = qf(query_embeds=x, attention_mask=mask, encoder_hidden_states=states).last_hidden_state
        vlmkernels.patch(qf, families=["qformer"], backend="reference")
        monkeypatch.setattr(qformer_rules, "_encoder", None)  # the patched path would fail calling it
        got = qf(query_embeds=x, attention_mask=mask, encoder_hidden_states=states).last_hidden_state
    assert torch.equal(got, want)


def test_python_ref_gemini_autocast_training_step():
    import python_ref

    torch.manual_seed(0)
    model = python_ref.build("gemini", "tiny")
    inputs = python_ref.example_inputs("gemini", model=model)
    ref = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_grads(ref, inputs)
        vlmkernels.patch(model, families=["qformer"], backend="reference")
        got = loss_grads(model, inputs)
    _close_grads(got, want, "gemini autocast", rel=3e-2, floor=1e-3)


def test_precision_option_is_part_of_the_patch_record():
    """Rules that do not list the option never see it; re-patching with another precision rebuilds."""
    import python_ref

    gemini = python_ref.build("gemini", "tiny")
    report = vlmkernels.patch(gemini, families=["qformer"], backend="reference", precision="bf16")
    assert report.paths() and all(e.reason == "" for e in report.patched), str(report)
    assert all("precision" not in patch_info(gemini.get_submodule(p)) for p in report.paths())

    model = _build("blip2")
    _patch(model, precision="bf16")
    assert patch_info(model.qformer)["precision"] == "bf16"
    with torch.no_grad():
        want = _qformer_call(model).last_hidden_state
        _patch(model, precision="bf16")  # idempotent: same record
        assert torch.equal(_qformer_call(model).last_hidden_state, want)
        _patch(model)  # no precision: fp32 kernels again
        assert "precision" not in patch_info(model.qformer)
        assert not torch.equal(_qformer_call(model).last_hidden_state, want)
