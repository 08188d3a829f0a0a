"""Instruction data for phase 2 (LLaVA-Instruct / llava_v1_5_mix665k.json format): multi-turn conversations, image
paths in subfolders of data_dir, text-only records that train the LM alone, and batches mixing them or holding no
image at all, in one process and under DDP."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import main
from training import loop
from conftest import REPO, cli_args, model_inputs, packer
from data.llava import ImageStore, LlavaDataset, load_records
from data.packing import image_slots
from data.shapes import draw
from models.config import VLMConfig
from models.prompt import IGNORE, SampleError, encode
from models.vlm import VLM
from training import speed

QUESTIONS = [("What color is a ripe banana?", "yellow ."), ("And grass?", "green .")]


def image_record(i, color, shape, place):
    folder = "coco/train2017" if i % 4 == 0 else "gqa/images"  # mix665k's layout: one folder per source
    return {"id": f"{i:012d}", "image": f"{folder}/{i:012d}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in this picture?"},
        {"from": "gpt", "value": f"a {color} {shape} ."},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": f"at the {place} ."}]}


def text_record(i):
    turns = [{"from": who, "value": text} for q, a in QUESTIONS for who, text in (("human", q), ("gpt", a))]
    return {"id": f"text_{i}", "conversations": turns}  # no "image" key, as mix665k's text-only records


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """data_dir (the images, in subfolders) and a 24-record json beside it, every other record text-only."""
    root = tmp_path_factory.mktemp("instruct")
    records = []
    for i in range(24):
        if i % 2:
            records.append(text_record(i))
            continue
        color, shape, place = ["red", "blue", "green"][i % 3], ["circle", "square"][i % 4 // 2], "center"
        records.append(image_record(i, color, shape, place))
        path = root / "images_root" / records[-1]["image"]
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(color, shape, place).save(path)
    (root / "mix.json").write_text(json.dumps(records))
    return dict(chat_json=str(root / "mix.json"), data_dir=str(root / "images_root"), records=records)


@pytest.fixture
def lora_model(tiny_cfg):
    return VLM.from_config(dataclasses.replace(tiny_cfg, phase="lora", init_from="x", lora_vision=True))


def samples(model, instruct, indices):
    data = LlavaDataset(load_records(instruct["chat_json"]), indices, ImageStore(instruct["data_dir"]),
                        model.tokenizer, model.processor, model.n_image_tokens, max_text_tokens=128)
    return [data[i] for i in range(len(indices))]


def trained_text(tokenizer, sample):
    return tokenizer.decode([t for t in sample["labels"].tolist() if t != IGNORE])


def test_image_and_text_only_records_train_every_reply(lora_model, instruct):
    image, text = samples(lora_model, instruct, [0, 1])
    tok, eot = lora_model.tokenizer, lora_model.tokenizer.eos_token  # ChatML: <|im_end|>
    assert trained_text(tok, image) == f"a red circle .{eot}at the center .{eot}"
    assert trained_text(tok, text) == f"yellow .{eot}green .{eot}"
    assert (image["input_ids"] == lora_model.image_token_id).sum() == lora_model.n_image_tokens
    assert image["pixel_values"].shape == lora_model.vision.pixel_shape
    assert "pixel_values" not in text and (text["input_ids"] != lora_model.image_token_id).all()


def test_an_image_token_without_an_image_is_refused(lora_model):
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a cat ."}]
    with pytest.raises(SampleError) as e:  # the loader skips and counts it: no image to fill the positions
        encode(lora_model.tokenizer, messages, lora_model.n_image_tokens, has_image=False)
    assert e.value.reason == "image_token_without_image"


def loss_sum(model, batch):
    return model(**model_inputs(batch)).loss_sum


def test_a_mixed_batch_is_its_samples_side_by_side(lora_model, instruct):
    """Images land in their own samples: the loss of [text, image, text] packed is the sum of each sample's alone."""
    collate = packer(lora_model)
    batch_samples = samples(lora_model, instruct, [1, 2, 3])
    with torch.no_grad():
        together = loss_sum(lora_model, collate(batch_samples))
        alone = sum(loss_sum(lora_model, collate([s])) for s in batch_samples)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_a_batch_without_images_sends_every_trainable_parameter_through_backward(lora_model, instruct):
    """DDP waits for a gradient of every trainable parameter: the tower and projector run on no image and give
    zeros (blank images placed nowhere), the LM's adapters learn."""
    batch = packer(lora_model)(samples(lora_model, instruct, [1, 3]))
    assert batch["n_images"] == 0 and batch["pixel_values"].shape == (image_slots(0, 8), *lora_model.vision.pixel_shape)
    loss_sum(lora_model, batch).backward()
    grads = {n: p.grad for n, p in lora_model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all((g == 0).all() for n, g in grads.items() if n.startswith(("projector.", "vision.")))
    assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("lm.") and n.endswith("lora_B"))


@pytest.fixture(scope="module")
def projector_checkpoint(tiny_assets, tmp_path_factory):
    cfg = VLMConfig(vision_model=tiny_assets.vision, lm_model=tiny_assets.lm, data_dir=tiny_assets.data_dir,
                    device="cpu", out_dir=str(tmp_path_factory.mktemp("projector")), projector_hidden_dim=64,
                    batch_size=8, batch_tokens=8 * 132, num_workers=0, val_size=8, max_steps=1, resume=False,
                    eval_captions=0)
    return loop.train(cfg)["checkpoint"]


def instruct_flags(instruct, checkpoint, out_dir):
    """The README's phase-2 command on an instruction file, batch 1: many micro-batches hold no image."""
    return ["--phase", "lora", "--init_from", str(checkpoint), "--chat_json", instruct["chat_json"],
            "--data_dir", instruct["data_dir"], "--out_dir", str(out_dir), "--batch_size", "1", "--batch_tokens", "132", "--grad_accum", "2",
            "--max_steps", "4", "--val_size", "4", "--lora_vision", "true"]


@pytest.mark.parametrize("flags", [["--chat_json", "missing.json", "--data_dir", "."],
                                   ["--chat_json", str(REPO / "README.md")]], ids=["missing_file", "no_data_dir"])
def test_a_bad_chat_json_is_refused_before_anything_loads(flags):
    with pytest.raises(SystemExit, match="config field 'chat_json'.*--data_dir"):
        main.main(flags)


def test_the_phase_2_command_trains_on_an_instruction_file(tiny_cfg, instruct, projector_checkpoint, tmp_path):
    fixed = ["--vision_model", tiny_cfg.vision_model, "--lm_model", tiny_cfg.lm_model, "--device", "cpu",
             "--projector_hidden_dim", "64", "--num_workers", "1", "--eval_captions", "2", "--log_every", "1"]
    out = main.main(instruct_flags(instruct, projector_checkpoint, tmp_path / "lora") + fixed)
    assert out["step"] == 4 and not out["skipped"]
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in out["losses"]) and out["val_loss"] is not None


@pytest.mark.slow
def test_ddp_ranks_with_and_without_images_in_a_step_train_together(tiny_cfg, instruct, projector_checkpoint, tmp_path):
    """2 ranks (gloo), batch 1: one rank's micro-batch often holds an image while the other's holds none."""
    flags = instruct_flags(instruct, projector_checkpoint, tmp_path / "ddp")
    base = [a for a in cli_args(tiny_cfg) if a.split("=")[0].lstrip("-") not in {f.lstrip("-") for f in flags[::2]}]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "main.py", *base, *flags], cwd=REPO, timeout=300, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ddp" / "step_00000004").is_dir()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_blocks_on_cuda_train_on_mixed_and_image_free_batches(tiny_cfg, instruct, projector_checkpoint,
                                                                        tmp_path):
    """Training with compile_blocks (static shapes, CUDA graphs) meets batches of 0, 1 and 2 images, and the
    compiled layers match eager on each."""
    flags = instruct_flags(instruct, projector_checkpoint, tmp_path / "cuda") + [
        "--vision_model", tiny_cfg.vision_model, "--lm_model", tiny_cfg.lm_model, "--device", "cuda",
        "--compile", "true", "--projector_hidden_dim", "64", "--num_workers", "1"]
    out = main.main(flags)
    assert out["step"] == 4 and all(torch.isfinite(torch.tensor(loss)) for _, loss in out["losses"])
    cfg = dataclasses.replace(tiny_cfg, phase="lora", init_from=str(projector_checkpoint), lora_vision=True,
                              device="cuda")
    eager = VLM.from_config(cfg).cuda().eval()
    compiled = VLM.from_config(cfg).cuda().eval()
    compiled.load_state_dict(eager.state_dict())
    speed.compile_blocks(compiled)
    collate = packer(eager)
    for indices in ([1, 3], [0, 1, 3], [0, 2]):  # no image, one of three, two of two
        batch = collate(samples(eager, instruct, indices))
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            torch.testing.assert_close(loss_sum(compiled, batch), loss_sum(eager, batch), rtol=1e-4, atol=1e-4)

