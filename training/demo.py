"""The offline demo's runs, as demo.py starts them once its flags are checked (demo.py's opening says what it does):
its assets made once, both phases trained, then held-out images captioned or asked their questions."""
import dataclasses
import json
import time
from pathlib import Path

import torch

from data.loading import build_data
from data.shapes import make_shapes_dataset, make_shapes_instruct
from models.config import VLMConfig
from models.tiny import build_backbones
from training.loop import train
from training.metrics import score_line
from training.report import caption_metrics, printable, sample_captions


def prepare(cfg):
    """Synthetic shapes data + tiny random backbones under out_dir/assets (made once), for whichever of
    --data_dir, --vision_model and --lm_model the user did not give."""
    assets = Path(cfg.out_dir) / "assets"
    if not (assets / "lm" / "config.json").is_file():
        print(f"making the demo data set and tiny backbones in {assets}")
        corpus = make_shapes_dataset(assets / "data", n=2000)
        build_backbones(assets, corpus)
    hub = VLMConfig()  # a backbone left at the hub default was not chosen: the demo's own tiny one stands in
    return dataclasses.replace(
        cfg, data_dir=cfg.data_dir or str(assets / "data"),
        vision_model=str(assets / "vision") if cfg.vision_model == hub.vision_model else cfg.vision_model,
        lm_model=str(assets / "lm") if cfg.lm_model == hub.lm_model else cfg.lm_model)


def run(cfg, instruct=False):
    """Both phases on the demo's assets (prepare), then captions of held-out images; instruct: phase 2 on the
    shapes' instruction set instead (answer_questions)."""
    t0 = time.time()
    cfg = prepare(cfg.validate())
    root = Path(cfg.out_dir)
    projector = dataclasses.replace(cfg, phase="projector", init_from="", out_dir=str(root / "projector"))
    print("== phase 1: projector alignment (backbones frozen). The tiny LM is random and knows no language, so "
          "its phase-1 captions are gibberish; phase 2 teaches it the captions' words.")
    train(projector)
    if instruct:
        return answer_questions(cfg, projector, t0)
    lora = dataclasses.replace(cfg, phase="lora", init_from=projector.out_dir, out_dir=str(root / "lora"))
    print("== phase 2: LoRA on the LM + projector")
    out = train(lora)
    print(f"== captions of held-out images (demo took {time.time() - t0:.0f}s):")
    _, val_loader = build_data(lora, out["model"], 0, 1)
    val_set = val_loader.dataset
    for id_, _, caption, truth in sample_captions(out["model"], val_set, 8, torch.device("cpu"))[0]:
        print(f"  {id_}: {printable(caption)}  (reference: {printable(truth)})")
    samples = root / "samples"  # a few held-out images as files, to try generate.py on
    samples.mkdir(exist_ok=True)
    for i in range(4):
        name = json.loads(val_set.records[val_set.indices[i]]["record"])["image"]
        (samples / name).write_bytes(val_set.images.read(name))
    print(f"try: uv run python generate.py --checkpoint {lora.out_dir} {samples}/*.jpg")
    print(f" or: uv run python eval.py --checkpoint {lora.out_dir} --data_dir {cfg.data_dir}")
    print(f" or, after uv sync --extra app: uv run python app.py --checkpoint {lora.out_dir}")
    return out


def answer_questions(cfg, projector, t0):
    """Phase 2 on the shapes' instruction set (--phase full), then held-out pictures asked their questions."""
    full = dataclasses.replace(cfg, phase="full", init_from=projector.out_dir, out_dir=str(Path(cfg.out_dir) / "instruct"),
                               chat_json=str(make_shapes_instruct(cfg.data_dir)))
    print("== phase 2 on instructions: the projector and every LM weight train (--phase full)")
    out = train(full)
    _, val_loader = build_data(full, out["model"], 0, 1)
    scores, rows, skipped = caption_metrics(out["model"], val_loader.dataset, len(val_loader.dataset), torch.device("cpu"))
    print(f"== held-out pictures asked their questions (demo took {time.time() - t0:.0f}s):")
    for row in rows[:8]:
        question = row.prompt.splitlines()[-2]  # the last user line (the prompt ends with the assistant header)
        print(f"  {row.id}: {question} {printable(row.prediction)}  (reference: {printable(row.reference)})")
    print(f"scores over {len(rows)} held-out records ({sum(skipped.values())} unusable not asked): "
          + score_line({k: scores[k] for k in ("vqa_exact_match", "yes_no_accuracy", "yes_no_n")}))
    return {**out, "answer_scores": scores}
