"""--phase full: the projector and every LM weight train (LLaVA-1.5's and Prismatic's second stage), at full_lr;
the vision tower stays frozen. It resumes exactly, and its checkpoint captions after reload and export."""
import dataclasses

import pytest
import torch

from training import checkpoint
from training import loop
from data.shapes import draw
from generate import main as generate_main
from models.vision import image_pixels
from test_train import check_resume_is_exact


def full_cfg(tiny_cfg, **changes):
    projector = loop.train(dataclasses.replace(tiny_cfg, max_steps=1, out_dir=tiny_cfg.out_dir + "-projector"))
    return dataclasses.replace(tiny_cfg, phase="full", init_from=str(projector["checkpoint"]), full_lr=1e-3,
                               out_dir=tiny_cfg.out_dir + "-full", **changes)


def test_the_full_phase_trains_every_lm_weight_and_no_vision_weight(tiny_cfg):
    cfg = full_cfg(tiny_cfg, max_steps=2)
    model = loop.build_model(cfg, torch.device("cpu"), resuming=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = loop.build_optimizer(cfg, model)
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}
    trained = loop.train(cfg)["model"]
    after = dict(trained.named_parameters())
    lm = [n for n in before if n.startswith("lm.")]
    assert lm and all(after[n].requires_grad and not torch.equal(after[n], before[n]) for n in lm)
    assert all(not p.requires_grad and torch.equal(after[n], before[n]) for n, p in after.items()
               if n.startswith("vision."))
    assert set(trained.trainable_state_dict()) == {n for n in after if not n.startswith("vision.")}  # LM included


def test_the_full_phase_resumes_exactly(tiny_cfg, on_optimizer_step):
    check_resume_is_exact(tiny_cfg, on_optimizer_step, phase="full")


def test_a_full_phase_checkpoint_captions_after_reload_and_export(tiny_cfg, tmp_path):
    result = loop.train(full_cfg(tiny_cfg, max_steps=2))
    model = result["model"].eval()
    pixels = image_pixels(model.processor, [draw("red", "circle", "center"), draw("blue", "square", "top left")])
    captions = model.generate(pixels, max_new_tokens=8)
    assert checkpoint.load_model(result["checkpoint"]).generate(pixels, max_new_tokens=8) == captions
    generate_main(["--checkpoint", str(result["checkpoint"]), "--export", str(tmp_path / "exported")])
    assert checkpoint.load_model(tmp_path / "exported").generate(pixels, max_new_tokens=8) == captions


@pytest.mark.slow
def test_the_instruction_demo_answers_held_out_questions(tmp_path, capsys):
    """demo.py --instruct, 2 epochs a phase: held-out pictures asked colour, shape, place, count and yes/no
    questions are mostly answered right (4 epochs, the default: 0.82 exact, VQA-normalised)."""
    import demo
    from training.demo import run
    cfg = dataclasses.replace(demo.demo_config(), out_dir=str(tmp_path), epochs=2, num_workers=0)
    scores = run(cfg, instruct=True)["answer_scores"]
    assert scores["vqa_exact_match"] > 0.5 and scores["yes_no_n"] > 0
    assert "scores over" in capsys.readouterr().out
