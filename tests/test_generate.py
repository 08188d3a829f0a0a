"""Generation: KV cache, batching, per-sequence end-of-turn, LoRA merge and export, the generate.py CLI."""
import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import checkpoint
import generate
from conftest import REPO
from data.shapes import draw
from models.decode import STOP_CHECK
from models.lora import lora_layers, strip_lora
from models.prompt import DEFAULT_PROMPT, encode_prompt
from training.checkpoint import load_model, save_model
from models.vision import image_pixels
from models.vlm import VLM
from training.captioning import load_image
from training.export import export

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


def greedy_without_cache(model, pixel_values, max_new_tokens):
    """Greedy decoding without a KV cache, the oracle of the cache: every step runs the whole sequence through the
    model, then each row is cut at its end-of-turn."""
    ids = torch.tensor([encode_prompt(model.tokenizer, DEFAULT_PROMPT, model.n_image_tokens)] * len(pixel_values),
                       device=pixel_values.device)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, model(ids, pixel_values).logits[:, -1:].argmax(-1)], dim=1)
    eot = model.tokenizer.eos_token_id
    new = [row[-max_new_tokens:] for row in ids.tolist()]
    return [model.tokenizer.decode(row[:row.index(eot)] if eot in row else row, skip_special_tokens=True).strip()
            for row in new]


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
    assert 7 <= calls < 7 + STOP_CHECK  # decoding ends soon after the last sequence (the host looks every few tokens)
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


def test_export_merges_a_bf16_lm_in_fp32(tiny_cfg, tiny_assets, tmp_path):
    """transformers loads an LM in its saved dtype (the hub's SmolLM2 is bf16). Adding a small adapter update to
    bf16 weights rounds most of it away; export merges, and saves, in fp32."""
    lm = tmp_path / "lm_bf16"
    AutoModelForCausalLM.from_pretrained(tiny_assets.lm, dtype=torch.bfloat16).save_pretrained(lm)
    AutoTokenizer.from_pretrained(tiny_assets.lm).save_pretrained(lm)
    model = tiny_model(tiny_cfg, phase="lora", lm_model=str(lm)).eval()
    assert next(model.lm.parameters()).dtype == torch.bfloat16
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=1e-4)  # an update ~1/3000 of the weights; bf16 resolves 1/256
    ids = torch.tensor([encode_prompt(model.tokenizer, DEFAULT_PROMPT, model.n_image_tokens)] * len(SHAPES))

    def logits(m):  # in fp32: bf16 weights are exact in fp32, so only the merge's rounding differs
        with torch.no_grad():
            return m.float()(ids, pixels(m)).logits

    reference = logits(copy.deepcopy(model))  # the adapters unmerged: the checkpoint's own math
    without_update = copy.deepcopy(model)
    for layer in lora_layers(without_update):
        torch.nn.init.zeros_(layer.lora_B)
    update = (reference - logits(without_update)).abs().max()
    bf16_merge = copy.deepcopy(model)
    strip_lora(bf16_merge.lm)  # W + BA rounded to bf16, as a merge in the loaded dtype does
    export(model, tmp_path / "export")
    merged = load_model(tmp_path / "export").eval()
    assert next(merged.lm.parameters()).dtype == torch.float32  # saved, and so reloaded, in fp32
    # fp32: W + BA rounds differently from W x + B A x, by up to a few 1e-6 of the logits' scale (~7 here)
    atol = 1e-5 * reference.abs().max()
    torch.testing.assert_close(logits(merged), reference, rtol=0, atol=atol)
    lost = (logits(bf16_merge) - reference).abs().max()
    assert lost > 100 * atol and lost > update / 2  # a bf16 merge would miss by most of the update


# --- the command line ---
def write_images(folder):
    """Every awkward kind of input: alpha, grayscale (an upper-case suffix), palette, 16-bit, 1x1, a text file
    named as an image, and a text file named as one. Returns what generate.py reads of the folder, in its order."""
    folder.mkdir()
    files = {"rgba.png": SHAPES[0].convert("RGBA"), "gray.JPG": SHAPES[1].convert("L"),
             "palette.png": SHAPES[2].convert("P"), "dot.png": Image.new("RGB", (1, 1), (200, 30, 30)),
             "deep.png": Image.fromarray((np.arange(64 * 48, dtype=np.uint16) * 20).reshape(48, 64))}
    for name, image in files.items():
        image.save(folder / name)
    assert Image.open(folder / "deep.png").mode.startswith("I")
    (folder / "broken.png").write_text("not an image")
    (folder / "notes.txt").write_text("not an image either, and not named as one")
    return sorted(folder / name for name in [*files, "broken.png"])


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
def test_cli_captions_a_folder_image_by_image_and_reports_bad_files(lora_checkpoint, tmp_path):
    model, run_dir = lora_checkpoint
    files = write_images(tmp_path / "images")
    out = generate_cli("--checkpoint", run_dir, "--batch_size", 2, tmp_path / "images")
    assert out.returncode != 0
    good = [f for f in files if f.name != "broken.png"]
    expected = model.generate(pixels(model, [load_image(f) for f in good]))
    assert captions(out) == {str(f): " ".join(c.split()) for f, c in zip(good, expected)}
    assert list(captions(out)) == [str(f) for f in good]  # in the folder's sorted order
    assert "broken.png" in out.stderr and "notes.txt" not in out.stderr and "1 of 6" in out.stderr
    assert f"loaded checkpoint {run_dir / 'step_00000001'}" in out.stderr  # the run dir's newest step, named


def refused(argv, monkeypatch, capsys):
    """generate.py's usage error for argv, given before any model loads."""
    monkeypatch.setattr(checkpoint, "load_model", lambda *a: pytest.fail("loaded the model before refusing"))
    with pytest.raises(SystemExit):
        generate.main(list(map(str, argv)))
    return capsys.readouterr().err.splitlines()[-1]


def test_image_paths_are_checked_before_the_model_loads(lora_checkpoint, tmp_path, monkeypatch, capsys):
    run_dir = lora_checkpoint[1]
    files = write_images(tmp_path / "images")
    args = generate.parse_args(["--checkpoint", str(run_dir), str(files[-1]), str(tmp_path / "images")])
    assert args.images == [str(files[-1])] + [str(f) for f in files]  # a folder stands for its image files
    (tmp_path / "empty").mkdir()
    for path, said in ((tmp_path / "missing.jpg", "missing.jpg: no such file or folder"),
                       (tmp_path / "empty", "empty: a folder without image files")):
        assert said in refused(["--checkpoint", run_dir, files[0], path], monkeypatch, capsys)


def test_export_refuses_a_file_and_a_folder_that_is_not_an_export(lora_checkpoint, tmp_path, monkeypatch, capsys):
    _, run_dir = lora_checkpoint
    (tmp_path / "file").write_text("someone's")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.md").write_text("someone's")
    assert "that is a file" in refused(["--checkpoint", run_dir, "--export", tmp_path / "file"], monkeypatch, capsys)
    assert "not a previous export, holding notes.md" in refused(
        ["--checkpoint", run_dir, "--export", tmp_path / "work"], monkeypatch, capsys)
    assert (tmp_path / "work" / "notes.md").read_text() == (tmp_path / "file").read_text() == "someone's"


def test_export_replaces_a_previous_export_and_carries_run_json(lora_checkpoint, tmp_path, capsys):
    step = lora_checkpoint[1] / "step_00000001"
    run = {"run_id": "abc", "data": {"chat_json": "/data/chat.json", "sha256": "0" * 64, "records": 160}}
    (step / checkpoint.RUN_INFO).write_text(json.dumps(run))
    out = tmp_path / "merged"
    out.mkdir()  # an empty folder is fine
    generate.main(["--checkpoint", str(lora_checkpoint[1]), "--export", str(out)])
    assert f"loaded checkpoint {step}" in capsys.readouterr().err
    (out / "lm" / "stale.bin").write_text("left by the previous export")
    generate.main(["--checkpoint", str(step), "--export", str(out)])
    assert not (out / "lm" / "stale.bin").exists()  # replaced, not mixed with the new one
    assert checkpoint.run_info(out) == run  # what eval.py reads to know the data it trained on
    assert not lora_layers(load_model(out))


@pytest.mark.slow
def test_cli_without_images_is_a_usage_error(lora_checkpoint):
    out = generate_cli("--checkpoint", lora_checkpoint[1])
    assert out.returncode != 0 and "usage:" in out.stderr and "no images" in out.stderr


@pytest.mark.slow
def test_cli_export_captions_like_the_adapters(lora_checkpoint, tmp_path):
    files = write_images(tmp_path / "images")[1:4]  # three that read
    with_adapters = generate_cli("--checkpoint", lora_checkpoint[1], "--export", tmp_path / "merged", *files)
    merged = generate_cli("--checkpoint", tmp_path / "merged", *files)
    assert with_adapters.returncode == merged.returncode == 0, with_adapters.stderr + merged.stderr
    assert len(captions(merged)) == 3 and captions(merged) == captions(with_adapters)
