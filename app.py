"""A local web page to try a checkpoint: drop or paste an image, edit the prompt and the sampling, watch the caption
appear token by token, or chat about the image (each answer reads the conversation so far).

    uv sync --extra app                                   # the page's dependencies (gradio), kept out of the core
    uv run python app.py --checkpoint checkpoints/demo/lora          # then open http://127.0.0.1:7860

The page also offers the demo's held-out sample images (demo.py writes them to checkpoints/demo/samples). The
page itself is training/page.py.
"""
import sys
from pathlib import Path

from models.config import FlagParser


def parse_args(argv):
    p = FlagParser(description="Serve a local page that captions images with a tinyvlm checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run's out_dir (its newest step)")
    p.add_argument("--examples", default="checkpoints/demo/samples", help="a folder of images the page offers")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).expanduser().exists():
        p.error(f"--checkpoint {args.checkpoint}: no such directory (a checkpoint, or a run's out_dir)")
    return args


def main(argv):
    """Serves the page for the checkpoint argv names. The flags are checked first, in a second: gradio, torch and the
    model load only after."""
    args = parse_args(argv)
    from training.page import serve  # the slow imports, after the flags
    serve(args)


if __name__ == "__main__":
    main(sys.argv[1:])
