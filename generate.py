"""Caption images with a trained tinyvlm checkpoint.

    uv run python generate.py --checkpoint checkpoints/demo/lora photo.jpg scan.png ...
    uv run python generate.py --checkpoint checkpoints/demo/lora --export checkpoints/merged

Prints one `file<TAB>caption` line per image. A file that cannot be read is reported on stderr, the others
are still captioned, and the exit code is 1. --export merges the LoRA adapters into the LM and writes a
checkpoint that needs no adapters (its lm/ folder is a plain transformers model).
"""
import argparse
import sys
from pathlib import Path

from models.prompt import DEFAULT_PROMPT


def parse_args(argv):
    p = argparse.ArgumentParser(description="Caption images with a tinyvlm checkpoint.")
    p.add_argument("images", nargs="*", help="image files, any format and mode Pillow reads")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run's out_dir (its newest step)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--export", metavar="DIR", help="merge the LoRA adapters into the LM and write DIR")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).expanduser().exists():
        p.error(f"--checkpoint {args.checkpoint}: no such directory (a checkpoint, or a run's out_dir)")
    if not args.images and not args.export:
        p.error("no images given; pass one or more image files after the flags")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("need --batch_size >= 1, --max_new_tokens >= 1, --temperature >= 0 and 0 < --top_p <= 1")
    return args


if __name__ == "__main__":  # bad arguments answer now, before the slow imports below
    parse_args(sys.argv[1:])

import dataclasses  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

import checkpoint  # noqa: E402
from data.llava import decode_image  # noqa: E402
from models.config import ConfigError  # noqa: E402
from models.hub import HubError, from_hub  # noqa: E402
from models.lora import strip_lora  # noqa: E402
from models.prompt import SampleError  # noqa: E402
from models.vision import image_pixels, tower_class, vision_config  # noqa: E402


def load_image(path):
    try:
        return decode_image(Path(path).read_bytes())  # any mode (RGBA, palette, 16-bit, ...) -> RGB
    except OSError as e:  # missing, a directory, no permission
        raise SampleError("unreadable_file", e.strerror or str(e)) from None


def caption_files(model, paths, batch_size, **generate_kw):
    """Yields (path, caption, error), error None or a SampleError. A bad file drops out of its batch alone."""
    device = next(model.parameters()).device
    for start in range(0, len(paths), batch_size):
        good, images = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(load_image(path))
                good.append(path)
            except SampleError as e:
                yield path, None, e
        if images:
            pixel_values = image_pixels(model.processor, images, model.cfg.image_fit)  # [B, 3, H, W] uint8
            for path, caption in zip(good, model.generate(pixel_values.to(device), **generate_kw)):
                yield path, caption, None


TOWER_FOLDERS = (("vision_model", "vision"), ("fused_vision_model", "fused_vision"))


def export(model, out):
    """Write `out` as a checkpoint without adapters: lm/, vision/ (and fused_vision/) are plain transformers
    folders (named relative to `out` in its config.json, so it can be moved), trainable.safetensors holds the
    projector.
    The model itself becomes that checkpoint's model: its adapters are merged in place."""
    out = Path(out)
    strip_lora(model.lm)  # merge the adapters into the weights and put the plain nn.Linear back
    strip_lora(model.vision)
    model.lm.save_pretrained(out / "lm")
    model.tokenizer.save_pretrained(out / "lm")
    folders = {}  # config field -> the folder its tower is saved in
    for tower, (field, folder) in zip(model.vision.towers, TOWER_FOLDERS):
        export_tower(getattr(model.cfg, field), tower, out / folder)
        folders[field] = folder
    # Phase "projector": the projector is the only trainable part left, which is what model.save writes.
    model.cfg = dataclasses.replace(model.cfg, phase="projector", init_from="", lora_vision=False, lm_model="lm",
                                    **folders)
    checkpoint.save_model(model, out)


def export_tower(name, tower, out):
    """The model holds a cut-down tower (no pooling head; with vision_feature_layer != -1 also fewer layers and
    no final norm), whose saved config would not describe it. Save the original tower with the (merged)
    weights laid over it instead: reloading cuts it the same way, vision_feature_layer unchanged."""
    original = from_hub(tower_class(vision_config(name)), name)
    unexpected = original.load_state_dict(tower.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"vision weights that the original tower {name} does not have: {unexpected[:5]}")
    original.save_pretrained(out)
    from_hub(AutoImageProcessor, name).save_pretrained(out)


def main(argv):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    try:
        model = checkpoint.load_model(args.checkpoint)
    except (ConfigError, HubError) as e:
        sys.exit(f"error: {e}")
    if args.export:
        export(model, args.export)
        print(f"exported {args.checkpoint} to {args.export}", file=sys.stderr)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    model.place("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    failed = 0
    for path, caption, error in caption_files(model, args.images, args.batch_size, prompt=args.prompt,
                                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                              top_p=args.top_p):
        if error:
            failed += 1
            print(f"{path}: cannot read this image ({error})", file=sys.stderr)
        else:
            print(f"{path}\t{' '.join(caption.split())}", flush=True)  # one line, whatever the caption holds
    if failed:
        sys.exit(f"{failed} of {len(args.images)} images could not be captioned")


if __name__ == "__main__":
    main(sys.argv[1:])
