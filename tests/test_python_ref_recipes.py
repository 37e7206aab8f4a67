"""python_ref.training recipes: every system's stages train exactly their parts at their stated rates
(tiny size, CPU); vlmkernels.patch() of models carrying peft adapters keeps parity."""

import pytest
import torch

import python_ref
import vlmkernels
from python_ref import training
from python_ref.registry import NAMES
from tests.helpers import assert_close, loss_grads

DOCUMENT_SYSTEMS = ("minigpt5", "dynamic_qformer", "leo", "florence_vl", "dynamic_vision_selector",
                    "gemini", "gpt4v", "claude")


def test_every_system_has_a_recipe():
    assert set(training.RECIPES) == set(NAMES)
    for name in NAMES:
        stages = training.recipe(name)
        assert stages and len({s.name for s in stages}) == len(stages), name
        for s in stages:
            assert s.parts and set(s.parts) <= set(training.PART_NAMES) and s.data, (name, s)
            published = name not in DOCUMENT_SYSTEMS
            assert all((lr is not None and 0 < lr < 1e-2) if published else lr is None for lr in s.lr.values())


def test_published_stages():
    """The recipes the issue names, part by part."""
    r = {name: {s.name: dict(s.lr) for s in training.recipe(name)} for name in NAMES}
    assert r["llava_v15"] == {"pretrain": {"fusion": 1e-3}, "finetune": {"fusion": 2e-5, "llm": 2e-5}}
    assert r["llava_next"]["finetune"] == {"vision": 2e-6, "fusion": 2e-5, "llm": 2e-5}
    assert list(r["llava_onevision"]) == ["stage1", "stage1.5", "stage2_single_image", "stage2_onevision"]
    assert r["blip2"]["generative"] == {"fusion": 1e-4}
    assert training.recipe("blip2")[0].exclude == ("language_projection.",)
    assert r["instructblip"] == {"instruction_tuning": {"fusion": 1e-5}}
    assert r["minigpt4"] == {"pretrain": {"fusion": 1e-4}, "finetune": {"fusion": 3e-5}}
    assert set(r["clip"]["pretrain"]) == {"vision", "fusion", "llm"}


@pytest.mark.parametrize("name", NAMES)
def test_stages_train_exactly_their_parts_at_their_rates(name):
    model = python_ref.build(name, "tiny")
    inputs = python_ref.example_inputs(name, batch_size=2, seed=0, size="tiny", model=model)
    training.configure(model, "end_to_end")
    used = {n for n, g in loss_grads(model, inputs).items() if g is not None}  # what the forward reaches
    part_of = {n: part for part, names in training.parts(model).items() for n in names}
    for stage in training.recipe(name):
        groups = training.configure(model, stage=stage.name)  # the system build() recorded
        trained = {n for n in part_of if part_of[n] in stage.lr and not training._matches(n, stage.exclude)}
        assert [g["name"] for g in groups] == list(stage.lr), stage.name
        for g in groups:
            assert g.get("lr") == stage.lr[g["name"]], (stage.name, g["name"])
        params = dict(model.named_parameters())
        assert {id(p) for g in groups for p in g["params"]} == {id(params[n]) for n in trained}
        grads = loss_grads(model, inputs)
        for n, p in params.items():
            assert p.requires_grad == (n in trained), f"{stage.name}: requires_grad of {n}"
            assert (grads[n] is not None) == (n in trained and n in used), f"{stage.name}: grad of {n}"
        for part in stage.lr:
            assert any(grads[n] is not None and grads[n].abs().sum() > 0
                       for n in trained if part_of[n] == part), f"{stage.name}: no gradient in {part}"


def test_stage_lookup():
    model = python_ref.build("llava_v15", "tiny")
    finetune = training.recipe("llava_v15")[1]
    assert training.configure(model, stage="finetune")[0]["lr"] == 2e-5
    assert training.configure(model, stage=finetune, system="ignored")[1]["name"] == "llm"
    with pytest.raises(ValueError, match="stages"):
        training.configure(model, stage="stage1.5")
    with pytest.raises(ValueError, match="system"):
        training.configure(torch.nn.Linear(2, 2), stage="finetune")
    with pytest.raises(KeyError, match="no recipe"):
        training.recipe("flamingo")
    # an optimizer takes the groups as they are
    opt = torch.optim.AdamW(training.configure(model, stage="finetune", system="llava_v15"), lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [2e-5, 2e-5]


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            num_key_value_heads=2, max_position_embeddings=64, intermediate_size=24,
                                            num_local_experts=6, num_experts_per_tok=2)).eval()


def test_patch_mixtral_with_lora_on_attention():
    """peft adapters on q/k/v/o: patch() still finds every router and expert block, and the patched
    model's logits equal the unpatched adapted model's."""
    from peft import LoraConfig, inject_adapter_in_model

    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(7))
    plain = vlmkernels.patch(_mixtral(), families=["moe"], backend="reference").paths("moe")
    model = _mixtral()
    # init_lora_weights=False: random B too, so the adapters change the logits
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                       init_lora_weights=False), model)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    report = vlmkernels.patch(model, families=["moe"], backend="reference")
    assert sorted(report.paths("moe")) == sorted(plain) and not report.skipped, str(report)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert len(training.lora_layers(model)) == 8  # 2 layers x q/k/v/o, untouched by patch()


def test_patch_python_ref_model_with_lora():
    model = python_ref.build("dynamic_vision_selector", "tiny", top_k=2).eval()
    inputs = python_ref.example_inputs("dynamic_vision_selector", model=model)
    training.configure(model, "lora")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)  # adapters that change the output
        want = model(**inputs).logits
    report = vlmkernels.patch(model, families=["moe"], backend="reference")
    assert report.paths() == ["router"] and [e.rule for e in report.patched] == ["expert_router"], str(report)
    with torch.no_grad():
        got = model(**inputs).logits
    assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
