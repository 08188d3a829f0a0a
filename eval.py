"""Evaluate a checkpoint: caption LLaVA-format records and score the captions against their reference replies.

    uv run python eval.py --checkpoint checkpoints/demo/lora --data_dir checkpoints/demo/assets/data

Reports CIDEr, BLEU-4, ROUGE-L and exact match (metrics.py) and writes them, with every prediction next to its
reference, to a JSON file (--out). --split val scores the records the checkpoint's run held out (its val_size
and seed pick them from data_dir, as training did); --split all scores every record (a separate test set).
"""
import argparse
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description="Score a tinyvlm checkpoint's captions: CIDEr, BLEU-4, ROUGE-L, exact match.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint dir, or a run's out_dir (its newest step)")
    p.add_argument("--data_dir", required=True, help="LLaVA-format data: chat.json with images.zip or images/")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="val: the records the checkpoint's run held out; all: every record")
    p.add_argument("--limit", type=int, default=0, help="score the first N records of the split only; 0 = all")
    p.add_argument("--out", default="", help="the JSON file; default: eval_<split>.json in the checkpoint dir")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader workers decoding images")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if not Path(args.checkpoint).expanduser().exists():
        p.error(f"--checkpoint {args.checkpoint}: no such directory (a checkpoint, or a run's out_dir)")
    if not (Path(args.data_dir).expanduser() / "chat.json").is_file():
        p.error(f"--data_dir {args.data_dir}: no chat.json there; point it at a LLaVA-format data folder")
    if args.batch_size < 1 or args.limit < 0 or args.num_workers < 0:
        p.error("need --batch_size >= 1, --limit >= 0 and --num_workers >= 0")
    return args


if __name__ == "__main__":  # bad arguments answer now, before the slow imports below
    parse_args(sys.argv[1:])

import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

import checkpoint  # noqa: E402
from data.llava import ImageStore, LlavaDataset, load_records, split_indices  # noqa: E402
from models.config import ConfigError  # noqa: E402
from models.hub import HubError  # noqa: E402
from report import caption_metrics  # noqa: E402


def eval_dataset(model, data_dir, split):
    """The records to score, as the training data set serves them (the same prompt format and references)."""
    records = load_records(Path(data_dir) / "chat.json")
    indices = split_indices(len(records), model.cfg.val_size, model.cfg.seed)[1] if split == "val" else range(len(records))
    return LlavaDataset(records, list(indices), ImageStore(data_dir), model.tokenizer, model.processor,
                        model.n_image_tokens, model.cfg.max_text_tokens, model.cfg.image_fit)


def evaluate(model, dataset, device, batch_size, num_workers, limit=0):
    """({metric: score}, [{id, prediction, reference}]) over the usable records among the first `limit`."""
    scores, rows = caption_metrics(model, dataset, limit or len(dataset), device, batch_size=batch_size,
                                   num_workers=num_workers, progress=True)
    if not rows:
        raise ConfigError("no record of the split could be used (missing images or malformed records?)")
    return scores, [{"id": id_, "prediction": caption, "reference": truth} for id_, caption, truth in rows]


def main(argv):
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizing happens in the workers
    transformers.utils.logging.disable_progress_bar()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    try:
        path = checkpoint.resolve(args.checkpoint)
        model = checkpoint.load_model(path).place(device)
        scores, predictions = evaluate(model, eval_dataset(model, args.data_dir, args.split), device,
                                       args.batch_size, args.num_workers, args.limit)
    except (ConfigError, HubError) as e:
        sys.exit(f"error: {e}")
    out = Path(args.out or path / f"eval_{args.split}.json")
    out.write_text(json.dumps({"checkpoint": str(path), "data_dir": args.data_dir, "split": args.split,
                               "n": len(predictions), "metrics": scores, "predictions": predictions}, indent=1) + "\n")
    print(" | ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f"  ({len(predictions)} records; {out})")
    return scores


if __name__ == "__main__":
    main(sys.argv[1:])
