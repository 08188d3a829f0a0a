"""The length pass at the real data's size: every record's length from its text, many records tokenized in one call
(LlavaDataset.text_lengths), is what the per-record path gives, reasons included, for every family's template and
the real SmolLM2 tokenizer; the lengths are kept between starts (data/length_cache.py): a second start, a resume
or another rank reads them, and new data, another tokenizer, another max_text_tokens or a damaged file computes
them anew."""
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data import download
from data.download import file_sha256
from data.length_cache import cache_path, length_key
from data.llava import ImageStore, LlavaDataset, checked_messages, load_records, parse_record
from data.loading import open_data, with_images
from data.packing import text_lengths
from models.prompt import IMAGE_TOKEN, SampleError, encoded_length, prepare_tokenizer
from models.smollm2 import smollm2_dir
from models.tiny import build_tokenizer
from models.vlm import load_tokenizer

N_IMAGE = 49
CAPTION = "Actor attends the premiere of \"The Film\" (2019) in New York, NY — 3 days later!"
LONG = " ".join(["a red circle at the center of a white field ."] * 12)


def turns(*texts):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def image(i, *texts):
    return {"id": f"r{i}", "image": f"img_{i}.jpg", "conversations": turns(*texts)}


# Records that take every path of the length pass: each kind of text, kept, cut at a turn's end or skipped for
# max_text_tokens, and each way a record is malformed, fits, or fails only once encoded
RECORDS = [
    image(0, f"{IMAGE_TOKEN}\nProvide a brief description of the given image.", "a red circle at the center ."),
    image(1, f"Write a terse summary of the picture.\n{IMAGE_TOKEN}", CAPTION),
    image(2, f"{IMAGE_TOKEN}\nDécris l'image, s'il te plaît.", " un cercle rouge 🟥 au centre, 中心\n(2 lines) "),
    image(3, f"{IMAGE_TOKEN}\nWhat is it?", "a square .", "Where?", "top left .", "Colour?", "blue .",
          "Size?", "small .", "Sure?", "yes ."),  # cut at the end of a turn
    image(4, f"{IMAGE_TOKEN}\nDescribe it.", LONG, "And again?", LONG),  # cut after its first turn, or skipped
    image(5, f"{IMAGE_TOKEN}\nDescribe it in detail.", LONG + LONG),  # its first reply alone is too long
    image(6, "Hello.", "Hi, what should I look at?", f"This: {IMAGE_TOKEN}\nWhat is it?", CAPTION, "Sure?", LONG),
    {"id": "text", "conversations": turns("What color is a ripe banana?", "yellow .", "And grass?", "green .")},
    {"id": "text_long", "conversations": turns("Tell me a story.", LONG + LONG)},
    image(9, "Describe the image.", CAPTION),  # no <image>: found when loaded, or when encoded if too long
    image(10, "Describe the image.", LONG + LONG),
    image(11, f"{IMAGE_TOKEN}\nDescribe it.", "   "),  # an empty reply
    image(12, f"{IMAGE_TOKEN}\nDescribe it.", LONG + LONG, "x", "   "),
    {"id": "gpt_first", "image": "img_13.jpg", "conversations": turns("", "x")[1:] + turns(f"{IMAGE_TOKEN} hi")},
    {"id": "gpt_first_long", "conversations": [{"from": "gpt", "value": LONG + LONG}]},
    {"id": "text_with_image_token", "conversations": turns(f"{IMAGE_TOKEN}\n" + LONG, LONG)},
    ["not", "an", "object"],
    "a string",
    {"id": "image_not_a_name", "image": 5, "conversations": turns(IMAGE_TOKEN, "x")},
    {"id": "no_conversations", "image": "img_19.jpg"},
    {"id": "conversations_not_a_list", "conversations": "hi"},
    {"id": "no_turns", "conversations": []},
    {"id": "unknown_role", "conversations": [{"from": "system", "value": "x"}]},
    {"id": "non_text_turn", "conversations": [{"from": "human", "value": 3}]},
    {"id": "lone_surrogate", "conversations": turns("What is \ud800?", "nothing .")},
    image(25, f"{IMAGE_TOKEN}\nWhat is \udfff?", "x"),  # its image is missing too: that wins
    {"id": "image_name_not_text", "image": "\ud800.jpg", "conversations": turns(IMAGE_TOKEN, "x")},
]
PRESENT = {f"img_{i}.jpg" for i in range(25)} - {"img_3.jpg"}  # one image record without its image


def per_record(tokenizer, text, max_text_tokens):
    """The length pass one record at a time, as it was: the record parsed, then encoded_length's own rendering."""
    try:
        record = parse_record(text)
        messages = checked_messages(record.get("conversations"))
        return encoded_length(tokenizer, messages, N_IMAGE, max_text_tokens, has_image="image" in record), None
    except SampleError as e:
        return 0, e.reason


@pytest.fixture(scope="module")
def chat_json(tmp_path_factory):
    root = tmp_path_factory.mktemp("varied")
    (root / "images").mkdir()
    for name in PRESENT:
        (root / "images" / name).write_bytes(b"")  # only looked up, never read
    (root / "chat.json").write_text(json.dumps(RECORDS))
    return root / "chat.json"


@pytest.fixture(scope="module", params=["llama", "llama3", "phi", "phi3", "smollm2"])
def tokenizer(request):
    """Each family's template (ChatML with a system prompt, Llama 3's headers, Phi-2's plain one, Phi-3's tags) on a
    tiny BPE, and the real SmolLM2's tokenizer."""
    if request.param == "smollm2":
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    else:
        tokenizer = build_tokenizer([CAPTION, LONG, "What is in this picture?"], request.param)
    prepare_tokenizer(tokenizer)
    return tokenizer


def test_the_batched_length_pass_gives_the_per_record_lengths_and_reasons(chat_json, tokenizer):
    records = load_records(chat_json)
    reasons, cut = set(), 0
    for max_text_tokens in (None, 100, 60, 30):
        dataset = LlavaDataset(records, range(len(records)), None, tokenizer, None, N_IMAGE, max_text_tokens)
        expected = [per_record(tokenizer, text, max_text_tokens) for text in records["record"]]
        assert dataset.text_lengths(range(len(records))) == expected
        assert dataset.text_lengths([7, 0, 16]) == [expected[7], expected[0], expected[16]]  # any records, any order
        assert text_lengths(dataset, num_workers=0) == expected  # in the DataLoader's batches
        reasons |= {reason for _, reason in expected}
        cut += sum(0 < n < per_record(tokenizer, text, None)[0] for (n, _), text in zip(expected, records["record"]))
    # every reason the text gives, those only `encode` finds (of records too long to plan without it) among them
    assert reasons == {None, "malformed_record", "bad_text", "longer_than_max_text_tokens", "no_image_token",
                       "empty_reply", "image_token_without_image"}
    assert cut  # and samples cut at a turn's end
    found = with_images(expected, records["image"], ImageStore(chat_json.parent))
    assert found[3] == found[25] == found[26] == (0, "missing_image")  # before a reason of the text
    assert found[:3] == expected[:3] and found[16:20] == expected[16:20]  # a malformed record's image is not looked up


def test_the_length_pass_in_worker_processes_gives_the_same(chat_json):
    tokenizer = build_tokenizer([CAPTION, LONG], "llama")
    prepare_tokenizer(tokenizer)
    records = load_records(chat_json)
    dataset = LlavaDataset(records, range(len(records)), None, tokenizer, None, N_IMAGE, 30)
    assert text_lengths(dataset, num_workers=2) == text_lengths(dataset, num_workers=0)


@pytest.fixture
def tokenized(monkeypatch):
    """How many records the length pass tokenized, counted as it runs."""
    count = [0]
    real = LlavaDataset.text_lengths

    def counting(self, indices):
        count[0] += len(indices)
        return real(self, indices)
    monkeypatch.setattr(LlavaDataset, "text_lengths", counting)
    return count


def kept_files(cfg):
    return list((Path(cfg.cache_dir) / "lengths").iterdir())


def opened(cfg, tokenizer, tokenized, rank=0, world=1):
    """(what open_data gives that the run depends on, records tokenized on the way)"""
    before = tokenized[0]
    data = open_data(cfg, tokenizer, rank, world)
    plan = {"train": data["train_idx"], "val": data["val_idx"], "batches": data["sampler"].first_epoch,
            "val_batches": data["val_batches"], "unusable": data["unusable"]}
    return plan, tokenized[0] - before


def test_a_second_start_a_resume_and_another_rank_read_the_kept_lengths(tiny_cfg, tokenized):
    tokenizer = load_tokenizer(tiny_cfg)
    first, n = opened(tiny_cfg, tokenizer, tokenized)
    assert n == 160 and len(kept_files(tiny_cfg)) == 1
    assert opened(tiny_cfg, tokenizer, tokenized) == (first, 0)
    assert opened(tiny_cfg, load_tokenizer(tiny_cfg), tokenized) == (first, 0)  # the same tokenizer, loaded again
    other_rank, n = opened(tiny_cfg, tokenizer, tokenized, rank=1, world=2)
    assert n == 0 and other_rank["batches"] == first["batches"][1::2][:len(other_rank["batches"])]
    assert len(kept_files(tiny_cfg)) == 1  # no temporary file left


def test_other_data_another_tokenizer_or_max_text_tokens_compute_the_lengths_anew(tiny_cfg, tokenized, tmp_path):
    tokenizer = load_tokenizer(tiny_cfg)
    first, _ = opened(tiny_cfg, tokenizer, tokenized)
    assert opened(dataclasses.replace(tiny_cfg, max_text_tokens=63), tokenizer, tokenized)[1] == 160
    records = json.loads(Path(tiny_cfg.data_dir, "chat.json").read_text())
    moved = tmp_path / "chat.json"
    moved.write_text(json.dumps(records))
    assert opened(dataclasses.replace(tiny_cfg, chat_json=str(moved)), tokenizer, tokenized) == (first, 0)  # same bytes
    records[0]["conversations"][1]["value"] += " again"
    moved.write_text(json.dumps(records))
    assert opened(dataclasses.replace(tiny_cfg, chat_json=str(moved)), tokenizer, tokenized)[1] == 160

    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")  # the same name
    assert opened(tiny_cfg, tokenizer, tokenized)[1] == 160
    other = load_tokenizer(tiny_cfg)
    other.add_tokens(["<other>"])  # a vocabulary of one more token
    assert opened(tiny_cfg, other, tokenized)[1] == 160


def test_a_damaged_or_unwritable_cache_is_recomputed(tiny_cfg, tokenized, capsys):
    tokenizer = load_tokenizer(tiny_cfg)
    first, _ = opened(tiny_cfg, tokenizer, tokenized)
    (path,) = kept_files(tiny_cfg)
    whole = path.read_text()
    lengths = json.loads(whole)["lengths"]
    for damaged in (whole[:len(whole) // 2], "", "[]", whole.replace(json.dumps(lengths), json.dumps(lengths[1:])),
                    whole.replace(json.dumps(lengths), json.dumps([str(n) for n in lengths]))):
        path.write_text(damaged)
        assert opened(tiny_cfg, tokenizer, tokenized) == (first, 160)
        assert path.read_text() == whole  # written anew
    unwritable = dataclasses.replace(tiny_cfg, cache_dir=str(path))  # a file where its folder would go
    assert opened(unwritable, tokenizer, tokenized) == (first, 160)
    assert "could not keep the records' lengths" in capsys.readouterr().out


def test_the_key_names_the_data_the_tokenizer_and_the_settings(tiny_cfg):
    tokenizer = load_tokenizer(tiny_cfg)
    key = length_key("ab" * 32, tokenizer, N_IMAGE, 64)
    assert key == length_key("ab" * 32, load_tokenizer(tiny_cfg), N_IMAGE, 64)
    assert (key["tokenizer"], key["n_image_tokens"], key["max_text_tokens"]) == (tiny_cfg.lm_model, N_IMAGE, 64)
    assert key != length_key("ab" * 32, tokenizer, N_IMAGE + 1, 64)
    assert cache_path("~/x", key).name.startswith("abab") and cache_path("~/x", key).parent.name == "lengths"


def test_a_file_is_hashed_once_while_it_stays_as_it_was(tmp_path, monkeypatch):
    """A resume checks chat.json against its checkpoint, then open_data records it: one read. A file just written
    is read again every time: a rewrite within one tick of the filesystem's clock keeps its size and time."""
    reads = []
    monkeypatch.setattr(download, "open", lambda *a: reads.append(a[0]) or open(*a), raising=False)
    path = tmp_path / "chat.json"
    path.write_text("[1]")
    fresh = file_sha256(path)
    path.write_text("[2]")
    assert file_sha256(path) != fresh and len(reads) == 2
    old = time.time() - 60
    os.utime(path, (old, old))
    assert file_sha256(path) == file_sha256(path) and len(reads) == 3
    shutil.copy2(path, tmp_path / "copy.json")  # another file, the same bytes
    assert file_sha256(tmp_path / "copy.json") == file_sha256(path) and len(reads) == 4
