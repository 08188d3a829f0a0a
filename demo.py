"""The offline demo: no internet, no GPU, about a minute on 2 CPU cores.

    uv run python demo.py                 # both phases on synthetic shapes, tiny random backbones
    uv run python demo.py --epochs 8      # any config flag overrides the demo's settings
    uv run python demo.py --instruct      # phase 2 on questions about the shapes instead (--phase full), scored

It writes a captioning data set in LLaVA's format (coloured shapes; captions such as `a red square at the
bottom right .`), builds tiny random SigLIP and Llama backbones with a tokenizer trained on the captions,
trains the projector (phase 1), then LoRA (phase 2) with training/loop.py's train, and captions held-out images
(training/demo.py).
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


def main(argv):
    """Runs the demo argv asks for: --instruct picks the instruction demo, any config flag overrides the demo's
    settings. The flags are checked first, in a second: torch and the models load only after."""
    instruct = "--instruct" in argv  # which demo (not a config field)
    cfg = parse_or_exit([a for a in argv if a != "--instruct"], demo_config(), prog="demo.py",
                        description=__doc__.splitlines()[0])
    try:
        cfg.validate()
    except ConfigError as e:
        sys.exit(f"error: {e}")
    from training.demo import run  # the slow imports, after the flags
    from training.loop import run_command
    return run_command(lambda: run(cfg, instruct))


if __name__ == "__main__":
    main(sys.argv[1:])
