"""Evaluation: training scores its validation captions at the end of a phase, eval.py scores a checkpoint the same
way into a JSON file, and every run draws curves.png."""
import dataclasses
import json

import pytest

import eval as evaluation
import main

METRICS = {"cider", "bleu4", "rouge_l", "exact_match"}


@pytest.mark.slow
def test_training_and_eval_py_score_the_same_held_out_captions(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, max_steps=2, metric_records=6)
    scores = main.train(cfg)["caption_scores"]
    assert set(scores) == METRICS
    logged = [json.loads(line) for line in open(f"{cfg.out_dir}/log.jsonl")]
    assert {f"val_{k}": v for k, v in scores.items()}.items() <= logged[-1].items()  # into log.jsonl (and wandb)
    assert open(f"{cfg.out_dir}/curves.png", "rb").read(4) == b"\x89PNG"

    out = tmp_path / "eval.json"
    evaluation.main(["--checkpoint", cfg.out_dir, "--data_dir", cfg.data_dir, "--limit", "6", "--num_workers", "0",
                     "--device", "cpu", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["metrics"] == pytest.approx(scores)  # the same records, model and metrics as training's
    assert written["n"] == len(written["predictions"]) == 6
    assert all(set(p) == {"id", "prediction", "reference"} and p["reference"] for p in written["predictions"])


def test_eval_py_refuses_a_folder_without_chat_json_before_loading(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluation.parse_args(["--checkpoint", str(tmp_path), "--data_dir", str(tmp_path)])
    assert "no chat.json there" in capsys.readouterr().err
