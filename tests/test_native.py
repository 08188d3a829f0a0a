"""models/native.py: a model trained with the mlp or linear projector, as transformers' Llava or Idefics3, gives the
same logits; the folder it writes loads without remote code; the projectors train in the real loop."""
import dataclasses

import pytest
import torch
from PIL import Image
from transformers import Idefics3ForConditionalGeneration, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from training import loop
from generate import main as generate_main
from training import checkpoint
from models.config import ConfigError
from models.native import native_export, to_native
from models.projector import pixel_unshuffle
from models.prompt import DEFAULT_PROMPT, encode_prompt
from models.vision import image_pixels
from models.vlm import VLM

NATIVE = {"mlp": (LlavaForConditionalGeneration, dict(pixel_unshuffle=1, vision_feature_layer=-2)),
          "linear": (Idefics3ForConditionalGeneration, dict(pixel_unshuffle=2, vision_feature_layer=-1))}


def tiny_model(tiny_cfg, projector, **overrides):
    cfg = dataclasses.replace(tiny_cfg, projector=projector, **{**NATIVE[projector][1], **overrides})
    model = VLM.from_config(cfg.validate()).eval()
    for p in model.projector.parameters():  # not near-zero: a misplaced or mis-ordered feature would show
        torch.nn.init.normal_(p, std=0.5)
    return model


def native_inputs(model, native, pixels):
    """The native class's inputs for uint8 `pixels`: normalised as the tower does it (Idefics3: one image per row)."""
    pixel_values = pixels.float() * model.vision.pixel_scale[0] - model.vision.pixel_shift[0]
    return pixel_values.unsqueeze(1) if isinstance(native, Idefics3ForConditionalGeneration) else pixel_values


def same_logits(model, native, pixels, atol=1e-5):
    ids = torch.tensor([encode_prompt(model.tokenizer, DEFAULT_PROMPT, model.n_image_tokens)] * len(pixels))
    with torch.no_grad():
        ours = model(ids, pixels).logits
        theirs = native(input_ids=ids, pixel_values=native_inputs(model, native, pixels)).logits
    V = ours.shape[-1]
    assert theirs.shape[-1] == len(model.tokenizer) >= V  # the image token's row added
    torch.testing.assert_close(theirs[..., :V], ours, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("projector", NATIVE)
def test_native_logits_match(tiny_cfg, projector):
    model = tiny_model(tiny_cfg, projector)
    native = to_native(model)
    assert isinstance(native, NATIVE[projector][0])
    same_logits(model, native, torch.randint(0, 256, (2, *model.vision.pixel_shape), dtype=torch.uint8))


def test_native_merges_adapters(tiny_cfg):
    model = tiny_model(tiny_cfg, "mlp", phase="lora", init_from="x", lora_vision=True)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init: the merge would change nothing
            torch.nn.init.normal_(p, std=0.1)
    # merged, W + BA rounds otherwise than Wx + B(Ax) does (1.4e-5 apart on the tiny LM)
    same_logits(model, to_native(model), torch.randint(0, 256, (1, *model.vision.pixel_shape), dtype=torch.uint8),
                atol=1e-4)


def test_pixel_unshuffle_is_idefics3_pixel_shuffle():
    x = torch.randn(2, 36, 5)
    for factor in (1, 2, 3):
        assert torch.equal(pixel_unshuffle(x, factor), Idefics3Connector.pixel_shuffle(None, x, factor))


@pytest.mark.parametrize("projector", NATIVE)
def test_native_export_loads_without_remote_code(tiny_cfg, tmp_path, projector):
    model = tiny_model(tiny_cfg, projector)
    native_export(model, tmp_path)
    native = NATIVE[projector][0].from_pretrained(tmp_path, trust_remote_code=False)
    same_logits(model, native, torch.randint(0, 256, (1, *model.vision.pixel_shape), dtype=torch.uint8))


def test_llava_processor_makes_our_inputs(tiny_cfg, tmp_path):
    model = tiny_model(tiny_cfg, "mlp")
    native_export(model, tmp_path)
    processor = LlavaProcessor.from_pretrained(tmp_path)
    text = processor.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    image = Image.new("RGB", (48, 64), (200, 30, 90))
    inputs = processor(text=text, images=image, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == encode_prompt(model.tokenizer, DEFAULT_PROMPT, model.n_image_tokens)
    native = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    expected = native_inputs(model, native, image_pixels(model.processor, [image]))
    torch.testing.assert_close(inputs["pixel_values"], expected, atol=1e-6, rtol=0)


def test_swiglu_and_mismatched_layers_are_refused(tiny_cfg):
    with pytest.raises(ValueError, match="--projector mlp"):
        to_native(VLM.from_config(tiny_cfg))
    with pytest.raises(ValueError, match="--vision_feature_layer -2"):
        to_native(tiny_model(tiny_cfg, "mlp", vision_feature_layer=-1))
    with pytest.raises(ValueError, match="--vision_feature_layer -1"):
        to_native(tiny_model(tiny_cfg, "linear", vision_feature_layer=-2))


def test_mlp_needs_every_patch(tiny_cfg):
    with pytest.raises(ConfigError, match="--pixel_unshuffle 1"):
        dataclasses.replace(tiny_cfg, projector="mlp").validate()


@pytest.mark.parametrize("projector", NATIVE)
def test_one_training_step_then_native(tiny_cfg, projector, tmp_path):
    """Trained by the loop, written by `generate.py --native`, loaded by transformers' own class."""
    cfg = dataclasses.replace(tiny_cfg, projector=projector, max_steps=1, **NATIVE[projector][1])
    assert loop.train(cfg)["step"] == 1
    generate_main(["--checkpoint", cfg.out_dir, "--native", str(tmp_path / "native")])
    model = checkpoint.load_model(cfg.out_dir)
    native = NATIVE[projector][0].from_pretrained(tmp_path / "native")
    same_logits(model, native, torch.randint(0, 256, (1, *model.vision.pixel_shape), dtype=torch.uint8))
