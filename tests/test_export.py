"""The export loads without this repo: transformers' AutoModelForImageTextToText, AutoProcessor and the
image-text-to-text pipeline (trust_remote_code) give tinyvlm's logits and captions, in a process that cannot import
the repo."""
import dataclasses
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from data.shapes import corpus, draw
from training.export import export
from models.lora import lora_layers
from models.prompt import encode_prompt
from models.smollm2 import smollm2_dir
from models.tiny import build_lm
from models.vision import image_pixels
from models.vlm import VLM
from training.checkpoint import load_model, save_model

# Run outside the repo (cwd and sys.path): what a user with only transformers installed does.
OUTSIDE = r'''
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
try:
    import models
    sys.exit("the repo's models package is importable here")
except ImportError:
    pass
image, prompt, *folders = sys.argv[1:]
image = Image.open(image)
for i, folder in enumerate(folders):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    out = model.generate(**inputs, max_new_tokens=12)
    caption = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    text = processor.apply_chat_template(chat, tokenize=False)
    by_call = processor(images=image, text=text)
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    piped = pipe(text=chat, max_new_tokens=12, return_full_text=False)[0]["generated_text"].strip()
    save_file({"logits": logits.contiguous(), "input_ids": inputs["input_ids"], "by_call": by_call["input_ids"],
               "pixel_values": inputs["pixel_values"]}, f"out_{i}.safetensors")
    print(json.dumps({"caption": caption, "piped": piped}), flush=True)
'''


def load_outside(folders, image, prompt, tmp_path):
    """Run OUTSIDE once (transformers imported once) at tmp_path: per folder, (its tensors, its captions)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                        "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", OUTSIDE, str(image), prompt, *map(str, folders)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    captions = [json.loads(line) for line in done.stdout.strip().splitlines()[-len(folders):]]
    return [(load_file(tmp_path / f"out_{i}.safetensors"), c) for i, c in enumerate(captions)]


def exported(cfg, tmp_path, **overrides):
    """A checkpoint of the tiny VLM with random non-zero projector (and adapters), exported to tmp_path/export."""
    model = VLM.from_config(dataclasses.replace(cfg, **overrides))
    torch.nn.init.normal_(model.projector.down.weight, std=0.5)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    save_model(model, tmp_path / "ckpt")
    export(load_model(tmp_path / "ckpt"), tmp_path / "export", source=tmp_path / "ckpt")
    return tmp_path / "export"


def check_outside(folders, tmp_path, prompt="Describe the image."):
    """Each export, loaded by tinyvlm and by transformers alone, gives the same logits (fp32) and captions."""
    image = tmp_path / "shape.png"
    draw("red", "circle", "top left").save(image)
    for folder, (outside, captions) in zip(folders, load_outside(folders, image, prompt, tmp_path)):
        model = load_model(folder).eval()
        pixels = image_pixels(model.processor, [draw("red", "circle", "top left")])
        ids = torch.tensor([encode_prompt(model.tokenizer, prompt, model.n_image_tokens)])
        assert torch.equal(outside["input_ids"], ids) and torch.equal(outside["by_call"], ids), folder
        assert torch.equal(outside["pixel_values"], pixels)
        with torch.no_grad():
            logits = model(ids, pixels).logits
        torch.testing.assert_close(outside["logits"], logits, atol=1e-5, rtol=1e-5, msg=str(folder))
        caption = model.generate(pixels, prompt=prompt, max_new_tokens=12)[0]
        assert captions == {"caption": caption, "piped": caption}, folder


def test_exports_load_in_plain_transformers(tiny_cfg, tmp_path):
    """Every phase's checkpoint of the tiny VLM, every other LM family (their own templates and stop tokens), and
    the real SmolLM2 with its own tokenizer and ChatML template (its stop token <|im_end|>), LoRA merged: one
    process outside the repo loads them all."""
    folders = [exported(tiny_cfg, tmp_path / phase, phase=phase) for phase in ("projector", "lora", "full")]
    for family in ("llama3", "qwen2", "phi", "phi3"):
        torch.manual_seed(0)
        lm = build_lm(tmp_path / f"lm-{family}", corpus(), family, chat_template=family != "phi")
        folders.append(exported(dataclasses.replace(tiny_cfg, lm_model=str(lm)), tmp_path / family, phase="lora"))
    real = dataclasses.replace(tiny_cfg, lm_model=str(smollm2_dir()), max_text_tokens=96)
    check_outside(folders + [exported(real, tmp_path / "smollm2", phase="lora")], tmp_path)
