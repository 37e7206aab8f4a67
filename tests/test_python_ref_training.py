"""python_ref.training strategies: each makes gradients reach exactly the parameters it trains, on every
architecture of the registry (tiny size, CPU); LoRA and QLoRA through peft."""

import pytest
import torch

import python_ref
from python_ref import training
from python_ref.registry import NAMES
from tests.helpers import loss_grads


def _check_strategy(model, inputs, strategy, used):
    groups = training.configure(model, strategy)
    grads = loss_grads(model, inputs)
    part_of = {n: part for part, names in training.parts(model).items() for n in names}
    trains = training._TRAINS[strategy]
    adapters = strategy in ("lora", "qlora")
    nonzero_parts = set()
    for n, p in model.named_parameters():
        is_lora = training.is_adapter(n)
        trained = (is_lora and adapters) or (part_of[n] in trains and not is_lora)
        assert p.requires_grad == trained, f"{strategy}: requires_grad of {n}"
        # a LoRA base layer's weight is the one the forward used before the adapter wrapped it
        should = trained and (is_lora or n.replace(".base_layer.", ".") in used)
        assert (grads[n] is not None) == should, f"{strategy}: {n} ({part_of[n]}) grad={grads[n] is not None}"
        if grads[n] is not None and grads[n].abs().sum() > 0:
            nonzero_parts.add("lora" if is_lora else part_of[n])
    expected = set(trains) | ({"lora"} if adapters else set())
    assert nonzero_parts == expected, f"{strategy}: parts with nonzero gradient {nonzero_parts} != {expected}"
    assert {g["name"] for g in groups} == expected and all("lr" not in g for g in groups)
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
def test_strategies_reach_exactly_their_parameters(name):
    model = python_ref.build(name, "tiny")
    inputs = python_ref.example_inputs(name, batch_size=2, seed=0, size="tiny", model=model)
    parts = training.parts(model)  # every parameter in exactly one part
    assert parts["vision"] and parts["fusion"] and parts["llm"], {k: len(v) for k, v in parts.items()}
    # end_to_end: all parameters train; the ones the forward uses at all get a gradient (LLaVA, e.g.,
    # never runs the vision tower's last layer), and every part gets a nonzero one
    training.configure(model, "end_to_end")
    assert all(p.requires_grad for p in model.parameters())
    grads = loss_grads(model, inputs)
    used = {n for n, g in grads.items() if g is not None}
    assert len(used) >= 0.5 * len(grads)
    for part, names in parts.items():
        assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in names), f"no gradient in {part}"
    for strategy in ("alignment_pretrain", "instruction_tuning", "lora"):  # lora adds adapters: last
        _check_strategy(model, inputs, strategy, used)


def test_minigpt4_alignment_trains_only_the_projection_at_base():
    """MiniGPT-4 trains the projection alone (~10M at base), not BLIP-2's Q-Former and queries."""
    with torch.device("meta"):
        model = python_ref.build("minigpt4", "base")
    training.configure(model, "alignment_pretrain")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projection.") for n in trainable)
    summary = training.trainable_summary(model)
    assert 9e6 < summary["fusion"][0] == summary["fusion"][1] < 11e6
    assert summary["vision"][0] == summary["llm"][0] == 0


def test_peft_lora_starts_as_identity_and_keeps_base_keys():
    model = python_ref.build("llava_v15", "tiny").eval()
    inputs = python_ref.example_inputs("llava_v15", model=model)
    keys = set(model.state_dict())
    with torch.no_grad():
        want = model(**inputs).logits
    adapted = training.add_lora(model, rank=4, alpha=8.0)
    from peft.tuners.lora import LoraLayer

    for name in adapted:
        layer = model.get_submodule(name)
        assert isinstance(layer, LoraLayer) and layer.r["default"] == 4 and layer.scaling["default"] == 2.0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, want)  # B = 0 at init
    new = set(model.state_dict())
    base = {k.replace(".base_layer.", ".") for k in new if not training.is_adapter(k)}
    assert base == keys, "only the adapted layers' keys move under base_layer"
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in new if training.is_adapter(k))


def test_lora_is_idempotent_and_skips_lm_head():
    model = python_ref.build("minigpt5", "tiny")
    first = training.add_lora(model)
    assert first and not any("lm_head" in n for n in first)
    assert all(n.startswith("language_model.") for n in first)
    training.configure(model, "lora")  # second application adds nothing new
    assert training.lora_layers(model) == first
    summary = training.trainable_summary(model)
    assert summary["vision"][0] == 0 and summary["fusion"][0] == summary["fusion"][1]
    assert 0 < summary["llm"][0] < 0.5 * summary["llm"][1]  # only the adapters
    groups = training.configure(model, "lora", lora_train_fusion=False)
    assert [g["name"] for g in groups] == ["lora"] and training.trainable_summary(model)["fusion"][0] == 0


@pytest.mark.parametrize("name", ["llava_v15", "gemini"])
def test_qlora_stores_llm_weights_in_4bit(name):
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = python_ref.build(name, "tiny")
    inputs = python_ref.example_inputs(name, model=model)
    with torch.no_grad():
        want = model(**inputs).logits
    adapted = training.add_lora(model, quantize=True)
    for layer_name in adapted:
        layer = model.get_submodule(layer_name)
        assert isinstance(layer, LoraLinear4bit) and isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert layer.base_layer.weight.dtype == torch.uint8  # NF4, two weights a byte
    training.configure(model, "qlora")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(training.parts(model)["fusion"]) | {n for n in trained if training.is_adapter(n)}
    grads = loss_grads(model, inputs)
    assert {n for n, g in grads.items() if g is not None} <= trained
    adapters = [n for n in grads if training.is_adapter(n)]
    assert adapters and all(grads[n] is not None for n in adapters)
    with torch.no_grad():
        got = model(**inputs).logits
    # NF4 rounding of tiny random weights: close to, not equal to, the float model
    assert (got - want).abs().max() < 0.25 * want.abs().max()
    with pytest.raises(ValueError, match="quantized"):
        training.configure(model, "end_to_end")


def test_bad_strategy_and_unclassified_parameter():
    model = python_ref.build("florence_vl", "tiny")
    with pytest.raises(ValueError, match="strategy"):
        training.configure(model, "full")
    with pytest.raises(ValueError, match="exactly one"):
        training.configure(model)
    model.extra_head = torch.nn.Linear(2, 2)  # belongs to no part
    with pytest.raises(ValueError, match="extra_head"):
        training.parts(model)
