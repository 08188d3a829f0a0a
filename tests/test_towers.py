"""Vision towers beyond SigLIP: CLIP, DINOv2 (with registers), a fused DINOv2 + SigLIP pair; letterboxing, the patch
grid, presets and gradient checkpointing."""
import dataclasses
import json

import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, Dinov2Config, Dinov2Model, SiglipVisionConfig

from training import checkpoint, loop
from training.captioning import caption_files
from training.export import export
from models.config import ConfigError, PRESETS, VLMConfig, parse_overrides
from models.lora import lora_layers
from models.tiny import build_vision, image_processor
from models.vision import image_pixels, load_vision, n_image_tokens
from models.vlm import VLM


@pytest.fixture(scope="session")
def towers(tiny_assets):
    """family -> a tiny random tower's directory (4x4 patches of 8 px, at 32 px)."""
    return {family: build_vision(tiny_assets.root / "towers" / family, family)
            for family in ("siglip", "clip", "dinov2", "dinov2-with-registers")}


def tower_cfg(cfg, towers, family, **changes):
    first, _, second = family.partition("+")
    return dataclasses.replace(cfg, vision_model=towers[first], fused_vision_model=towers[second] if second else "",
                               **changes)


def logits(model, pixels):
    ids = torch.tensor([[model.tokenizer.eos_token_id] * 3 + [model.image_token_id] * model.n_image_tokens] * 2)
    with torch.no_grad():
        return model.eval()(ids, pixels).logits


@pytest.mark.parametrize("family, feature_layer", [("clip", -2), ("dinov2", -1), ("dinov2-with-registers", -2),
                                                   ("dinov2-with-registers+siglip", -2)])
def test_tower_trains_both_phases_reloads_captions_and_exports(tiny_cfg, towers, tmp_path, family, feature_layer):
    """Projector, then LoRA on the LM and the tower(s); the checkpoint reloads to the same logits, captions files
    through generate.py's path, and exports to plain transformers folders that give the same logits again."""
    cfg = tower_cfg(tiny_cfg, towers, family, vision_feature_layer=feature_layer, max_steps=2, val_size=0)
    projector = loop.train(cfg)
    lora_cfg = dataclasses.replace(cfg, phase="lora", init_from=str(projector["checkpoint"]), lora_vision=True,
                                   lora_vision_targets=("fc1", "fc2"), out_dir=cfg.out_dir + "-lora")
    lora = loop.train(lora_cfg)
    trained = lora["model"]
    assert {n.split(".")[2] for n, p in trained.named_parameters() if "lora_" in n and n.startswith("vision.")} \
        == {str(i) for i in range(family.count("+") + 1)}  # every tower got adapters
    for layer in lora_layers(trained):
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # two steps barely move them: make them matter
    checkpoint.save_model(trained, tmp_path / "ckpt")
    image = tmp_path / "wide.png"
    Image.new("RGB", (60, 30), (200, 40, 40)).save(image)
    pixels = image_pixels(trained.processor, [Image.open(image)] * 2)
    expected = logits(trained, pixels)

    reloaded = checkpoint.load_model(tmp_path / "ckpt")
    torch.testing.assert_close(logits(reloaded, pixels), expected)
    [(_, caption, error)] = caption_files(reloaded, [image], batch_size=1, max_new_tokens=4)
    assert error is None and isinstance(caption, str)
    export(reloaded, tmp_path / "export")
    exported = checkpoint.load_model(tmp_path / "export")
    assert not lora_layers(exported) and len(exported.vision.towers) == len(trained.vision.towers)
    torch.testing.assert_close(logits(exported, pixels), expected, rtol=0, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("family, prefix", [("clip", 1), ("dinov2", 1), ("dinov2-with-registers", 5)])
def test_features_are_the_patches_of_the_chosen_layer(tiny_cfg, towers, family, prefix):
    """The class token (and DINOv2's 4 registers) are dropped; -2 is the raw output of the penultimate layer."""
    vision, _ = load_vision(tower_cfg(tiny_cfg, towers, family, vision_feature_layer=-2))
    full, _ = load_vision(tower_cfg(tiny_cfg, towers, family))
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    normalized = pixels.float() * full.pixel_scale[0] - full.pixel_shift[0]
    with torch.no_grad():
        hidden = full.towers[0](pixel_values=normalized, output_hidden_states=True).hidden_states  # [B, T, D] each
        torch.testing.assert_close(vision(pixels), hidden[-2][:, prefix:])


def test_letterbox_pads_with_the_mean_colour_and_keeps_the_aspect(tiny_assets):
    processor = image_processor("siglip", 32)  # its mean is 0.5 grey
    wide = Image.new("RGB", (64, 32), (255, 0, 0))  # 2:1
    boxed = image_pixels(processor, [wide], fit="letterbox")[0]  # [3, 32, 32]
    grey, red = torch.tensor([128, 128, 128], dtype=torch.uint8), torch.tensor([255, 0, 0], dtype=torch.uint8)
    rows = boxed.permute(1, 2, 0)  # [H, W, 3]
    # 8 rows of padding above and below a 32x16 band of red (the image, not stretched); bicubic blurs the edges
    assert (rows[:6] == grey).all() and (rows[-6:] == grey).all() and (rows[10:22] == red).all()
    assert (image_pixels(processor, [wide])[0].permute(1, 2, 0) == red).all()  # resize squashes it instead


def weightless_tower(path, config, family, side):
    """A tower directory with a config and a processor but no weights: enough for the checks before loading."""
    config.save_pretrained(path)
    image_processor(family, side).save_pretrained(path)
    return str(path)


def test_grid_comes_from_the_processor_and_unshuffle_must_divide_it(tiny_cfg, tmp_path, monkeypatch):
    """CLIP-L/14-336 makes 24x24 patches (its processor crops to 336); 5 does not divide 24: a ConfigError naming
    the factors that do, before any weights load."""
    clip = weightless_tower(tmp_path / "clip", CLIPVisionConfig(patch_size=14, image_size=336), "clip", 336)
    assert n_image_tokens(dataclasses.replace(tiny_cfg, vision_model=clip, pixel_unshuffle=2)) == 144
    monkeypatch.setattr(loop, "build_model", lambda *a: pytest.fail("loaded a model before refusing"))
    with pytest.raises(ConfigError, match=r"pixel_unshuffle.*24x24.*\[1, 2, 3, 4, 6, 8, 12, 24\]"):
        loop.train(dataclasses.replace(tiny_cfg, vision_model=clip, pixel_unshuffle=5))


def test_fused_towers_must_make_the_same_grid(tiny_cfg, tmp_path):
    dinov2 = weightless_tower(tmp_path / "dinov2", Dinov2Config(patch_size=14), "dinov2", 224)  # 16x16
    siglip = weightless_tower(tmp_path / "siglip", SiglipVisionConfig(patch_size=16), "siglip", 224)  # 14x14
    with pytest.raises(ConfigError, match="fused_vision_model.*16x16.*14x14"):
        n_image_tokens(dataclasses.replace(tiny_cfg, vision_model=dinov2, fused_vision_model=siglip))


def test_a_fused_tower_of_another_resolution_sees_the_image_at_its_own(tiny_cfg, towers, tmp_path):
    """SigLIP with 8 px patches at 32 px and DINOv2 with 16 px patches at 64 px both make 4x4 grids."""
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=16, image_size=64)
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    image_processor("dinov2", 64).save_pretrained(tmp_path / "dinov2")
    cfg = dataclasses.replace(tiny_cfg, vision_model=towers["siglip"], fused_vision_model=str(tmp_path / "dinov2"))
    vision, processor = load_vision(cfg)
    pixels = image_pixels(processor, [Image.new("RGB", (40, 30), (10, 200, 30))])  # [1, 3, 32, 32]
    assert n_image_tokens(cfg) == 4 and vision(pixels).shape == (1, 16, 64 + 32)


def test_preset_is_a_starting_point_that_flags_override(tmp_path, capsys):
    cfg = parse_overrides(["--lora_lr", "5e-4", "--preset", "phiclip", "--vision_feature_layer=-1"])
    assert cfg.vision_model == "openai/clip-vit-large-patch14-336" and cfg.lora_vision  # from the preset
    assert cfg.lora_lr == 5e-4 and cfg.vision_feature_layer == -1  # flags win, before or after --preset
    cfg.save(tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["preset"] == "phiclip" and saved["lm_model"] == "microsoft/Phi-3-mini-4k-instruct"
    assert VLMConfig.load(tmp_path / "config.json") == cfg
    assert parse_overrides(["--lora_lr", "1e-4"], cfg).vision_feature_layer == -1  # a saved config is not re-preset
    with pytest.raises(SystemExit):
        parse_overrides(["--preset", "prismatic-siglip-phi2", "--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in PRESETS)
    for name in PRESETS:
        parse_overrides(["--preset", name]).validate()
    with pytest.raises(ConfigError, match="phiclip"):
        parse_overrides(["--preset", "llava"])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_cfg, tiny_batch):
    """LoRA on the LM and the tower: each layer really recomputes in the backward pass, to the same numbers."""
    def loss_and_grads(checkpointing):
        torch.manual_seed(0)
        cfg = dataclasses.replace(tiny_cfg, phase="lora", init_from="x", lora_vision=True,
                                  gradient_checkpointing=checkpointing)
        model = VLM.from_config(cfg)
        for layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.1)  # non-zero: every adapter's A gets a gradient too
        calls = []
        for mlp in (model.lm.base_model.layers[0].mlp, model.vision.towers[0].encoder.layers[0].mlp):
            mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # a recompute stops once it has what it needs
        torch.manual_seed(1)
        loss = model(**tiny_batch(model)).loss_sum
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss, grads, len(calls)

    loss, grads, calls = loss_and_grads(False)
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads(True)
    assert (calls, calls_ckpt) == (2, 4)  # the checkpointed layers ran again in the backward pass
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and any("vision." in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)


def test_gradient_checkpointing_recomputes_the_frozen_lm_in_the_projector_phase(tiny_cfg, tiny_batch):
    """Phase 1's backward runs through the frozen LM's activations (to the projector): checkpointing saves memory
    there too. Its layers recompute, to the same gradients, and dropout inside them stays off."""
    def grads_and_calls(checkpointing):
        torch.manual_seed(0)
        model = VLM.from_config(dataclasses.replace(tiny_cfg, gradient_checkpointing=checkpointing)).train()
        calls = []
        model.lm.base_model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        model(**tiny_batch(model)).loss_sum.backward()
        assert not any(m.training for m in model.lm.modules() if isinstance(m, torch.nn.Dropout))
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)

    grads, calls = grads_and_calls(False)
    grads_ckpt, calls_ckpt = grads_and_calls(True)
    assert (calls, calls_ckpt) == (1, 2)
    assert grads.keys() == grads_ckpt.keys() and all(n.startswith("projector.") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], msg=name)
