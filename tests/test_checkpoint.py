"""Checkpoints: the config plus the trainable weights only, and a reload that reproduces the model exactly."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import WEIGHTS, load_model, load_weights, save_model
from models.lora import lora_layers
from models.vlm import VLM


@pytest.fixture(params=["projector", "lora"])
def trained(request, tiny_cfg, tiny_batch, tmp_path):
    """A model of each phase with non-trivial trainable weights, its batch, and its checkpoint dir."""
    model = VLM.from_config(dataclasses.replace(tiny_cfg, phase=request.param)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:  # projector and lora_A/lora_B; lora_B starts at 0, so the test would be moot
                p.normal_(std=0.2)
    save_model(model, tmp_path / "ckpt")
    return model, tiny_batch(model), tmp_path / "ckpt"


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(batch["input_ids"], batch["pixel_values"]).logits


def test_reload_gives_identical_logits(trained):
    model, batch, ckpt = trained
    loaded = load_model(ckpt)
    assert loaded.cfg == model.cfg
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_checkpoint_holds_config_and_trainable_weights_only(trained):
    model, _, ckpt = trained
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", WEIGHTS]
    state = load_file(str(ckpt / WEIGHTS))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable
    assert all(n.startswith("projector.") or n.endswith((".lora_A", ".lora_B")) for n in state)
    assert len(state) == 3 + 2 * len(lora_layers(model))
    assert all(torch.equal(t, model.get_parameter(n)) for n, t in state.items())


def test_config_with_unknown_key_still_loads(trained):
    model, batch, ckpt = trained
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "knob_from_the_future": True}))
    with pytest.warns(UserWarning, match="knob_from_the_future"):
        loaded = load_model(ckpt)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_a_run_directory_loads_its_newest_checkpoint(trained):
    model, batch, ckpt = trained
    run = ckpt.parent / "run"
    save_model(VLM.from_config(model.cfg), run / "step_00000010")  # an older, untrained checkpoint
    ckpt.rename(run / "step_00000020")
    assert torch.equal(logits(load_model(run), batch), logits(model, batch))


def test_checkpoint_of_another_shape_is_a_clear_error(trained):
    model, _, ckpt = trained
    other = VLM.from_config(dataclasses.replace(model.cfg, projector_hidden_dim=32, lora_r=8))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_weights(other, ckpt)
