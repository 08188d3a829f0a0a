"""Caption images with a trained tinyvlm checkpoint.

    uv run python generate.py --checkpoint checkpoints/demo/lora photo.jpg scan.png photos/ ...
    uv run python generate.py --checkpoint checkpoints/demo/lora --export checkpoints/merged

Prints one `file<TAB>caption` line per image; a folder stands for its image files (IMAGE_SUFFIXES, sorted). A path
that does not exist stops the run before the model loads; a file that cannot be read as an image is reported on
stderr, the others are still captioned, and the exit code is 1.
--export merges the LoRA adapters into the LM (in fp32; a full-phase LM is written as it trained) and writes a
checkpoint that needs no adapters (its lm/ folder is a plain transformers model). It writes a new or empty folder, or replaces a previous export: a folder
whose config.json names lm_model "lm" and that holds lm/ (what an export writes); any other folder is refused.
The export also loads with transformers alone, outside this repo (models/modeling_tinyvlm.py, shipped in it):
    model = AutoModelForImageTextToText.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    inputs = processor.apply_chat_template([{"role": "user", "content": [{"type": "image", "image": pil_image},
        {"type": "text", "text": "Describe it."}]}], tokenize=True, return_dict=True)
    model.generate(**inputs)  # or pipeline("image-text-to-text", model=DIR, trust_remote_code=True)
"""
import json
import sys
from pathlib import Path

from models.config import FlagParser
from models.prompt import DEFAULT_PROMPT

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what a folder is read for


def parse_args(argv):
    p = FlagParser(description="Caption images with a tinyvlm checkpoint.")
    p.add_argument("images", nargs="*", help="image files (any format and mode Pillow reads) or folders of them")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run's out_dir (its newest step)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--export", metavar="DIR", help="merge the LoRA adapters into the LM and write DIR")
    p.add_argument("--native", metavar="DIR", help="write a new folder DIR as transformers' own class (a model trained "
                   "with --projector mlp: Llava; linear: Idefics3), loadable with no remote code (docs/export.md)")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).expanduser().exists():
        p.error(f"--checkpoint {args.checkpoint}: no such directory (a checkpoint, or a run's out_dir)")
    if not args.images and not args.export and not args.native:
        p.error("no images given; pass one or more image files after the flags")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("need --batch_size >= 1, --max_new_tokens >= 1, --temperature >= 0 and 0 < --top_p <= 1")
    if args.export and (refusal := export_refusal(Path(args.export).expanduser())):
        p.error(refusal)
    if args.native and Path(args.native).expanduser().exists() and any(Path(args.native).expanduser().iterdir()):
        p.error(f"--native {args.native}: that folder is not empty; name a new one")
    args.images = image_files(p, args.images)
    return args


def image_files(p, paths):
    """The files to caption: each path as given, a folder replaced by its image files. Checked now, so a mistyped
    path is said at once, not after the model has loaded."""
    files = []
    for path in paths:
        if Path(path).is_dir():
            found = sorted(f for f in Path(path).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                p.error(f"{path}: a folder without image files ({' '.join(IMAGE_SUFFIXES)})")
            files += map(str, found)
        elif not Path(path).exists():
            p.error(f"{path}: no such file or folder")
        else:
            files.append(path)
    return files


def export_refusal(out):
    """Why --export may not write `out`, or None: it writes a new or empty folder, or replaces a previous export;
    any other folder is someone's work."""
    if out.exists() and not out.is_dir():
        return f"--export {out}: that is a file; pass the path of a folder to create"
    held = sorted(f.name for f in out.iterdir()) if out.is_dir() else []
    if held and not is_export(out):
        return (f"--export {out}: a folder that is not a previous export, holding {', '.join(held[:5])}"
                f"{', ...' if len(held) > 5 else ''}; pass a new folder, or move this one away first")
    return None


def is_export(path):
    """What export writes: a config.json naming its LM as the lm/ folder beside it (a training checkpoint names
    the LM's hub id or directory, and holds no lm/)."""
    try:
        return json.loads((path / "config.json").read_text()).get("lm_model") == "lm" and (path / "lm").is_dir()
    except (OSError, ValueError, AttributeError):  # no config.json, not JSON, not an object
        return False


if __name__ == "__main__":  # bad arguments answer now, before the slow imports below
    parse_args(sys.argv[1:])

import dataclasses  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoImageProcessor, GenerationConfig  # noqa: E402
from transformers.dynamic_module_utils import get_relative_import_files  # noqa: E402

from training import checkpoint  # noqa: E402
from data.llava import decode_image  # noqa: E402
from models.config import ConfigError  # noqa: E402
from models.hub import HubError, from_hub  # noqa: E402
from models import modeling_tinyvlm  # noqa: E402
from models.lora import strip_lora  # noqa: E402
from models.native import native_export  # noqa: E402
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


def export(model, out, source=None):
    """Write `out` as a checkpoint without adapters: lm/, vision/ (and fused_vision/) are plain transformers
    folders (named relative to `out` in its config.json, so it can be moved), trainable.safetensors holds the
    projector, and run.json is the one of `source` (the checkpoint the model came from: the data it trained on,
    which eval.py compares), if it has one. Written beside `out`, then renamed: a failed export leaves a previous
    one in place, and a replaced one leaves no stale files behind.
    The model itself becomes that checkpoint's model: its adapters are merged in place, in fp32."""
    out = Path(out).expanduser().resolve()
    if refusal := export_refusal(out):  # parse_args said so before loading; this guards other callers
        raise ValueError(refusal)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
    # fp32: transformers loads an LM in its saved dtype (the hub's SmolLM2 is bf16), and W + BA rounded to bf16's
    # 8 significant bits loses any part of the update under ~1/256 of W: a small adapter update vanishes
    model.float()
    strip_lora(model.lm)  # merge the adapters into the weights and put the plain nn.Linear back
    strip_lora(model.vision)
    model.carried = set()  # the weights init_from set are in lm/ and vision/ now
    model.lm.save_pretrained(tmp / "lm")  # in fp32 too: its config.json says so, and it reloads as fp32
    model.tokenizer.save_pretrained(tmp / "lm")
    folders = {}  # config field -> the folder its tower is saved in
    for tower, (field, folder) in zip(model.vision.towers, TOWER_FOLDERS):
        export_tower(getattr(model.cfg, field), tower, tmp / folder)
        folders[field] = folder
    # Phase "projector": the projector is the only trainable part left (a full-phase LM is now in lm/), which is
    # what model.save writes.
    model.cfg = dataclasses.replace(model.cfg, phase="projector", init_from="", lora_vision=False, lm_model="lm",
                                    **folders)
    model.lm.requires_grad_(False)
    checkpoint.save_model(model, tmp)
    ship_code(model, tmp)
    if source and (Path(source) / checkpoint.RUN_INFO).is_file():
        shutil.copyfile(Path(source) / checkpoint.RUN_INFO, tmp / checkpoint.RUN_INFO)
    if out.exists():
        shutil.rmtree(out)  # an empty folder or a previous export (export_refusal)
    os.replace(tmp, out)


def ship_code(model, out):
    """Make `out` loadable by transformers alone (models/modeling_tinyvlm.py): the models/ files that file imports,
    auto_map in config.json and processor_config.json, and the generation settings of VLM.generate."""
    code = Path(modeling_tinyvlm.__file__)
    for f in [code, *map(Path, get_relative_import_files(code))]:
        shutil.copyfile(f, out / f.name)
    module = code.stem
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="tinyvlm", architectures=["TinyVLMForConditionalGeneration"],
                  auto_map={"AutoConfig": f"{module}.TinyVLMConfig",
                            "AutoModelForImageTextToText": f"{module}.TinyVLMForConditionalGeneration",
                            "AutoProcessor": f"{module}.TinyVLMProcessor"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = dict(processor_class="TinyVLMProcessor", auto_map={"AutoProcessor": f"{module}.TinyVLMProcessor"},
                     n_image_tokens=model.n_image_tokens, image_fit=model.cfg.image_fit)
    (out / modeling_tinyvlm.PROCESSOR_CONFIG).write_text(json.dumps(processor, indent=2) + "\n")
    GenerationConfig(eos_token_id=[model.end_of_turn_id, model.tokenizer.eos_token_id], do_sample=False,
                     pad_token_id=model.tokenizer.pad_token_id, max_new_tokens=32).save_pretrained(out)


def export_tower(name, tower, out):
    """The model holds a cut-down tower (no pooling head; with vision_feature_layer != -1 also fewer layers and
    no final norm), whose saved config would not describe it. Save the original tower with the (merged)
    weights laid over it instead: reloading cuts it the same way, vision_feature_layer unchanged."""
    original = from_hub(tower_class(vision_config(name)), name, dtype=torch.float32)  # the merged weights' dtype
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
