"""python_ref.training: each strategy makes gradients reach exactly the parameters it trains, on every
architecture of the registry (tiny size, CPU)."""

import pytest
import torch

import python_ref
from python_ref import training
from python_ref.registry import NAMES

def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    assert torch.isfinite(out.loss), "loss must be finite"
    out.loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _check_strategy(model, inputs, strategy, used):
    training.configure(model, strategy)
    grads = _grads(model, inputs)
    part_of = {n: part for part, names in training.parts(model).items() for n in names}
    trains = training._TRAINS[strategy]
    nonzero_parts = set()
    for n, p in model.named_parameters():
        is_lora = n.endswith(("lora_A", "lora_B"))
        should = is_lora or (part_of[n] in trains and n in used)
        assert p.requires_grad == (is_lora or part_of[n] in trains), f"{strategy}: requires_grad of {n}"
        assert (grads[n] is not None) == should, f"{strategy}: {n} ({part_of[n]}) grad={grads[n] is not None}"
        if grads[n] is not None and grads[n].abs().sum() > 0:
            nonzero_parts.add("lora" if is_lora else part_of[n])
    expected = set(trains) | ({"lora"} if strategy == "lora" else set())
    assert nonzero_parts == expected, f"{strategy}: parts with nonzero gradient {nonzero_parts} != {expected}"


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
    grads = _grads(model, inputs)
    used = {n for n, g in grads.items() if g is not None}
    assert len(used) >= 0.5 * len(grads)
    for part, names in parts.items():
        assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in names), f"no gradient in {part}"
    for strategy in ("alignment_pretrain", "instruction_tuning", "lora"):  # lora adds adapters: last
        _check_strategy(model, inputs, strategy, used)


def test_lora_layer_math_and_state_dict_keys():
    torch.manual_seed(0)
    base = torch.nn.Linear(7, 5)
    w = base.weight
    lora = training.LoRALinear(base, rank=3, alpha=6.0)
    assert lora.weight is w, "the adapter must share the base weight"
    x = torch.randn(4, 7, dtype=torch.float32)
    torch.testing.assert_close(lora(x), base(x))  # B = 0 at init: identical output
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = x @ (w + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias
    torch.testing.assert_close(lora(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.merged_weight(), w + 2.0 * lora.lora_B @ lora.lora_A)
    assert set(lora.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_lora_is_idempotent_and_skips_lm_head():
    model = python_ref.build("minigpt5", "tiny")
    first = training.add_lora(model)
    assert first and not any("lm_head" in n for n in first)
    assert all(n.startswith("language_model.") for n in first)
    training.configure(model, "lora")  # second application adds nothing new
    n_lora = sum(isinstance(m, training.LoRALinear) for m in model.modules())
    assert n_lora == len(first)
    summary = training.trainable_summary(model)
    assert summary["vision"][0] == 0 and summary["fusion"][0] == summary["fusion"][1]
    assert 0 < summary["llm"][0] < 0.5 * summary["llm"][1]  # only the adapters
    training.configure(model, "lora", lora_train_fusion=False)
    assert training.trainable_summary(model)["fusion"][0] == 0


def test_bad_strategy_and_unclassified_parameter():
    model = python_ref.build("florence_vl", "tiny")
    with pytest.raises(ValueError, match="strategy"):
        training.configure(model, "qlora")
    model.extra_head = torch.nn.Linear(2, 2)  # belongs to no part
    with pytest.raises(ValueError, match="extra_head"):
        training.parts(model)
