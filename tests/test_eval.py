"""Evaluation: training scores its validation captions at the end of a phase, eval.py scores a checkpoint the same
way into a JSON file (the held-out records of its own training data, or every record of another data set), and
every run draws curves.png."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from training import checkpoint
import eval as evaluation
from training import loop, scoring
from data.llava import data_identity, split_indices
from models.vlm import VLM

METRICS = {"cider", "bleu4", "rouge_l", "exact_match", "vqa_exact_match", "yes_no_accuracy", "yes_no_n"}


@pytest.mark.slow
def test_training_and_eval_py_score_the_same_held_out_captions(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, max_steps=2, metric_records=6)
    scores = loop.train(cfg)["caption_scores"]
    assert set(scores) == METRICS
    logged = [json.loads(line) for line in open(f"{cfg.out_dir}/log.jsonl")]
    assert {f"val_{k}": v for k, v in scores.items()}.items() <= logged[-1].items()  # into log.jsonl (and wandb)
    assert open(f"{cfg.out_dir}/curves.png", "rb").read(4) == b"\x89PNG"

    out = tmp_path / "eval.json"
    evaluation.main(["--checkpoint", cfg.out_dir, "--data_dir", cfg.data_dir, "--limit", "6", "--num_workers", "0",
                     "--device", "cpu", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["split"] == "val"  # auto: the run's run.json names this data
    assert written["metrics"] == pytest.approx(scores)  # the same records, model and metrics as training's
    assert written["n"] == len(written["predictions"]) == 6
    assert all(set(p) == {"id", "prompt", "prediction", "reference"} and p["reference"] for p in written["predictions"])
    assert all("<image>" not in p["prompt"] and p["prompt"] for p in written["predictions"])


def test_eval_py_refuses_a_folder_without_chat_json_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--checkpoint", str(tmp_path), "--data_dir", str(tmp_path)])
    assert "no chat.json there" in capsys.readouterr().err


# --- which records: the checkpoint's own data, or another data set ---
@pytest.fixture
def trained_on(tiny_cfg, tmp_path):
    """A checkpoint whose run.json says it trained on the tiny data set, as a training run's does."""
    path = tmp_path / "ckpt"
    checkpoint.save_model(VLM.from_config(tiny_cfg), path)
    chat_json = Path(tiny_cfg.data_dir) / "chat.json"
    n = len(json.loads(chat_json.read_text()))
    (path / checkpoint.RUN_INFO).write_text(json.dumps({"run_id": "test", "data": data_identity(chat_json, n)}))
    return path


def other_data(tiny_cfg, folder, records):
    """A data set of these records (dicts), with the tiny data set's images."""
    folder.mkdir()
    shutil.copy(Path(tiny_cfg.data_dir) / "images.zip", folder)
    (folder / "chat.json").write_text(json.dumps(records))
    return folder


def tiny_records(tiny_cfg):
    return json.loads((Path(tiny_cfg.data_dir) / "chat.json").read_text())


def run_eval(capsys, ckpt, data_dir, *args):
    """eval.py on CPU, in this process; returns what it printed."""
    evaluation.main(["--checkpoint", str(ckpt), "--data_dir", str(data_dir), "--num_workers", "0", "--device", "cpu",
                     *args])
    return capsys.readouterr().out


def data_id(data_dir):
    """The short id of a data set that other data's result files carry: its chat.json's sha256, 8 hex digits."""
    return data_identity(Path(data_dir) / "chat.json", 0)["sha256"][:8]


def refusal(monkeypatch, ckpt, data_dir, *args):
    """eval.py's one-line error, given before any model loads."""
    monkeypatch.setattr(checkpoint, "load_model", lambda *a: pytest.fail("loaded the model before refusing"))
    with pytest.raises(SystemExit) as e:
        evaluation.main(["--checkpoint", str(ckpt), "--data_dir", str(data_dir), "--device", "cpu", *args])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    return e.value.code


def test_auto_scores_the_held_out_records_of_the_training_data_and_every_record_of_another(
        tiny_cfg, trained_on, tmp_path, capsys):
    printed = run_eval(capsys, trained_on, tiny_cfg.data_dir, "--limit", "4")
    assert "split val (auto)" in printed and "is the data" in printed
    own = json.loads((trained_on / "eval_val.json").read_text())
    assert own["split"] == "val"
    records = tiny_records(tiny_cfg)
    held_out = {records[i]["id"] for i in split_indices(len(records), tiny_cfg.val_size)[1]}
    assert len(own["predictions"]) == 4 and {p["id"] for p in own["predictions"]} <= held_out

    test_set = other_data(tiny_cfg, tmp_path / "test_set", records[:5])
    printed = run_eval(capsys, trained_on, test_set)
    assert "split all (auto)" in printed and "is not the data" in printed
    other = json.loads((trained_on / f"eval_all-{data_id(test_set)}.json").read_text())
    assert other["split"] == "all" and [p["id"] for p in other["predictions"]] == [r["id"] for r in records[:5]]
    assert json.loads((trained_on / "eval_val.json").read_text()) == own  # the training data's result stays


def test_split_val_on_other_data_is_refused(tiny_cfg, trained_on, tmp_path, monkeypatch):
    test_set = other_data(tiny_cfg, tmp_path / "test_set", tiny_records(tiny_cfg)[:5])
    assert "use --split all" in refusal(monkeypatch, trained_on, test_set, "--split", "val")


def test_a_checkpoint_without_run_json_needs_an_explicit_split(tiny_cfg, trained_on, monkeypatch):
    (trained_on / checkpoint.RUN_INFO).unlink()  # as checkpoints written before run.json existed
    assert "pass --split val if" in refusal(monkeypatch, trained_on, tiny_cfg.data_dir)


def test_a_chat_json_that_is_not_json_is_refused(tmp_path, trained_on, monkeypatch):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "chat.json").write_text('[{"id": "cut short')
    assert "not valid JSON" in refusal(monkeypatch, trained_on, tmp_path / "broken")


def test_skipped_records_are_counted_with_their_reasons(tiny_cfg, trained_on, tmp_path, capsys):
    records = tiny_records(tiny_cfg)[:4]
    missing = [{**r, "id": f"gone{i}", "image": f"gone{i}.jpg"} for i, r in enumerate(records[:2])]
    text_only = {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}
    data = other_data(tiny_cfg, tmp_path / "holes", records + missing + [text_only])
    # one worker: the records are read in another process, whose skips must still be counted here
    printed = run_eval(capsys, trained_on, data, "--num_workers", "1")
    written = json.loads((trained_on / f"eval_all-{data_id(data)}.json").read_text())
    assert written["n"] == 5 and written["skipped"] == 2 and written["skipped_reasons"] == {"missing_image": 2}
    assert "5 records scored, 2 skipped: missing_image 2" in printed
    assert {"id": "text", "prompt": "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n"
            "user\nSay hi.\nassistant", "reference": "hi"}.items() <= written["predictions"][-1].items()


def test_an_instruction_json_is_scored_with_each_records_question(trained_on, tmp_path, capsys):
    """--chat_json names a json beside the images (mix665k's layout): multi-turn records, with or without an image,
    are asked their last question, with the turns before it, and scored against their last reply."""
    from test_instruct_data import image_record, text_record
    from data.shapes import draw
    images = tmp_path / "playground"
    records = [image_record(i, "red", "circle", "center") for i in (0, 2)] + [text_record(1)]
    for r in records[:2]:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        draw("red", "circle", "center").save(images / r["image"])
    (tmp_path / "mix.json").write_text(json.dumps(records))
    out = tmp_path / "eval.json"
    evaluation.main(["--checkpoint", str(trained_on), "--data_dir", str(images), "--chat_json",
                     str(tmp_path / "mix.json"), "--num_workers", "0", "--device", "cpu", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["split"] == "all" and written["n"] == 3 and written["skipped_reasons"] == {}
    *image_rows, text_row = written["predictions"]
    for p in image_rows:
        assert p["reference"] == "at the center ."
        assert "What is in this picture?" in p["prompt"] and "a red circle ." in p["prompt"]
        assert p["prompt"].rstrip().splitlines()[-2].strip() == "Where is it?"
    assert text_row["id"] == "text_1" and text_row["reference"] == "green ."
    assert "What color is a ripe banana?" in text_row["prompt"] and "yellow ." in text_row["prompt"]
    assert {"vqa_exact_match", "yes_no_accuracy"} <= set(written["metrics"])


def test_a_test_set_drawn_from_the_training_split_is_called_out(tiny_cfg, trained_on, tmp_path, capsys):
    """Records copied out of the checkpoint's training data into a "test set" (another file, so --split all) score
    what the model has seen: eval.py says how many, found by id in the training split that run.json's data and
    config.json's val_size give."""
    records = tiny_records(tiny_cfg)
    train_idx, val_idx = split_indices(len(records), tiny_cfg.val_size)
    test_set = other_data(tiny_cfg, tmp_path / "test_set", [records[i] for i in train_idx[:3] + val_idx[:2]])
    printed = run_eval(capsys, trained_on, test_set)
    assert "warning: 3 of the 5 scored records are in the training split of" in printed
    assert json.loads((trained_on / f"eval_all-{data_id(test_set)}.json").read_text())["in_training_split"] == 3
    printed = run_eval(capsys, trained_on, tiny_cfg.data_dir, "--limit", "2")  # its own held-out records: none
    assert "0 of the 2 scored records are in the training split of" in printed and "warning" not in printed


def test_a_reply_longer_than_max_text_tokens_is_scored_when_its_prompt_fits(tiny_cfg, trained_on, tmp_path, capsys):
    """The reference reply is never fed to the model: only a prompt past the checkpoint's max_text_tokens (64 here)
    leaves a record out."""
    long_reply, long_question = " ".join(["a red circle ."] * 30), " ".join(["Describe the image."] * 30)
    records = [{**r, "conversations": [r["conversations"][0], {"from": "gpt", "value": long_reply}]}
               for r in tiny_records(tiny_cfg)[:3]]
    records.append({**records[0], "id": "long_question", "conversations": [
        {"from": "human", "value": f"<image>\n{long_question}"}, {"from": "gpt", "value": "a ."}]})
    data = other_data(tiny_cfg, tmp_path / "long", records)
    printed = run_eval(capsys, trained_on, data)
    written = json.loads((trained_on / f"eval_all-{data_id(data)}.json").read_text())
    assert written["n"] == 3 and {p["reference"] for p in written["predictions"]} == {long_reply}
    assert written["skipped_reasons"] == {"prompt_longer_than_max_text_tokens": 1}
    assert "3 records scored, 1 skipped: prompt_longer_than_max_text_tokens 1" in printed


def test_a_result_is_never_overwritten(tiny_cfg, trained_on, monkeypatch, capsys):
    """Scoring the same split again (say with --limit, after a long full run) is refused before the model loads, as
    are lmms-eval's results; --out names another file."""
    run_eval(capsys, trained_on, tiny_cfg.data_dir, "--limit", "2")
    first = (trained_on / "eval_val.json").read_text()
    assert "results are never overwritten" in refusal(monkeypatch, trained_on, tiny_cfg.data_dir, "--limit", "1")
    assert (trained_on / "eval_val.json").read_text() == first
    assert "results are never overwritten" in refusal(monkeypatch, trained_on, tiny_cfg.data_dir, "--out",
                                                      str(trained_on / "eval_val.json"))
    # one written by another eval.py while this one scored is not overwritten either
    monkeypatch.undo()  # (refusal's stand-in for load_model)
    real_score, other = scoring.score, trained_on / "other.json"
    monkeypatch.setattr(scoring, "score", lambda *a: (other.write_text("the other's"), real_score(*a))[1])
    with pytest.raises(FileExistsError):
        run_eval(capsys, trained_on, tiny_cfg.data_dir, "--limit", "1", "--out", str(other))
    assert other.read_text() == "the other's"


def test_eval_py_uses_no_more_workers_than_cores_unless_told(tmp_path, monkeypatch):
    (tmp_path / "chat.json").write_text("[]")
    args = ["--checkpoint", str(tmp_path), "--data_dir", str(tmp_path)]
    monkeypatch.setattr(evaluation.os, "sched_getaffinity", lambda pid: {0, 1})
    assert evaluation.parse_args(args).num_workers == 2
    assert evaluation.parse_args(args + ["--num_workers", "4"]).num_workers == 4  # as asked
    monkeypatch.setattr(evaluation.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert evaluation.parse_args(args).num_workers == evaluation.DEFAULT_WORKERS
