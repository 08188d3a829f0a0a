"""Robustness: bad data is skipped and counted while odd-but-valid data is used; a bad config stops before
anything loads; non-finite losses and out-of-memory errors never lose work; one run per out_dir. (Crashes and
stop signals: test_stops.py.)"""
import dataclasses
import io
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import ExifTags, Image, ImageDraw
from safetensors.torch import load_file

from training import checkpoint
import main
from training import loop
from conftest import REPO, cli_args, log_lines, same, steps_saved, trainable_params
from data.loading import open_data
from data.packing import PackedBatchSampler
from data.llava import (ImageStore, LlavaDataset, SkipTally, beyond_chance, decode_image, load_records,
                        split_indices)
from models.config import ConfigError
from training.checkpoint import WEIGHTS
from training.distributed import skips_over_ranks
from models.vlm import VLM

# ============================================================================ bad data
USED = "used"
PROMPT = "<image>\nDescribe the image."
CAPTION = "a red circle at the center ."
EXOTIC = "a 🦄 שלום e\u0301 ."  # emoji, right-to-left script, a combining accent
LONG = " ".join([CAPTION] * 60)  # far over max_text_tokens
NON_UTF8 = "NON_UTF8_HERE"  # replaced by invalid UTF-8 bytes in chat.json
DROP = object()  # a record field left out
REASONS = ("missing_image", "empty_image_file", "corrupt_image", "image_too_large", "bad_text", "malformed_record",
           "empty_reply", "no_image_token", "several_image_tokens", "longer_than_max_text_tokens", "no_target_tokens",
           "image_token_without_image")
# every skip reason there is, but "unreadable_image" (no permission, an I/O error: not to be had as root)


def encoded(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def too_large_png():
    """A 1x1 PNG whose header claims 30000 x 30000 pixels: PIL refuses it at open (decompression bomb)."""
    data = bytearray(encoded(Image.new("L", (1, 1))))
    struct.pack_into(">II", data, 16, 30000, 30000)  # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # the chunk's CRC over type + data
    return bytes(data)


def record(name, user=PROMPT, reply=CAPTION, **fields):
    """A good record, but for `fields` (DROP leaves one out); its image file is NAME.img."""
    r = {"id": name, "image": f"{name}.img",
         "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": reply}], **fields}
    return {k: v for k, v in r.items() if v is not DROP}


def bad_cases():
    """[(name, expected outcome: USED or the skip reason, chat.json record, bytes of NAME.img or None)]."""
    rgb = Image.new("RGB", (48, 40), (30, 30, 30))
    ImageDraw.Draw(rgb).ellipse((10, 8, 38, 32), fill=(220, 40, 40))
    jpeg = encoded(rgb, "JPEG")
    rgba = rgb.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (24, 0, 48, 40))  # a fully transparent right half: white after conversion
    i16 = Image.fromarray((np.arange(48 * 40, dtype=np.uint16) * 30).reshape(40, 48))
    assert Image.open(io.BytesIO(encoded(i16))).mode == "I;16"
    turns = [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": CAPTION}]
    cases = [  # (name, expected, image, changes to the good record)
        ("missing_file", "missing_image", None, {}),
        ("truncated_jpeg", "corrupt_image", jpeg[: len(jpeg) // 2], {}),
        ("garbage_jpeg", "corrupt_image", random.Random(0).randbytes(3000), {}),
        ("zero_bytes", "empty_image_file", b"", {}),
        ("decompression_bomb", "image_too_large", too_large_png(), {}),
        ("cmyk", USED, encoded(rgb.convert("CMYK"), "JPEG"), {}),
        ("grayscale_L", USED, encoded(rgb.convert("L")), {}),
        ("16bit_I16", USED, encoded(i16), {}),
        ("rgba", USED, encoded(rgba), {}),
        ("palette_P", USED, encoded(rgb.convert("P")), {}),
        ("palette_P_transparency", USED, encoded(rgb.convert("P"), transparency=0), {}),
        ("1x1", USED, encoded(Image.new("RGB", (1, 1), (200, 10, 10))), {}),
        ("20000x2", USED, encoded(Image.new("RGB", (20000, 2), (200, 10, 10))), {}),
        ("exotic_unicode", USED, jpeg, dict(reply=EXOTIC)),
        ("non_utf8_bytes", USED, jpeg, dict(reply=f"a {NON_UTF8} circle .")),
        ("overlong_caption", "longer_than_max_text_tokens", jpeg, dict(reply=LONG)),
        ("lone_surrogate_id", USED, jpeg, dict(id="id\ud800")),
        ("lone_surrogate", "bad_text", jpeg, dict(reply="a red \ud800 circle .")),
        ("empty_caption", "empty_reply", jpeg, dict(reply="")),
        ("blank_caption", "empty_reply", jpeg, dict(reply=" \n ")),
        ("no_image_token", "no_image_token", jpeg, dict(user="Describe the image.")),
        ("two_image_tokens", "several_image_tokens", jpeg, dict(user="<image>\n<image>\nDescribe.")),
        ("image_after_max_text", "longer_than_max_text_tokens", jpeg,
         dict(user="Describe the image in detail. " * 30 + "<image>")),
        ("reply_cut_off", "longer_than_max_text_tokens", jpeg, dict(user="<image>\n" + "Describe the image in detail. " * 30)),
        ("no_reply", "no_target_tokens", jpeg, dict(conversations=[{"from": "human", "value": "<image>\nDescribe."}])),
        ("no_image_key", "image_token_without_image", jpeg, dict(image=DROP)),  # text-only, yet <image> in it
        ("no_conversations_key", "malformed_record", jpeg, dict(conversations=DROP)),
        ("conversations_is_int", "malformed_record", jpeg, dict(conversations=7)),
        ("image_is_list", "malformed_record", jpeg, dict(image=["a.img", "b.img"])),
        ("unknown_role", "malformed_record", jpeg, dict(conversations=[{"from": "robot", "value": PROMPT}, turns[1]])),
        ("turn_is_a_string", "malformed_record", jpeg, dict(conversations=[turns[0], "hi"])),
        ("reply_is_null", "malformed_record", jpeg, dict(reply=None)),
        ("image_name_with_nul", "missing_image", jpeg, dict(image="bad\x00name.img")),
        ("image_name_lone_surrogate", "missing_image", jpeg, dict(image="\ud800.img")),
        ("image_is_a_device", "missing_image", jpeg, dict(image="/dev/null")),  # a FIFO would block: no file
    ]
    return [(name, expect, record(name, **changes), image) for name, expect, image, changes in cases] \
        + [("record_is_a_string", "malformed_record", "just a string", None)]


def write_chat_json(path, records):
    """Real UTF-8 for valid text, a JSON escape for lone surrogates, and raw invalid UTF-8 bytes."""
    raw = json.dumps(records, ensure_ascii=False).encode("utf-8", "backslashreplace")
    Path(path).write_bytes(raw.replace(NON_UTF8.encode(), b"caf\xe9 \xff\xfe"))


def shapes(tiny_assets, n):
    """The first n records of the shapes data set and their JPEG bytes."""
    records = json.loads(Path(tiny_assets.data_dir, "chat.json").read_text())[:n]
    with zipfile.ZipFile(Path(tiny_assets.data_dir, "images.zip")) as zf:
        return records, {r["image"]: zf.read(r["image"]) for r in records}


def write_dataset(root, records, images, store="zip"):
    """A LLaVA-format data set: chat.json plus images.zip (or an images/ folder)."""
    root.mkdir(parents=True, exist_ok=True)
    write_chat_json(root / "chat.json", records)
    if store == "zip":
        with zipfile.ZipFile(root / "images.zip", "w") as zf:
            for name, data in images.items():
                zf.writestr(name, data)
    else:
        (root / "images").mkdir()
        for name, data in images.items():
            (root / "images" / name).write_bytes(data)
    return root


def bad_dataset(tiny_assets, root, n_good=0, store="zip", good_at=()):
    """Every bad case after n_good good shapes records, but with good ones at the positions `good_at`;
    returns (root, expected outcome per record)."""
    good, images = shapes(tiny_assets, n_good)
    cases = bad_cases()
    images.update({f"{name}.img": data for name, _, _, data in cases if data is not None})
    rows = [(r, USED) for r in good] + [(r, expect) for _, expect, r, _ in cases]
    spare = (i for i in range(n_good) if i not in good_at)
    for i in good_at:
        if rows[i][1] != USED:
            j = next(spare)
            rows[i], rows[j] = rows[j], rows[i]
    write_dataset(root, [r for r, _ in rows], images, store)
    return root, [expect for _, expect in rows]


def llava_dataset(cfg, model, root):
    records = load_records(root / "chat.json")
    return LlavaDataset(records, list(range(len(records))), ImageStore(root), model.tokenizer, model.processor,
                        model.n_image_tokens, cfg.max_text_tokens)


def trained_text(model, item):
    return model.tokenizer.decode([t for t in item["labels"].tolist() if t >= 0])


@pytest.mark.parametrize("store", ["zip", "folder"])
def test_each_bad_record_is_used_or_skipped_with_its_reason(tiny_assets, tiny_cfg, tmp_path, store):
    model = VLM.from_config(tiny_cfg)
    root, expected = bad_dataset(tiny_assets, tmp_path / "data", store=store)
    data = llava_dataset(tiny_cfg, model, root)
    size = model.processor.size["height"]
    got = {}
    for i, (name, expect, _, _) in enumerate(bad_cases()):
        item = data[i]
        got[name] = item.get("skip", USED)
        item["id"].encode("utf-8")  # every id is printable, whatever the record held
        if "skip" in item:
            continue
        assert item["pixel_values"].shape == (3, size, size) and item["pixel_values"].dtype == torch.uint8
        assert item["pixel_values"].float().std() > 0, name  # not a blank image (16-bit is rescaled, not clipped)
        assert len(item["input_ids"]) == len(item["labels"]) <= tiny_cfg.max_text_tokens + model.n_image_tokens
        text = trained_text(model, item)
        if name == "rgba":  # the transparent half is composited over white
            assert (item["pixel_values"][:, :, -size // 4:] >= 250).all()
        if name == "exotic_unicode":
            assert text == EXOTIC + "<|im_end|>"
        if name == "non_utf8_bytes":
            assert text == "a caf\ufffd \ufffd\ufffd circle .<|im_end|>"
        if name == "lone_surrogate_id":
            assert item["id"] == "id\\ud800"
    assert got == {name: expect for name, expect, _, _ in bad_cases()}


# what the length pass finds from the text and the image's presence alone: left out before training
FOUND_BEFORE_LOADING = {"missing_image", "longer_than_max_text_tokens", "bad_text", "malformed_record"}


def test_training_on_bad_data_uses_what_it_can_and_counts_the_rest(tiny_assets, tiny_cfg, tmp_path):
    """One whole epoch (every usable training record seen once, in worker processes): the records left out before
    training and the samples skipped while loading are counted exactly, each once."""
    val_size, batch_size = 4, 8
    outcomes = Counter(expect for _, expect, _, _ in bad_cases() if expect != USED)
    unusable = Counter({k: n for k, n in outcomes.items() if k in FOUND_BEFORE_LOADING})
    n_cases, n_trained = len(bad_cases()), len(bad_cases()) - unusable.total() - val_size
    n_good = 16 + (-(16 + n_trained)) % batch_size  # the training records left fill whole batches
    train_idx, val_idx = split_indices(n_good + n_cases, val_size)
    root, expected = bad_dataset(tiny_assets, tmp_path / "data", n_good, good_at=val_idx)  # all bad ones train
    cfg = dataclasses.replace(tiny_cfg, data_dir=str(root), val_size=val_size, batch_size=batch_size, epochs=1,
                              max_bad_fraction=0.9, num_workers=2, eval_captions=4)
    result = loop.train(cfg)
    assert result["step"] == (len(train_idx) - unusable.total()) // batch_size == (n_good + n_trained) // batch_size
    assert result["unusable"] == dict(unusable) and result["skipped"] == dict(outcomes - unusable)
    assert set(outcomes) == set(REASONS)  # every reason, each exactly
    assert all(np.isfinite(loss) for _, loss in result["losses"]) and np.isfinite(result["val_loss"])


def test_a_corrupt_member_of_images_zip_is_skipped(tiny_assets, tiny_cfg, tmp_path):
    """A bit flipped inside images.zip (a bad CRC on read) costs that one record, not the run."""
    records, images = shapes(tiny_assets, 2)
    root = write_dataset(tmp_path / "d", records, images)
    with zipfile.ZipFile(root / "images.zip") as zf:
        info = zf.getinfo(records[0]["image"])
    data = bytearray((root / "images.zip").read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF  # into the member's bytes
    (root / "images.zip").write_bytes(data)
    items = llava_dataset(tiny_cfg, VLM.from_config(tiny_cfg), root)
    assert items[0]["skip"] == "corrupt_image" and "skip" not in items[1]


def test_a_photo_taken_sideways_is_turned_upright():
    """Cameras store a portrait photo as landscape pixels with an EXIF orientation tag (6: turn 90 degrees
    clockwise to view); training and generate.py both decode through decode_image."""
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # the left half red
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    image = decode_image(encoded(stored, "JPEG", exif=exif))
    red_at_top, blue_at_bottom = image.getpixel((10, 5))[0], image.getpixel((10, 35))[2]
    assert image.size == (20, 40) and red_at_top > 200 and blue_at_bottom > 200  # the left half is now on top


@pytest.mark.parametrize("text", ['[{"id": "shape_000000", "image": "shape_000000.jpg", "conv', '{"records": []}'],
                         ids=["truncated", "not_a_list"])
def test_an_unreadable_chat_json_stops_with_a_data_error(tiny_assets, tiny_cfg, tmp_path, text):
    records, images = shapes(tiny_assets, 2)
    root = write_dataset(tmp_path / "d", records, images)
    (root / "chat.json").write_text(text)
    with pytest.raises(SystemExit, match="error: .*chat.json"):  # a message, not a traceback
        main.main(cli_args(tiny_cfg, data_dir=root))


def shapes_with_missing_images(tiny_assets, root, bad):
    """The shapes data set with the images of records `bad` (indices) missing."""
    records, images = shapes(tiny_assets, 160)
    for i in bad:
        images.pop(records[i]["image"])
    return str(write_dataset(root, records, images))


def test_data_with_nothing_usable_stops_naming_examples(tiny_assets, tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, data_dir=shapes_with_missing_images(tiny_assets, tmp_path / "d", range(160)))
    with pytest.raises(loop.DataError, match=r"missing_image.*shape_\d{6}"):
        loop.train(cfg)


def test_a_few_missing_images_are_left_out_and_too_many_stop_before_the_model_loads(tiny_assets, tiny_cfg, tmp_path,
                                                                                    monkeypatch, capsys):
    """The length pass knows every missing image before the model loads: 3% of them (under the default 5% limit) are
    left out and said in one line; 30% stop the run there, whatever order the records train in."""
    few = shapes_with_missing_images(tiny_assets, tmp_path / "few", range(0, 160, 32))  # 5 of 160
    result = loop.train(dataclasses.replace(tiny_cfg, data_dir=few, max_steps=3))
    assert result["step"] == 3 and result["unusable"] == {"missing_image": 5} and result["skipped"] == {}
    assert "data: 5 of 160 records unusable ({'missing_image': 5}), left out of training and validation: using the " \
           "other 155" in capsys.readouterr().out

    many = shapes_with_missing_images(tiny_assets, tmp_path / "many", [i for i in range(160) if i % 10 < 3])
    forbid_loading(monkeypatch)
    with pytest.raises(loop.DataError, match=r"^48 of 160 records are unusable \({'missing_image': 48}\), more than "
                                             r"max_bad_fraction=0.05; for example \['shape_000000', "):
        loop.train(dataclasses.replace(tiny_cfg, data_dir=many, out_dir=str(tmp_path / "many_run")))


def shapes_with_corrupt_images(tiny_assets, root, bad):
    """The shapes data set with the images of records `bad` (indices) corrupt: found unusable only when loaded."""
    records, images = shapes(tiny_assets, 160)
    for i in bad:
        images[records[i]["image"]] = b"not a JPEG"
    return str(write_dataset(root, records, images))


def first_micro_batch(n, cfg):
    """The records of the first micro-batch of n, while samples (not tokens) bind, as in tiny_cfg."""
    return PackedBatchSampler([1] * n, cfg.batch_size, cfg.batch_tokens, seed=cfg.seed).first_epoch[0]


def test_a_bad_first_batch_alone_does_not_stop_a_mostly_good_run(tiny_assets, tiny_cfg, tmp_path):
    """8 corrupt images of 144 (max_bad_fraction 0.5) happen to make up the first batch: that is no reason
    to stop, just as the same records spread over the epoch are none."""
    train_idx, _ = split_indices(160, tiny_cfg.val_size)
    first_batch = first_micro_batch(len(train_idx), tiny_cfg)
    bad = [train_idx[j] for j in first_batch]
    cfg = dataclasses.replace(tiny_cfg, data_dir=shapes_with_corrupt_images(tiny_assets, tmp_path / "d", bad),
                              max_bad_fraction=0.5, max_steps=3)
    assert loop.train(cfg)["skipped"] == {"corrupt_image": 8}


def test_data_found_bad_while_loading_stops_once_that_cannot_be_chance(tiny_assets, tiny_cfg, tmp_path):
    """Corrupt images are found only when loaded: 30% of them stop the default 5% limit within a few steps, once
    the count is beyond chance, not at the first unusable sample."""
    bad = [i for i in range(160) if i % 10 < 3]
    cfg = dataclasses.replace(tiny_cfg, data_dir=shapes_with_corrupt_images(tiny_assets, tmp_path / "d", bad))
    with pytest.raises(loop.DataError, match=r"corrupt_image.*more than max_bad_fraction=0.05 beyond chance") as e:
        loop.train(cfg)
    bad, seen = map(int, re.match(r"(\d+) of the first (\d+) ", str(e.value)).groups())
    assert beyond_chance(bad, seen, 0.05) and cfg.batch_size < seen <= 10 * cfg.batch_size


def test_the_running_check_never_stops_3_percent_for_a_5_percent_limit_and_soon_stops_10():
    """SkipTally.check at every sample of simulated runs: unusable samples drawn at random at a given rate."""
    def first_stop(rate, seed, n=20_000):
        rng, bad = random.Random(seed), 0
        for seen in range(1, n + 1):
            bad += rng.random() < rate
            if bad and beyond_chance(bad, seen, 0.05):
                return seen
    assert all(first_stop(0.03, seed) is None for seed in range(20))
    assert all(first_stop(0.10, seed) < 2_000 for seed in range(20))
    assert not beyond_chance(10, 167, 0.05)  # the first step of a run that stopped on 3% missing images


# ============================================================================ bad configuration
def forbid_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model or data set was loaded before the config was checked")
    monkeypatch.setattr(VLM, "from_config", forbidden)
    monkeypatch.setattr(loop, "build_data", forbidden)


BAD_CONFIGS = {  # id: (the field the error must name, the change; p holds a checkpoint and paths)
    "unknown_phase": ("phase", lambda p: dict(phase="finetune")),
    "lora_r_zero": ("lora_r", lambda p: dict(lora_r=0)),
    "lora_r_negative_in_lora_phase": ("lora_r", lambda p: dict(lora_r=-4, phase="lora", init_from=p.checkpoint)),
    "projector_lr_zero": ("projector_lr", lambda p: dict(projector_lr=0.0)),
    "lora_lr_negative": ("lora_lr", lambda p: dict(lora_lr=-1e-4)),
    "lora_targets_match_nothing": ("lora_targets", lambda p: dict(phase="lora", init_from=p.checkpoint,
                                                                  lora_targets=("nope",))),
    "pixel_unshuffle_not_dividing": ("pixel_unshuffle", lambda p: dict(pixel_unshuffle=3)),  # a 4x4 patch grid
    "missing_data_dir": ("data_dir", lambda p: dict(data_dir=str(p.tmp / "no_such_dir"))),
    "lora_without_init_from": ("init_from", lambda p: dict(phase="lora")),
    "missing_init_from": ("init_from", lambda p: dict(phase="lora", init_from=str(p.tmp / "no_such_checkpoint"))),
    "checkpoint_of_another_lm": ("lm_model", lambda p: dict(phase="lora", init_from=p.checkpoint,
                                                            lm_model=p.other_lm)),
    "checkpoint_of_another_projector": ("projector_hidden_dim", lambda p: dict(phase="lora", init_from=p.checkpoint,
                                                                               projector_hidden_dim=32)),
}


@pytest.mark.parametrize("field, changes", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_bad_config_stops_before_anything_loads(tiny_cfg, tiny_assets, tmp_path, monkeypatch, field, changes):
    projector = tmp_path / "projector"
    checkpoint.save_model(VLM.from_config(tiny_cfg), projector)  # a projector-phase checkpoint, tiny backbones
    other_lm = shutil.copytree(tiny_assets.lm, tmp_path / "other_lm")  # the same LM, under another name
    cfg = dataclasses.replace(tiny_cfg, **changes(SimpleNamespace(checkpoint=str(projector), other_lm=str(other_lm),
                                                                  tmp=tmp_path)))
    forbid_loading(monkeypatch)
    with pytest.raises(ConfigError, match=f"'{field}'"):
        loop.train(cfg)
    with pytest.raises(SystemExit, match=f"error: .*'{field}'"):  # the command line says the same, no traceback
        main.main(cli_args(cfg))


# ============================================================================ non-finite losses, out of memory
def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def spy_optimizer_steps(on_optimizer_step):
    """Records (weights changed?, finite?) for every optimizer step."""
    calls, before = [], []

    def snapshot(optimizer):
        before[:] = [p.detach().clone() for p in trainable_params(optimizer)]

    def compare(optimizer):
        changed = any(not torch.equal(b, p) for b, p in zip(before, trainable_params(optimizer)))
        calls.append((changed, not bool(optimizer.found_inf)))
    on_optimizer_step(snapshot, "before")
    on_optimizer_step(compare, "after")
    return calls


def on_projector_forward(monkeypatch, action):
    """Runs action(call_number, output) -> output after each forward of the projector of every model the loop builds."""
    real, calls = loop.build_model, []

    def build(*args):
        model = real(*args)
        model.projector.register_forward_hook(lambda module, args, out: (calls.append(1), action(len(calls), out))[1])
        return model
    monkeypatch.setattr(loop, "build_model", build)


def test_non_finite_steps_are_skipped_and_counted(tiny_cfg, monkeypatch, on_optimizer_step):
    on_projector_forward(monkeypatch, lambda call, out: out * float("nan") if call in (2, 3) else out)
    steps, lrs = spy_optimizer_steps(on_optimizer_step), []
    on_optimizer_step(lambda optimizer: lrs.append(optimizer.param_groups[0]["lr"]))
    cfg = dataclasses.replace(tiny_cfg, max_steps=5, max_bad_steps=3)
    result = loop.train(cfg)
    assert result["step"] == 5
    assert steps == [(True, True), (False, False), (False, False), (True, True), (True, True)]
    log = [json.loads(line) for line in open(Path(cfg.out_dir) / "log.jsonl") if '"bad_steps"' in line]
    assert [entry["bad_steps"] for entry in log] == [0, 1, 2, 2, 2]
    # a skipped step does not poison the logged loss: an interval of skipped steps alone has none
    assert [entry["loss"] is None or np.isfinite(entry["loss"]) and "ok" for entry in log] == ["ok", True, True, "ok", "ok"]
    # the schedule follows the updates applied: steps 2 and 3 are skipped, so steps 2-4 all get the rate of
    # update 1, and each log line shows the rate its step used
    schedule = transformers.get_cosine_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1)], lr=cfg.projector_lr), round(cfg.warmup_frac * 5), 5).lr_lambdas[0]
    expected = [cfg.projector_lr * schedule(applied) for applied in (0, 1, 1, 1, 2)]
    assert lrs == pytest.approx(expected) and [entry["lr"] for entry in log] == pytest.approx(expected)


def test_skip_counts_are_summed_over_ranks(tmp_path):
    """Each rank tallies its own records; the log line and the run's result report the sum (2 gloo processes)."""
    torch.multiprocessing.spawn(_sum_skips, args=(str(tmp_path),), nprocs=2)
    expected = [5, {"bad_text": 1, "missing_image": 3}, 3]
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [expected] * 2


def _sum_skips(rank, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    mine = SkipTally(seen=2 + rank, skipped={"missing_image": 1 + rank, **({"bad_text": 1} if rank else {})},
                     truncated=1 + rank)
    seen, skipped, truncated = skips_over_ranks(mine)
    Path(out_dir, f"{rank}.json").write_text(json.dumps([seen, dict(sorted(skipped.items())), truncated]))
    torch.distributed.destroy_process_group()


def test_non_finite_steps_in_a_row_stop_the_run_with_a_checkpoint(tiny_cfg, monkeypatch, on_optimizer_step):
    real, start = loop.build_model, {}

    def inf_projector(*args):
        model = real(*args)
        with torch.no_grad():
            model.projector.down.weight[0, 0] = float("inf")
        start.update(trainable(model))
        return model
    monkeypatch.setattr(loop, "build_model", inf_projector)
    steps = spy_optimizer_steps(on_optimizer_step)
    cfg = dataclasses.replace(tiny_cfg, max_steps=10, max_bad_steps=3)
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss") as e:
        loop.train(cfg)
    path = Path(cfg.out_dir) / "step_00000003"
    assert str(path) in str(e.value) and steps == [(False, False)] * 3
    assert same(load_file(str(path / WEIGHTS)), start)  # saved, and never stepped on NaN


def raise_out_of_memory(*args):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("where", ["forward", "optimizer_step"])
def test_out_of_memory_names_batch_size_and_grad_accum(tiny_cfg, monkeypatch, on_optimizer_step, where):
    """Out of memory at step 2, in the forward or in the optimizer's step: a message that says what to change,
    and nothing of the failed step was applied or saved."""
    if where == "forward":
        on_projector_forward(monkeypatch, lambda call, out: raise_out_of_memory() if call == 2 else out)
    steps = spy_optimizer_steps(on_optimizer_step)
    if where == "optimizer_step":
        on_optimizer_step(lambda optimizer: raise_out_of_memory() if len(steps) == 1 else None)
    cfg = dataclasses.replace(tiny_cfg, max_steps=4, save_every=1)
    with pytest.raises(RuntimeError, match=r"batch_tokens=544.*--grad_accum"):
        loop.train(cfg)
    assert steps == [(True, True)]  # the step that ran out of memory did not update anything
    assert [p.name for p in Path(cfg.out_dir).glob("step_*")] == ["step_00000001"]


# ============================================================================ one run per out_dir
def test_a_new_run_refuses_an_out_dir_that_holds_another_and_deletes_nothing(tiny_cfg, monkeypatch):
    """The issue's twin run: --resume false into the folder of a longer run used to lose every new checkpoint to
    the old run's rotation. It stops before anything loads, naming what is there and the ways out."""
    first = dataclasses.replace(tiny_cfg, max_steps=4, save_every=1)
    loop.train(first)
    before = {p.name: (p / WEIGHTS).read_bytes() for p in Path(first.out_dir).glob("step_*")}
    log = (Path(first.out_dir) / "log.jsonl").read_text()
    (Path(first.out_dir) / ".lock").write_text("pid 4242\n")  # as the first run, in a process of its own, left it
    forbid_loading(monkeypatch)
    with pytest.raises(ConfigError, match=r"holds another run \(step_00000003, step_00000004, log.jsonl\).*"
                                          r"leave out --resume false.*new --out_dir.*--init_from"):
        loop.train(dataclasses.replace(first, max_steps=2, projector_lr=3e-3, resume=False))
    assert {p.name: (p / WEIGHTS).read_bytes() for p in Path(first.out_dir).glob("step_*")} == before
    assert (Path(first.out_dir) / "log.jsonl").read_text() == log
    assert (Path(first.out_dir) / ".lock").read_text() == "pid 4242\n"  # the refused run wrote nothing, there either


def test_rotation_removes_only_checkpoints_of_the_run_that_saves(tiny_cfg, tmp_path):
    model = VLM.from_config(tiny_cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    out = tmp_path / "run"
    state = {"step": 80, "run_id": "other", "data": {}, "data_identity": {}}
    checkpoint.save(out, model, optimizer, scheduler, state, 0, keep_last=2)
    (out / "step_00000090").mkdir()  # one of an older tinyvlm (no run.json): whose it is, nobody knows
    for step in (1, 2, 3):
        checkpoint.save(out, model, optimizer, scheduler, {**state, "step": step, "run_id": "mine"}, 0, keep_last=2)
    assert steps_saved(out) == [2, 3, 80, 90]
    assert checkpoint.run_info(out / "step_00000003")["run_id"] == "mine"
    assert oct((out / "step_00000003" / WEIGHTS).stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


@pytest.mark.parametrize("damage", ["emptied", "missing"])
def test_resume_passes_over_an_incomplete_newest_checkpoint_and_says_so(tiny_cfg, damage):
    """A power loss after the rename can leave the newest checkpoint's files empty (or gone), with the older ones
    already rotated away: resuming takes the one before it, warns naming it, and saves its step again."""
    cfg = dataclasses.replace(tiny_cfg, max_steps=3, save_every=1, keep_last=2)
    loop.train(cfg)
    out, broken = Path(cfg.out_dir), Path(cfg.out_dir) / "step_00000003"
    for f in broken.iterdir():
        f.write_bytes(b"") if damage == "emptied" else f.unlink() if f.name == "train_state.pt" else None
    why = "empty config.json, rng_0.pt, run.json" if damage == "emptied" else "no train_state.pt"
    with pytest.warns(UserWarning, match=f"skipping checkpoint {broken}: {why}"):
        assert checkpoint.newest(out) == out / "step_00000002"
    with pytest.warns(UserWarning, match=f"skipping checkpoint {broken}"):
        assert loop.train(cfg)["checkpoint"] == broken
    assert steps_saved(out) == [2, 3] and not checkpoint.incomplete(broken)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_two_trainings_cannot_share_an_out_dir_and_a_dead_ones_lock_does_not_block(tiny_cfg, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, max_steps=1)
    with checkpoint.OutDir(cfg, rank=0):  # a training that holds the folder (a lock per open file: even this process)
        forbid_loading(monkeypatch)
        with pytest.raises(ConfigError, match=rf"another training \(pid {os.getpid()}\) is writing to"):
            loop.train(cfg)
    monkeypatch.undo()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(Path(cfg.out_dir) / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    holder.kill()  # a training killed with SIGKILL: the OS releases its lock
    holder.wait()
    assert loop.train(cfg)["step"] == 1


def test_a_stopped_phase_stops_the_demo_with_the_signals_exit_code(tiny_cfg, monkeypatch):
    """Ctrl-C in phase 1 used to go on to phase 2 on a half-trained projector and exit 0."""
    from training import demo
    phases = []

    def stopped_training(cfg):
        phases.append(cfg.phase)
        raise loop.Stopped(signal.SIGINT, 7, Path(cfg.out_dir) / "step_00000007")
    monkeypatch.setattr(demo, "train", stopped_training)
    monkeypatch.setattr(demo, "prepare", lambda cfg: cfg)
    with pytest.raises(SystemExit) as e:
        loop.run_command(lambda: demo.run(tiny_cfg))
    assert e.value.code == 130 and phases == ["projector"]


# ============================================================================ mistakes answered before slow work
def truncated_zip(tiny_assets, tmp_path):
    root = shutil.copytree(tiny_assets.data_dir, tmp_path / "truncated")
    data = (root / "images.zip").read_bytes()
    (root / "images.zip").write_bytes(data[: len(data) // 2])
    return root


DATA_MISTAKES = {  # id: (what the message must say, the change)
    "empty_chat_json": ("holds no|is empty", lambda p: dict(data_dir=str(p.empty))),
    "val_size_too_large": (r"--val_size 1000 leaves no training data in a data set of 160 records; lower --val_size",
                           lambda p: dict(val_size=1000)),
    "truncated_images_zip": ("is not a readable zip", lambda p: dict(data_dir=str(p.truncated))),
    "cuda_without_a_gpu": ("'device' = 'cuda', but torch sees no CUDA GPU", lambda p: dict(device="cuda")),
    "grad_accum_over_an_epoch": ("'grad_accum' = 100", lambda p: dict(grad_accum=100)),
}


@pytest.mark.parametrize("message, changes", DATA_MISTAKES.values(), ids=DATA_MISTAKES.keys())
def test_data_and_device_mistakes_stop_in_one_line_before_the_model_loads(tiny_cfg, tiny_assets, tmp_path,
                                                                          monkeypatch, message, changes):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    empty = tmp_path / "empty"
    shutil.copytree(tiny_assets.data_dir, empty)
    (empty / "chat.json").write_text("[]")
    cfg = dataclasses.replace(tiny_cfg, **changes(SimpleNamespace(empty=empty, truncated=truncated_zip(tiny_assets, tmp_path))))
    monkeypatch.setattr(VLM, "from_config", lambda *a: pytest.fail("the model loaded before the data was checked"))
    with pytest.raises(SystemExit, match=f"^error: .*({message})") as e:
        main.main(cli_args(cfg))
    assert "\n" not in str(e.value.code)


@pytest.mark.parametrize("script, flags, message", [
    ("main.py", ["--phase", "lorra"], "'phase' = 'lorra'"),
    ("main.py", ["--batch_size", "-4"], "'batch_size' = -4"),
    ("main.py", ["--projector_lr", "-1"], "'projector_lr' = -1.0"),
    ("main.py", ["--data_dir", "/nonexistent"], "'data_dir' = '/nonexistent'"),
    ("demo.py", ["--epochs", "-1"], "'epochs' = -1"),
    ("demo.py", ["--data_dir", "/nonexistent"], "'data_dir' = '/nonexistent'"),
])
def test_a_bad_flag_is_named_before_the_hub_or_any_training(tmp_path, script, flags, message):
    """With the default hub backbones and no hub, a typo'd value used to get the hub's error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, script, *flags, "--out_dir", str(tmp_path / "run")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and message in out.stderr and "Hub" not in out.stderr, out.stderr
    assert "== phase" not in out.stdout and len(out.stderr.strip().splitlines()) == 1


def test_a_bad_data_dir_is_named_before_torch_is_imported(tiny_assets, tmp_path):
    """A data mistake was said 12-39 s in, after the imports of torch and transformers, where a flag's mistake
    takes under a second: main.py checks a user's data before them."""
    empty = shutil.copytree(tiny_assets.data_dir, tmp_path / "empty")
    (empty / "chat.json").write_text("")
    message = f"{empty / 'chat.json'} must hold a JSON array of LLaVA records, and it is empty"
    check = ("import sys; from data.download import DataError, check_data_dir; from models.config import VLMConfig\n"
             f"try:\n    check_data_dir(VLMConfig(data_dir={str(empty)!r}))\nexcept DataError as e:\n    print(e)\n"
             "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == message + "\n", out.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # its default backbones: no hub
    out = subprocess.run([sys.executable, "main.py", "--data_dir", str(empty), "--out_dir", str(tmp_path / "run")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr == f"error: {message}\n"


@pytest.mark.parametrize("script, flags, message", [
    ("generate.py", ["--chekpoint", "ckpt", "photo.jpg"], "unknown flag --chekpoint; did you mean --checkpoint?"),
    ("eval.py", ["--checkpoint", "ckpt", "--data-dir", "data"], "unknown flag --data-dir; did you mean --data_dir?"),
    ("app.py", ["--checkpoint", "ckpt", "--prot", "8000"], "unknown flag --prot; did you mean --port?"),
])
def test_a_scripts_unknown_flag_names_the_closest_one(script, flags, message):
    """generate.py --chekpoint said only that --checkpoint was missing; main.py's flags named the closest."""
    out = subprocess.run([sys.executable, script, *flags], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.endswith(f"error: {message}\n"), out.stderr


# ============================================================================ what the log and the result say
def test_a_run_stopped_for_non_finite_steps_can_go_on(tiny_cfg, monkeypatch):
    """Resuming retries (the saved streak no longer stops it at once), and the message's way to a lower rate, a new
    run from the checkpoint, trains from its weights."""
    on_projector_forward(monkeypatch, lambda call, out: out * float("nan") if call in (2, 3, 4) else out)
    cfg = dataclasses.replace(tiny_cfg, max_steps=6, max_bad_steps=3)
    with pytest.raises(RuntimeError, match=r"--init_from \S+step_00000004 --out_dir \S+-lower-lr and a lower "
                                           r"--projector_lr") as e:
        loop.train(cfg)
    assert "resuming this run retries" in str(e.value)
    assert loop.train(cfg)["step"] == 6  # its next steps are finite: it goes on
    saved = load_file(str(Path(cfg.out_dir) / "step_00000004" / WEIGHTS))
    lower = dataclasses.replace(cfg, init_from=str(Path(cfg.out_dir) / "step_00000004"),
                                out_dir=cfg.out_dir + "-lower-lr", projector_lr=cfg.projector_lr / 10, max_steps=2)
    starts, build_optimizer = [], loop.build_optimizer
    monkeypatch.setattr(loop, "build_optimizer", lambda c, model: (starts.append(trainable(model)),
                                                                   build_optimizer(c, model))[1])
    assert loop.train(lower)["step"] == 2
    assert same(starts[0], saved)


def test_a_step_with_no_usable_sample_logs_no_loss_and_a_short_bad_run_is_called_out(tiny_cfg, tiny_assets, tmp_path,
                                                                                   capsys):
    """80% corrupt images in a run too short for the stop check (SkipTally.check) to rule out chance at a 0.5 limit."""
    train_idx, _ = split_indices(160, tiny_cfg.val_size)
    first = [train_idx[j] for j in first_micro_batch(len(train_idx), tiny_cfg)]
    bad = first + [i for i in train_idx if i not in first][:100]  # the first batch wholly, then most others
    cfg = dataclasses.replace(tiny_cfg, data_dir=shapes_with_corrupt_images(tiny_assets, tmp_path / "d", bad),
                              max_steps=3, max_bad_fraction=0.5)
    result = loop.train(cfg)
    assert result["losses"][0] == (1, None)
    out = capsys.readouterr().out
    assert "step      1/3 | loss - |" in out
    assert "more than max_bad_fraction=0.5; the run did not stop for it because so few samples could be chance" in out
    assert json.loads(log_lines(cfg.out_dir)[0])["loss"] is None


def test_the_validation_split_does_not_depend_on_the_seed(tiny_cfg):
    """Phase 2 with another --seed must not train on phase 1's held-out records."""
    tokenizer = loop.load_tokenizer(tiny_cfg)
    splits = [open_data(dataclasses.replace(tiny_cfg, seed=seed), tokenizer, 0, 1)["val_idx"] for seed in (0, 1, 7)]
    assert splits[0] == splits[1] == splits[2] and len(splits[0]) == tiny_cfg.val_size


def test_fewer_validation_records_than_processes_is_refused_before_the_model_loads(tiny_cfg):
    """Each process validates its share of the held-out records; a sharded model's (the full phase's) every forward
    needs all of them, so a process with none would stop the run at its first evaluation, minutes in. Said at the
    start instead. Data parallel runs (the other phases) sum the processes' losses, and one with none is fine."""
    tokenizer = loop.load_tokenizer(tiny_cfg)
    full = dataclasses.replace(tiny_cfg, phase="full")
    with pytest.raises(ConfigError, match="raise val_size to at least 4"):
        open_data(dataclasses.replace(full, val_size=3), tokenizer, 0, 4)
    assert len(open_data(dataclasses.replace(full, val_size=4), tokenizer, 3, 4)["val_idx"]) == 1
    assert open_data(dataclasses.replace(full, val_size=0), tokenizer, 3, 4)["val_idx"] == []
    assert open_data(dataclasses.replace(tiny_cfg, val_size=3), tokenizer, 3, 4)["val_idx"] == []


def test_wandb_logs_a_resumed_run_into_the_same_wandb_run(tiny_cfg, monkeypatch):
    import wandb
    inits = []
    monkeypatch.setattr(wandb, "init", lambda **kw: inits.append(kw) or SimpleNamespace(log=lambda *a, **k: None,
                                                                                        finish=lambda: None))
    cfg = dataclasses.replace(tiny_cfg, wandb_project="p", max_steps=1)
    loop.train(cfg)
    loop.train(cfg)  # resumes (a finished run: it reports and returns)
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert inits[0]["id"] == checkpoint.run_info(Path(cfg.out_dir) / "step_00000001")["run_id"]
