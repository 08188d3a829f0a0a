"""Captioning image files, as generate.py does once its flags are checked: the checkpoint loads, writes the exports
asked for (training/export.py, models/native.py), then captions the files in batches."""
import os
import sys
from pathlib import Path

import torch
import transformers

from data.llava import decode_image
from models.config import ConfigError
from models.hub import HubError
from models.native import native_export
from models.prompt import SampleError
from models.vision import image_pixels
from training import checkpoint
from training.distributed import pick_device
from training.export import export


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


def caption_and_export(args):
    """generate.py's work, its flags (args) checked: load the checkpoint, write the exports asked for, print each
    image's caption (exits 1 if an image could not be read)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.disable_progress_bar()
    try:
        device = pick_device(args.device)
        path = checkpoint.resolve(args.checkpoint)
        model = checkpoint.load_model(path)
    except (ConfigError, HubError) as e:
        sys.exit(f"error: {e}")
    print(f"loaded checkpoint {path}", file=sys.stderr)  # a run's out_dir stands for its newest step: say which
    if args.export:
        export(model, args.export, source=path)
        print(f"exported {path} to {args.export}", file=sys.stderr)
    if args.native:
        try:
            native_export(model, args.native)
        except ValueError as e:  # a projector or tower with no transformers class: what to train instead
            sys.exit(f"error: {e}")
        print(f"exported {path} to {args.native} as transformers' own class", file=sys.stderr)
    model.place(device)
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
