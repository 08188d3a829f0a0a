"""Hand-rolled LoRA: exactness (fresh, merged for export, against peft) and what each phase trains and freezes."""
import dataclasses

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from models.lora import LoRALinear, apply_lora, lora_layers, strip_lora
from models.vlm import VLM

PHASES = [("projector", False), ("lora", False), ("lora", True)]
PHASE_IDS = ["projector", "lora", "lora+vision"]


def randomize_lora_B(model, std=0.1):
    """Fresh adapters are a no-op (B = 0); random B makes them matter."""
    for m in lora_layers(model):
        nn.init.normal_(m.lora_B, std=std)


def toy_model():
    return nn.Sequential(nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 8))


# --- one layer ---
def test_fresh_adapter_changes_nothing():
    base = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    expected = base(x)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1).train()  # even with dropout active
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.abs().sum() > 0 and not layer.base.weight.requires_grad


def test_adapter_adds_scaled_low_rank_update():
    layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.0)
    randomize_lora_B(layer)
    x = torch.randn(4, 16)
    expected = layer.base(x) + 2.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())  # alpha / r = 2
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_strip_merges_the_adapters_into_plain_linear_layers():
    """What export does (strip_lora): the same outputs from plain nn.Linear layers holding W + (alpha / r) B A."""
    model = toy_model()
    assert apply_lora(model, ["0", "2"], r=4, alpha=8, dropout=0.0) == ["0", "2"]
    randomize_lora_B(model)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = [m.base.weight + 2.0 * m.lora_B @ m.lora_A for m in lora_layers(model)]  # alpha / r = 2
        unmerged = model(x)
        stripped = strip_lora(model)
        merged = stripped(x)
    assert not lora_layers(stripped) and all(type(m) is nn.Linear for m in (stripped[0], stripped[2]))
    for layer, weight in zip((stripped[0], stripped[2]), expected):
        torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=0)
    # fp32: merging reorders the arithmetic, so equal up to rounding (atol 1e-5), not bitwise
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def test_targets_matching_nothing_list_the_available_names():
    model = nn.ModuleDict({"q_proj": nn.Linear(4, 4), "fc1": nn.Linear(4, 4)})
    with pytest.raises(ValueError, match=r"\['fc1', 'q_proj'\]"):
        apply_lora(model, ("k_proj", "proj"), r=2, alpha=2, dropout=0.0)  # whole names, not substrings
    assert not lora_layers(model)


# --- against peft ---
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecations that peft triggers
def test_matches_peft(tiny_assets):
    from peft import LoraConfig, get_peft_model

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ours = AutoModelForCausalLM.from_pretrained(tiny_assets.lm).eval()
    wrapped = apply_lora(ours, targets, r=4, alpha=16, dropout=0.0)
    randomize_lora_B(ours)
    theirs = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_assets.lm),
                            LoraConfig(r=4, lora_alpha=16, target_modules=list(targets), lora_dropout=0.0)).eval()
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name in wrapped:
            layer = ours.get_submodule(name)
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
        assert len([n for n in peft_params if ".lora_A." in n]) == len(wrapped) == 7 * 2  # 7 per layer, 2 layers
        ids = torch.randint(0, ours.config.vocab_size, (2, 12))
        expected = theirs(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        with theirs.disable_adapter():
            assert not torch.allclose(theirs(input_ids=ids).logits, expected, atol=1e-3)  # the adapters matter


# --- the phases: what trains, what stays frozen ---
def phase_model(tiny_cfg, phase, lora_vision):
    return VLM.from_config(dataclasses.replace(tiny_cfg, phase=phase, lora_vision=lora_vision))


def should_train(name, phase, lora_vision):
    if name.startswith("projector."):
        return True
    if phase != "lora" or ".lora_" not in name:
        return False
    return name.startswith("lm.") or (lora_vision and name.startswith("vision."))


def backward(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss_sum.backward()


@pytest.mark.parametrize("phase, lora_vision", PHASES, ids=PHASE_IDS)
def test_backward_reaches_exactly_the_trainable_params(tiny_cfg, tiny_batch, phase, lora_vision):
    model = phase_model(tiny_cfg, phase, lora_vision)  # fresh adapters: B = 0, yet B must get a gradient
    backward(model, tiny_batch(model))
    expected = {n for n, _ in model.named_parameters() if should_train(n, phase, lora_vision)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    n_lora = {"projector": 0, "lora": 2 * 2 * 7, "lora+vision": 2 * 2 * 7 + 2 * 2 * 6}
    assert len(expected) - 3 == n_lora["lora+vision" if lora_vision else phase]  # 2 matrices x 2 layers x targets
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in expected if n.endswith("lora_B"))


@pytest.mark.parametrize("phase, lora_vision", PHASES, ids=PHASE_IDS)
def test_optimizer_step_leaves_frozen_weights_bitwise_unchanged(tiny_cfg, tiny_batch, phase, lora_vision):
    model = phase_model(tiny_cfg, phase, lora_vision)
    randomize_lora_B(model)  # so lora_A gets a non-zero gradient too
    before = {n: t.clone() for n, t in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # all of them, on purpose
    backward(model, tiny_batch(model))
    optimizer.step()
    after = model.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == {n for n in before if should_train(n, phase, lora_vision)}

