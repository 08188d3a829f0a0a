"""What a run prints: captions as one safe line, and one log history across a resume."""
import json

from models.config import VLMConfig
from training.report import Reporter, printable, step_line


def test_captions_print_control_characters_escaped():
    assert printable("a\x06user\n<|im_end|> é 🦄") == "a\\x06user\\n<|im_end|> é 🦄"


def test_the_step_line_shows_the_gpu_peak_memory_and_truncations_when_there_are_any():
    stats = {"dt_ms": 61.0, "samples_per_s": 2577.4, "tokens_per_s": 263817.2, "fill": 0.998, "mfu": 0.221,
             "data_wait": 0.0, "peak_mem_gb": 12.61}
    gpu = step_line(40, 40, 2e-5, 8.6936, stats, skipped=0, truncated=3)
    assert gpu == ("step     40/40 | loss 8.6936 | lr 2.00e-05 | dt 61ms | 2,577 samples/s | 263,817 tok/s | fill 100% | "
                   "mfu 22.1% | peak 12.6 GiB | data wait 0% | skipped 0 | truncated 3")
    cpu = step_line(40, 40, 2e-5, None, {**stats, "mfu": None, "peak_mem_gb": None}, skipped=2)
    assert cpu.endswith("| loss - | lr 2.00e-05 | dt 61ms | 2,577 samples/s | 263,817 tok/s | fill 100% | mfu - | "
                        "data wait 0% | skipped 2")


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
