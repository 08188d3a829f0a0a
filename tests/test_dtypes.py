"""Backbones saved in bf16 (as the hub's SmolLM2 is): every trainable weight is fp32 in every phase (vision adapters
included), so a tiny update survives, while the frozen ones keep the saved dtype; such a run's checkpoint captions
on the CPU."""
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import loop
from data.shapes import draw
from models.vision import image_pixels, tower_class, vision_config
from training import checkpoint

LR = 1e-6  # under bf16's resolution for every weight of the tiny backbones, well over fp32's


@pytest.fixture(scope="module")
def bf16_backbones(tiny_assets, tmp_path_factory):
    """The tiny backbones, saved in bf16: (vision dir, lm dir)."""
    root = tmp_path_factory.mktemp("bf16")
    tower = tower_class(vision_config(tiny_assets.vision)).from_pretrained(tiny_assets.vision)
    tower.to(torch.bfloat16).save_pretrained(root / "vision")
    shutil.copy(Path(tiny_assets.vision) / "preprocessor_config.json", root / "vision")
    AutoModelForCausalLM.from_pretrained(tiny_assets.lm).to(torch.bfloat16).save_pretrained(root / "lm")
    AutoTokenizer.from_pretrained(tiny_assets.lm).save_pretrained(root / "lm")
    return str(root / "vision"), str(root / "lm")


@pytest.mark.parametrize("phase, lora_vision", [("projector", False), ("lora", True), ("full", True)])
def test_trainable_weights_are_fp32_and_a_tiny_update_survives(tiny_cfg, bf16_backbones, on_optimizer_step, phase,
                                                                lora_vision):
    vision, lm = bf16_backbones
    cfg = dataclasses.replace(tiny_cfg, vision_model=vision, lm_model=lm, max_steps=1, warmup_frac=0.0,
                              projector_lr=LR, lora_lr=LR, lora_projector_lr=LR, full_lr=LR)
    if phase != "projector":
        projector = loop.train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-projector"))
        cfg = dataclasses.replace(cfg, phase=phase, lora_vision=lora_vision, init_from=str(projector["checkpoint"]))
    before, grads = {}, {}
    on_optimizer_step(lambda opt: before.update({id(p): p.detach().clone() for g in opt.param_groups
                                                 for p in g["params"]}))
    on_optimizer_step(lambda opt: grads.update({id(p): p.grad.clone() for g in opt.param_groups
                                                for p in g["params"]}))
    result = loop.train(cfg)
    model = result["model"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)  # the frozen keep theirs
    moved = torch.cat([(p.detach() != before[id(p)])[grads[id(p)] != 0] for p in trainable])
    assert moved.float().mean() > 0.99  # in bf16, none would

    pixels = image_pixels(model.processor, [draw("red", "circle", "center")])
    captions = model.eval().generate(pixels, max_new_tokens=4)
    assert checkpoint.load_model(result["checkpoint"]).generate(pixels, max_new_tokens=4) == captions
