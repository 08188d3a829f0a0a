"""What a run prints: captions as one safe line, and one log history across a resume."""
import json

from models.config import VLMConfig
from training.report import Reporter, printable


def test_captions_print_control_characters_escaped():
    assert printable("a\x06user\n<|im_end|> é 🦄") == "a\\x06user\\n<|im_end|> é 🦄"


def test_a_resumed_run_keeps_one_history_in_log_jsonl(tmp_path):
    cfg = VLMConfig(out_dir=str(tmp_path))
    first = Reporter(cfg, rank=0, start_step=0, run_id="r")
    for step in range(1, 6):  # steps 4 and 5 were logged, then the run died; its newest checkpoint is step 3
        first.log(step, {"loss": 1.0})
    Reporter(cfg, rank=0, start_step=3, run_id="r").log(4, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4]


def test_curves_plot_one_continuous_history_across_a_resume(tmp_path):
    from training.curves import read_history
    cfg = VLMConfig(out_dir=str(tmp_path))
    first = Reporter(cfg, rank=0, start_step=0, run_id="r")
    for step in range(1, 6):
        first.log(step, {"loss": 1.0 / step, "lr": 1e-3, "samples_per_s": 100.0})
    first.log(5, {"val_loss": 0.5})
    resumed = Reporter(cfg, rank=0, start_step=3, run_id="r")  # the run died after step 5; its newest checkpoint is step 3
    resumed.log(4, {"loss": 0.3, "lr": 1e-3, "samples_per_s": 90.0})
    resumed.plot_curves()
    history = read_history(tmp_path / "log.jsonl")
    assert history["loss"] == ([1, 2, 3, 4], [1.0, 0.5, 1 / 3, 0.3]) and "val_loss" not in history
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
