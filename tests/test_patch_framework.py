"""Properties every patch must keep, checked on a tiny HF MoE model and on python_ref models:
instance-level swap, idempotence, exact unpatch, reporting, dtype/device/mode changes, state_dict,
deepcopy, save_pretrained and torch.compile(fullgraph=True)."""

import copy
import warnings

import pytest
import torch

import vlmkernels
from vlmkernels.patching import patch_info


def tiny_mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=5,
                        num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval()


def ids(batch=2, seq=7, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def instance_forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_patch_is_per_instance_and_unpatch_is_exact():
    model, other = tiny_mixtral(), tiny_mixtral()
    x = ids()
    before = logits(model, x)
    class_forwards = {type(m): type(m).forward for m in model.modules()}

    report = vlmkernels.patch(model, families=["moe"])
    assert report and report.paths("moe")
    assert all(type(m).forward is f for m, f in ((m, class_forwards[type(m)]) for m in model.modules()))
    assert all(patch_info(m) is None for m in other.modules()), "another instance was patched"
    torch.testing.assert_close(logits(model, x), before, rtol=1e-5, atol=1e-6)

    assert vlmkernels.unpatch(model) == len(report.patched)
    assert all(f is None for f in instance_forwards(model).values())
    assert torch.equal(logits(model, x), before), "unpatch must restore the original bit for bit"


def test_patch_twice_is_patch_once_and_report_is_readable():
    model = tiny_mixtral()
    first = vlmkernels.patch(model, families=["moe"], backend="reference")
    bound = instance_forwards(model)
    second = vlmkernels.patch(model, families=["moe"], backend="reference")
    assert [(e.path, e.family, e.backend) for e in first.patched] == \
           [(e.path, e.family, e.backend) for e in second.patched]
    assert instance_forwards(model) == bound
    text = str(second)
    assert "patched" in text and "moe" in text and "reference" in text
    for entry in first.patched:
        assert entry.path in text
    # switching backend re-patches from the original, not on top of the previous patch
    vlmkernels.patch(model, families=["moe"], backend="cpu")
    assert {patch_info(m)["backend"] for m in model.modules() if patch_info(m)} == {"cpu"}
    vlmkernels.unpatch(model)
    assert all(patch_info(m) is None for m in model.modules())


def test_nothing_to_patch_is_falsy_and_warns():
    with pytest.warns(UserWarning, match="nothing was patched"):
        report = vlmkernels.patch(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    assert not report and report.patched == []


def test_bad_patch_arguments():
    with pytest.raises(ValueError, match="unknown families"):
        vlmkernels.patch(tiny_mixtral(), families=["attention"])
    with pytest.raises(ValueError, match="backend must be"):
        vlmkernels.patch(tiny_mixtral(), backend="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_patch_after_to_dtype_and_in_train_mode(dtype, train):
    model = tiny_mixtral().to(dtype).train(train)
    x = ids()
    torch.manual_seed(0)
    ref = model(input_ids=x).logits.float()
    vlmkernels.patch(model, families=["moe"])
    out = model(input_ids=x).logits
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * 10)
    if train:  # gradients still flow to the router and expert weights through the patched path
        out.float().sum().backward()
        grads = [p.grad for n, p in model.named_parameters() if "gate" in n or "experts" in n]
        assert grads and all(g is not None for g in grads)


def test_state_dict_keys_deepcopy_and_save_pretrained(tmp_path):
    model = tiny_mixtral()
    keys = list(model.state_dict())
    x = ids()
    vlmkernels.patch(model, families=["moe"])
    assert list(model.state_dict()) == keys
    clone = copy.deepcopy(model)
    for name, m in clone.named_modules():
        fwd = m.__dict__.get("forward")
        if fwd is not None:
            assert fwd.__self__ is m, f"{name}: the copy's forward is bound to the original module"
    torch.testing.assert_close(logits(clone, x), logits(model, x))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert list(reloaded.state_dict()) == keys
    assert all(patch_info(m) is None for m in reloaded.modules())
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_on_patched_hf_model():
    model = tiny_mixtral()
    x = ids()
    ref = logits(model, x)
    vlmkernels.patch(model, families=["moe"], backend="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(input_ids=x).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dynamic_qformer", "dynamic_vision_selector"])
def test_python_ref_model_patch_roundtrip(name):
    import python_ref

    kwargs = {"top_k": 2} if name == "dynamic_vision_selector" else {}
    model = python_ref.build(name, "tiny", **kwargs).eval()
    inputs = python_ref.example_inputs(name, model=model)
    with torch.no_grad():
        before = model(**inputs).logits
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # something must be patched
        report = vlmkernels.patch(model, families=["moe"])
    assert report.paths("moe")
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(model)(**inputs).logits, before, rtol=1e-5, atol=1e-5)
    vlmkernels.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
