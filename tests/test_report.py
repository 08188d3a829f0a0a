"""What a run prints: captions as one safe line, and one log history across a resume."""
import json

from models.config import VLMConfig
from report import Reporter, printable


def test_captions_print_control_characters_escaped():
    assert printable("a\x06user\n<|im_end|> é 🦄") == "a\\x06user\\n<|im_end|> é 🦄"


def test_a_resumed_run_keeps_one_history_in_log_jsonl(tmp_path):
    cfg = VLMConfig(out_dir=str(tmp_path))
    first = Reporter(cfg, rank=0, start_step=0)
    for step in range(1, 6):  # steps 4 and 5 were logged, then the run died; its newest checkpoint is step 3
        first.log(step, {"loss": 1.0})
    Reporter(cfg, rank=0, start_step=3).log(4, {"loss": 0.5})
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4]
