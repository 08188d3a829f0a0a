"""Evaluate a checkpoint: ask each LLaVA-format record its own question and score the answers against its reply.

    uv run python eval.py --checkpoint checkpoints/demo/lora --data_dir checkpoints/demo/assets/data

Each record, with or without an image, is prompted with its conversation up to its last assistant reply (its question,
and the turns before it; the last reply whose prompt fits the checkpoint's max_text_tokens: the reply itself may be
longer), and that reply is the reference. Reports CIDEr, BLEU-4, ROUGE-L and exact match for captions, the
VQAv2-normalised exact match and yes/no accuracy for short answers (training/metrics.py), how many records were skipped
and why (a missing image, ...), and how many scored records were in the checkpoint's training split (by id: a test set
drawn from the training data scores recall), and writes them, with every prompt, prediction and reference, to a JSON
file.
Which records: --split val scores the records the checkpoint's run held out, which exist only in the data it trained
on (its run.json holds that chat.json's sha256; the data set's fixed split and the run's val_size pick them, as
training did); --split all scores every record (a separate test set). The default, auto, is val on the checkpoint's
own training data and all on any other; it says which and why. A checkpoint without run.json (older) does not
know its data: pass --split.
The JSON (--out) goes into the checkpoint dir by default: eval_val.json or eval_all.json for the checkpoint's own
data, eval_all-<the first 8 hex digits of the data's sha256>.json for another data set, so scoring a test set never
overwrites the result on the training data. An existing file is never overwritten: eval.py says so before the model
loads.
"""
import os
import sys
from pathlib import Path

from models.config import FlagParser

DEFAULT_WORKERS = 4


def parse_args(argv):
    p = FlagParser(description="Score a tinyvlm checkpoint's captions: CIDEr, BLEU-4, ROUGE-L, exact match.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run's out_dir (its newest step)")
    p.add_argument("--data_dir", required=True, help="LLaVA-format data: chat.json with images.zip or images/")
    p.add_argument("--chat_json", default="", help="a LLaVA json to score instead of data_dir/chat.json (e.g. "
                   "llava_v1_5_mix665k.json); its image paths are relative to --data_dir")
    p.add_argument("--split", choices=("auto", "val", "all"), default="auto",
                   help="val: the records the checkpoint's run held out; all: every record; auto: val on the "
                        "checkpoint's training data, all on other data")
    p.add_argument("--limit", type=int, default=0, help="score the first N records of the split only; 0 = all")
    p.add_argument("--out", default="", help="the JSON file; default: eval_<split>[-<data id>].json in the checkpoint")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=None,
                   help=f"DataLoader workers decoding images; default {DEFAULT_WORKERS}, or the cores here if fewer")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).expanduser().exists():
        p.error(f"--checkpoint {args.checkpoint}: no such directory (a checkpoint, or a run's out_dir)")
    if args.chat_json and not Path(args.chat_json).expanduser().is_file():
        p.error(f"--chat_json {args.chat_json}: no such file")
    if not args.chat_json and not (Path(args.data_dir).expanduser() / "chat.json").is_file():
        p.error(f"--data_dir {args.data_dir}: no chat.json there; point it at a LLaVA-format data folder (or name the "
                "json with --chat_json)")
    if args.batch_size < 1 or args.limit < 0 or (args.num_workers or 0) < 0:
        p.error("need --batch_size >= 1, --limit >= 0 and --num_workers >= 0")
    if args.num_workers is None:  # more workers than cores only contend (and torch's DataLoader warns)
        args.num_workers = min(DEFAULT_WORKERS, len(os.sched_getaffinity(0)))
    return args


def main(argv):
    """Scores the checkpoint argv names; returns the scores. The flags are checked first, in a second: torch, the data
    and the model load only after."""
    args = parse_args(argv)
    from training.scoring import score_checkpoint  # the slow imports, after the flags
    return score_checkpoint(args)


if __name__ == "__main__":
    main(sys.argv[1:])
