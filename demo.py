"""The offline demo: no internet, no GPU, about a minute on 2 CPU cores.

    uv run python demo.py                 # both phases on synthetic shapes, tiny random backbones
    uv run python demo.py --epochs 8      # any config flag overrides the demo's settings

It writes a captioning data set in LLaVA's format (coloured shapes; captions such as `a red square at the
bottom right .`), builds tiny random SigLIP and Llama backbones with a tokenizer trained on the captions,
trains the projector (phase 1), then LoRA (phase 2) with main.train, and captions held-out images.
"""
import sys

from models.config import ConfigError, VLMConfig, parse_or_exit


def demo_config():
    """Small everything: trains both phases on 2 CPU cores in about a minute."""
    return VLMConfig(out_dir="checkpoints/demo", device="cpu", pixel_unshuffle=2, projector_hidden_dim=256,
                     max_text_tokens=64, lora_r=16, lora_alpha=32, lora_dropout=0.0, batch_size=32,
                     batch_tokens=32 * 68, grad_accum=1,  # room for 32 of the longest samples: 32 a micro-batch
                     epochs=4, projector_lr=3e-3, lora_lr=3e-3, lora_projector_lr=3e-3, val_size=64, num_workers=2, log_every=20,
                     eval_every=100, eval_captions=3, save_every=100)


if __name__ == "__main__":  # --help, typos and bad values answer now, before the slow imports below
    try:
        parse_or_exit(sys.argv[1:], demo_config(), prog="demo.py", description=__doc__.splitlines()[0]).validate()
    except ConfigError as e:
        sys.exit(f"error: {e}")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import main  # noqa: E402
from report import printable, sample_captions  # noqa: E402


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


def run(cfg):
    t0 = time.time()
    cfg = prepare(cfg.validate())
    root = Path(cfg.out_dir)
    projector = dataclasses.replace(cfg, phase="projector", init_from="", out_dir=str(root / "projector"))
    print("== phase 1: projector alignment (backbones frozen). The tiny LM is random and knows no language, so "
          "its phase-1 captions are gibberish; phase 2 teaches it the captions' words.")
    main.train(projector)
    lora = dataclasses.replace(cfg, phase="lora", init_from=projector.out_dir, out_dir=str(root / "lora"))
    print("== phase 2: LoRA on the LM + projector")
    out = main.train(lora)
    print(f"== captions of held-out images (demo took {time.time() - t0:.0f}s):")
    _, val_loader = main.build_data(lora, out["model"], 0, 1)
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


if __name__ == "__main__":
    config = parse_or_exit(sys.argv[1:], demo_config(), prog="demo.py")
    main.run_command(lambda: run(config))
