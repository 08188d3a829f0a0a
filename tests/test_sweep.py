"""tools/sweep.py's whole path on the CPU, with the tiny LM: data, phase 1 once, phase 2 per setting, held-out
scores."""
import json
import math

from tools import sweep


def test_a_one_setting_sweep_scores_the_held_out_split_and_a_rerun_skips_it(tmp_path):
    argv = ["--quick", "--tiny_lm", "--out_dir", str(tmp_path), "--lora_vision", "true"]
    args = sweep.parse_args(argv)
    assert [s["name"] for s in sweep.settings(args)] == [
        "lora_lr=0.0002_lora_r=16_lora_dropout=0.0_warmup_frac=0.03_lora_vision=True"]
    rows = sweep.main(argv)
    assert [r["name"] for r in rows] == ["phase 1 only", *(s["name"] for s in sweep.settings(args))]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and math.isfinite(row["val_loss"]) and len(row["examples"]) == 3
    assert rows[1]["lora_alpha"] == 32 and rows[1]["lora_vision"] is True
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    lines = sweep.table(rows).splitlines()
    assert len(lines) == 2 + len(rows) and lines[0].startswith("| phases | lora_lr |")
    assert sweep.main(argv) == rows  # nothing left to train: the rerun returns what results.json holds
