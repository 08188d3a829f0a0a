"""The offline demo: no internet, no GPU, about a minute on 2 CPU cores.

    uv run python demo.py                 # both phases on synthetic shapes, tiny random backbones
    uv run python demo.py --epochs 8      # any config flag overrides the demo's settings
    uv run python demo.py --instruct      # phase 2 on questions about the shapes instead (--phase full), scored

It writes a captioning data set in LLaVA's format (coloured shapes; captions such as `a red square at the
bottom right .`), builds tiny random SigLIP and Llama backbones with a tokenizer trained on the captions,
trains the projector (phase 1), then LoRA (phase 2) with training/loop.py's train, and captions held-out images.
With --instruct, phase 2 fine-tunes the projector and the whole LM (--phase full) on an instruction set over the
same pictures (colour, shape, place, count and yes/no questions, some multi-turn, some text-only; data/shapes.py),
then asks held-out pictures their questions and scores the answers as VQA benchmarks do.
"""
import sys

from models.config import ConfigError, VLMConfig, parse_or_exit


def demo_config():
    """Small everything: trains both phases on 2 CPU cores in about a minute."""
    return VLMConfig(out_dir="checkpoints/demo", device="cpu", pixel_unshuffle=2, projector_hidden_dim=256,
                     max_text_tokens=64, lora_r=16, lora_alpha=32, lora_dropout=0.0, batch_size=32,
                     batch_tokens=32 * 68, grad_accum=1,  # room for 32 of the longest samples: 32 a micro-batch
                     epochs=4, projector_lr=3e-3, lora_lr=3e-3, lora_projector_lr=3e-3, full_lr=3e-3, val_size=64,
                     num_workers=2, log_every=20,
                     eval_every=100, eval_captions=3, save_every=100)


INSTRUCT = "--instruct" in sys.argv  # which demo (not a config field)
ARGV = [a for a in sys.argv[1:] if a != "--instruct"]
if __name__ == "__main__":  # --help, typos and bad values answer now, before the slow imports below
    try:
        parse_or_exit(ARGV, demo_config(), prog="demo.py", description=__doc__.splitlines()[0]).validate()
    except ConfigError as e:
        sys.exit(f"error: {e}")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from training import loop  # noqa: E402
from data.loading import build_data  # noqa: E402
from training.metrics import score_line  # noqa: E402
from training.report import caption_metrics, printable, sample_captions  # noqa: E402


def prepare(cfg):
    """Synthetic shapes data + tiny random backbones under out_dir/assets (made once), for whichever of
    --data_dir, --vision_model and --lm_model the user did not give."""
    from data.shapes import make_shapes_dataset
    from models.tiny import build_backbones
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
    t0 = time.time()
    cfg = prepare(cfg.validate())
    root = Path(cfg.out_dir)
    projector = dataclasses.replace(cfg, phase="projector", init_from="", out_dir=str(root / "projector"))
    print("== phase 1: projector alignment (backbones frozen). The tiny LM is random and knows no language, so "
          "its phase-1 captions are gibberish; phase 2 teaches it the captions' words.")
    loop.train(projector)
    if instruct:
        return answer_questions(cfg, projector, t0)
    lora = dataclasses.replace(cfg, phase="lora", init_from=projector.out_dir, out_dir=str(root / "lora"))
    print("== phase 2: LoRA on the LM + projector")
    out = loop.train(lora)
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
    from data.shapes import make_shapes_instruct
    full = dataclasses.replace(cfg, phase="full", init_from=projector.out_dir, out_dir=str(Path(cfg.out_dir) / "instruct"),
                               chat_json=str(make_shapes_instruct(cfg.data_dir)))
    print("== phase 2 on instructions: the projector and every LM weight train (--phase full)")
    out = loop.train(full)
    _, val_loader = build_data(full, out["model"], 0, 1)
    scores, rows, skipped = caption_metrics(out["model"], val_loader.dataset, len(val_loader.dataset), torch.device("cpu"))
    print(f"== held-out pictures asked their questions (demo took {time.time() - t0:.0f}s):")
    for row in rows[:8]:
        question = row.prompt.splitlines()[-2]  # the last user line (the prompt ends with the assistant header)
        print(f"  {row.id}: {question} {printable(row.prediction)}  (reference: {printable(row.reference)})")
    print(f"scores over {len(rows)} held-out records ({sum(skipped.values())} unusable not asked): "
          + score_line({k: scores[k] for k in ("vqa_exact_match", "yes_no_accuracy", "yes_no_n")}))
    return {**out, "answer_scores": scores}


if __name__ == "__main__":
    config = parse_or_exit(ARGV, demo_config(), prog="demo.py")
    loop.run_command(lambda: run(config, INSTRUCT))
