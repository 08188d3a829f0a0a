"""Generation: KV cache, batching, per-sequence end-of-turn, LoRA merge and export, the generate.py CLI."""
import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from conftest import REPO
from data.shapes import draw
from bench import greedy_without_cache
from generate import export, load_image
from models.lora import lora_layers
from models.prompt import DEFAULT_PROMPT, encode_prompt
from checkpoint import load_model, save_model
from models.vision import image_pixels
from models.vlm import VLM

SHAPES = [draw("red", "circle", "top left"), draw("blue", "square", "center"),
          draw("green", "triangle", "bottom right"), draw("white", "circle", "bottom left")]


def tiny_model(cfg, **overrides):
    """The tiny VLM with random non-zero projector and adapters, so that captions depend on the image."""
    model = VLM.from_config(dataclasses.replace(cfg, **overrides))
    torch.nn.init.normal_(model.projector.down.weight, std=0.5)
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def pixels(model, images=SHAPES):
    return image_pixels(model.processor, images)  # [B, 3, H, W] uint8


def test_kv_cache_gives_the_same_captions(tiny_cfg):
    model = tiny_model(tiny_cfg).eval()
    cached = model.generate(pixels(model), max_new_tokens=24)
    assert len(set(cached)) == len(SHAPES)  # the image matters
    assert cached == greedy_without_cache(model, pixels(model), max_new_tokens=24)


def test_a_batch_gives_the_captions_of_each_image_alone(tiny_cfg):
    model = tiny_model(tiny_cfg)
    alone = [model.generate(pixels(model, [image]))[0] for image in SHAPES]
    assert model.generate(pixels(model)) == alone


def test_each_sequence_stops_at_its_own_end_of_turn(tiny_cfg):
    """Steer the LM head: end-of-turn is banned, except at the step `stops` names for a row."""
    model = tiny_model(tiny_cfg)
    eot, px = model.tokenizer.eos_token_id, pixels(model, SHAPES[:2])

    def run(max_new_tokens, stops=None):
        calls = []

        def steer(module, args, logits):  # [B, T, V]; call k picks token k (prefill, then one per step)
            logits = logits.clone()
            logits[:, -1, eot] = -1e4
            for row, step in (stops or {}).items():
                if step == len(calls):
                    logits[row, -1, eot] = 1e4
            calls.append(1)
            return logits

        hook = model.lm.get_output_embeddings().register_forward_hook(steer)
        try:
            return model.generate(px, max_new_tokens=max_new_tokens), len(calls)
        finally:
            hook.remove()

    (first3, _), _ = run(3)
    (_, second6), _ = run(6)
    stopped, calls = run(16, stops={0: 3, 1: 6})
    assert stopped == [first3, second6]  # nothing after a row's end-of-turn is decoded
    assert len(first3) < len(second6)
    assert calls == 7  # decoding ends with the last sequence, not at max_new_tokens
    assert run(16)[1] == 16


@pytest.mark.parametrize("lora_vision, feature_layer", [(False, -1), (True, -2)])
def test_export_gives_the_logits_of_the_unmerged_adapters(tiny_cfg, tmp_path, lora_vision, feature_layer):
    model = tiny_model(tiny_cfg, phase="lora", lora_vision=lora_vision, vision_feature_layer=feature_layer).eval()
    ids = torch.tensor([encode_prompt(model.tokenizer, DEFAULT_PROMPT, model.n_image_tokens)] * len(SHAPES))
    text = ids[:, -6:]  # the assistant header: text tokens only, which a plain LM can read
    with torch.no_grad():
        logits, lm_logits = model(ids, pixels(model)).logits, model.lm(text).logits
    export(model, tmp_path / "export")
    shutil.move(tmp_path / "export", tmp_path / "moved")  # it names its backbones relative to itself
    merged = load_model(tmp_path / "moved").eval()
    assert merged.cfg.phase == "projector" and not lora_layers(merged)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "moved" / "lm")
    base = AutoModelForCausalLM.from_pretrained(tiny_cfg.lm_model)
    # fp32: W + BA rounds differently from W x + B A x, by up to a few 1e-6 of the logits' scale (~7 here)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, pixels(merged)).logits, logits, rtol=0, atol=1e-5 * logits.abs().max())
        torch.testing.assert_close(plain(text).logits, lm_logits, rtol=0, atol=1e-5 * lm_logits.abs().max())
        assert (base(text).logits - lm_logits).abs().max() > 1e-2  # the adapters did change the LM


# --- the command line ---
def write_images(folder):
    """Every awkward kind of input: alpha, grayscale, palette, 16-bit, 1x1, a missing file, a text file."""
    folder.mkdir()
    files = {"rgba.png": SHAPES[0].convert("RGBA"), "gray.jpg": SHAPES[1].convert("L"),
             "palette.png": SHAPES[2].convert("P"), "dot.png": Image.new("RGB", (1, 1), (200, 30, 30)),
             "deep.png": Image.fromarray((np.arange(64 * 48, dtype=np.uint16) * 20).reshape(48, 64))}
    for name, image in files.items():
        image.save(folder / name)
    assert Image.open(folder / "deep.png").mode.startswith("I")
    (folder / "notes.txt").write_text("not an image")
    return [folder / n for n in ("rgba.png", "missing.jpg", "gray.jpg", "notes.txt", "palette.png", "dot.png",
                                 "deep.png")]


def generate_cli(*args):
    return subprocess.run([sys.executable, "generate.py", *map(str, args)], cwd=REPO, capture_output=True,
                          encoding="utf-8", timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def captions(out):
    return dict(line.split("\t", 1) for line in out.stdout.splitlines())


@pytest.fixture
def lora_checkpoint(tiny_cfg, tmp_path):
    model = tiny_model(tiny_cfg, phase="lora")
    save_model(model, tmp_path / "run" / "step_00000001")
    return model, tmp_path / "run"


@pytest.mark.slow
def test_cli_captions_every_image_and_reports_bad_files(lora_checkpoint, tmp_path):
    model, run_dir = lora_checkpoint
    files = write_images(tmp_path / "images")
    out = generate_cli("--checkpoint", run_dir, "--batch_size", 2, *files)
    assert out.returncode != 0
    good = [f for f in files if f.name not in ("missing.jpg", "notes.txt")]
    expected = model.generate(pixels(model, [load_image(f) for f in good]))
    assert captions(out) == {str(f): " ".join(c.split()) for f, c in zip(good, expected)}
    assert "missing.jpg" in out.stderr and "notes.txt" in out.stderr and "2 of 7" in out.stderr


@pytest.mark.slow
def test_cli_without_images_is_a_usage_error(lora_checkpoint):
    out = generate_cli("--checkpoint", lora_checkpoint[1])
    assert out.returncode != 0 and "usage:" in out.stderr and "no images" in out.stderr


@pytest.mark.slow
def test_cli_export_captions_like_the_adapters(lora_checkpoint, tmp_path):
    files = write_images(tmp_path / "images")[4:]
    with_adapters = generate_cli("--checkpoint", lora_checkpoint[1], "--export", tmp_path / "merged", *files)
    merged = generate_cli("--checkpoint", tmp_path / "merged", *files)
    assert with_adapters.returncode == merged.returncode == 0, with_adapters.stderr + merged.stderr
    assert len(captions(merged)) == 3 and captions(merged) == captions(with_adapters)
