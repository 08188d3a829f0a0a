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


def main(argv):
    """Captions the images argv names (and writes the exports it asks for). The flags and paths are checked first, in
    a second: torch and the model load only after."""
    args = parse_args(argv)
    from training.captioning import caption_and_export  # the slow imports, after the flags
    caption_and_export(args)


if __name__ == "__main__":
    main(sys.argv[1:])
