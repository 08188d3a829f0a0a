"""Scoring a checkpoint, as eval.py does once its flags are checked (eval.py's opening says what and how): the records
to score and their split, the checkpoint's answers to them, their scores and the JSON file."""
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

import transformers

from data.download import DataError
from data.llava import ImageStore, LlavaDataset, data_identity, id_of, load_records, split_indices
from models.config import ConfigError, VLMConfig
from models.hub import HubError
from training import checkpoint
from training.distributed import pick_device
from training.metrics import score_line
from training.report import caption_metrics


class EvalData(NamedTuple):
    records: object   # load_records' data set
    indices: list     # the records to score
    images: ImageStore
    identity: dict    # data_identity of the chat.json
    split: str        # "val" or "all"
    own: bool         # the checkpoint trained on this data
    why: str          # the split chosen, and why, for the user
    trained: set      # the ids of the checkpoint's training split, None if its data is not here to read


def records_to_score(path, data_dir, requested, chat_json=""):
    """The records to score (of chat_json, or data_dir/chat.json), checked before the model loads: a data mistake (a
    truncated json or zip, the wrong split for this data) is said in a second, not after the model has loaded."""
    chat_json = Path(chat_json).expanduser() if chat_json else Path(data_dir).expanduser() / "chat.json"
    records = load_records(chat_json)
    identity = data_identity(chat_json, len(records))
    trained_on = checkpoint.run_info(path).get("data", {})
    split, own, why = pick_split(requested, identity, trained_on, path)
    cfg = VLMConfig.load(path / "config.json")
    if split == "val":
        indices = split_indices(len(records), cfg.val_size)[1]
        if not indices:
            raise ConfigError(f"--split val: the run of {path} held out no records (val_size 0); use --split all")
    else:
        indices = list(range(len(records)))
    trained = training_ids(records if own else training_records(cfg, trained_on), cfg.val_size)
    return EvalData(records, indices, ImageStore(Path(data_dir).expanduser()), identity, split, own, why, trained)


def training_records(cfg, trained_on):
    """The records of the data the checkpoint trained on (run.json's chat_json, or where its config points, with the
    sha256 run.json holds), or None when it is not here, or changed, or the checkpoint does not record it."""
    if not trained_on:
        return None
    candidates = [trained_on["chat_json"], cfg.chat_json, cfg.data_dir and Path(cfg.data_dir) / "chat.json"]
    for chat_json in (Path(c).expanduser() for c in candidates if c):
        if chat_json.is_file() and data_identity(chat_json, 0)["sha256"] == trained_on["sha256"]:
            return load_records(chat_json)
    return None


def training_ids(records, val_size):
    """The ids of the records in the training split of `records` (as the run split them), None without records.
    A test set drawn from the training data would score what the model learned by heart; eval.py says how many of its
    scored records were in that split, matched by id (the records may be copied into another file)."""
    if records is None:
        return None
    texts = records.data.column("record").to_pylist()  # in one go: row by row, Dataset takes 30 s for CC3M
    return {id_of(texts[i], i) for i in split_indices(len(texts), val_size)[0]}


def pick_split(requested, identity, trained_on, path):
    """(split, own, why). val scores the records the checkpoint's run held out, which exist only in the data it
    trained on: `own` says that this is that data (the same sha256 as run.json's), or, for a checkpoint without
    run.json, that --split val says so."""
    data = identity["chat_json"]
    if not trained_on:
        if requested == "auto":
            raise ConfigError(f"{path} does not record the data it trained on (no run.json: an older checkpoint); pass "
                              f"--split val if {data} is that data (to score its held-out records), else --split all")
        return requested, requested == "val", f"as asked ({path} does not record the data it trained on)"
    own = trained_on["sha256"] == identity["sha256"]
    if requested == "val" and not own:
        raise ConfigError(f"--split val: {data} is not the data {path} trained on ({trained_on['chat_json']}), so "
                          "none of its records was held out by that run; use --split all")
    split = requested if requested != "auto" else "val" if own else "all"
    if not own:
        return split, own, f"{data} is not the data {path} trained on ({trained_on['chat_json']})"
    held = "the records its run held out" if split == "val" else "every record, its training records included"
    return split, own, f"{data} is the data {path} trained on: scoring {held}"


def score(model, dataset, device, batch_size, num_workers, limit=0):
    """({metric: score}, [{id, prediction, reference}], {reason: count of skipped records}) over the first `limit`
    records (0: all)."""
    scores, rows, skipped = caption_metrics(model, dataset, limit or len(dataset), device, batch_size=batch_size,
                                            num_workers=num_workers, progress=True)
    if not rows:
        raise DataError(f"no record of the split could be used ({describe(skipped)})")
    return scores, [row._asdict() for row in rows], skipped


def describe(skipped):
    reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.most_common())
    return f"{sum(skipped.values())} skipped" + (f": {reasons}" if reasons else "")


def default_out(path, data):
    """eval_<split>.json for the checkpoint's own data; another data set's name carries its id, so that scoring it
    never overwrites the result on the training data."""
    return path / (f"eval_{data.split}.json" if data.own else f"eval_{data.split}-{data.identity['sha256'][:8]}.json")


def score_checkpoint(args):
    """eval.py's work, its flags (args) checked: the scores, also written with every answer to the JSON file."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizing happens in the workers
    transformers.utils.logging.disable_progress_bar()
    try:
        device = pick_device(args.device)
        path = checkpoint.resolve(args.checkpoint)
        data = records_to_score(path, args.data_dir, args.split, args.chat_json)
        out = Path(args.out or default_out(path, data))
        if out.exists():  # (as lmms-eval's results: training/lmms.py)
            raise ConfigError(f"{out} exists: results are never overwritten; move it away, or name another file "
                              "with --out")
        print(f"split {data.split}{' (auto)' if args.split == 'auto' else ''}: {data.why}", flush=True)
        model = checkpoint.load_model(path).place(device)
        # no max_text_tokens: the reference reply is never fed to the model; scored_turn asks each prompt that fits it
        dataset = LlavaDataset(data.records, data.indices, data.images, model.tokenizer, model.processor,
                               model.n_image_tokens, None, model.cfg.image_fit)
        scores, predictions, skipped = score(model, dataset, device, args.batch_size, args.num_workers, args.limit)
    except (ConfigError, DataError, HubError) as e:
        sys.exit(f"error: {e}")
    seen = None if data.trained is None else sum(p["id"] in data.trained for p in predictions)
    with open(out, "x") as f:  # "x": fails rather than overwrite one written while this one scored
        f.write(json.dumps({"checkpoint": str(path), "data_dir": args.data_dir, "data": data.identity,
                            "split": data.split, "n": len(predictions), "skipped": sum(skipped.values()),
                            "skipped_reasons": dict(skipped), "in_training_split": seen, "metrics": scores,
                            "predictions": predictions}, indent=1) + "\n")
    print(overlap_line(seen, len(predictions), data, path))
    print(score_line(scores, digits=4)
          + f"  ({len(predictions)} records scored, {describe(skipped)}; {out})")
    return scores


def overlap_line(seen, n, data, path):
    """How many scored records the checkpoint trained on: scores over them measure recall, not generalisation."""
    if seen is None:
        return (f"could not check which scored records {path} trained on: its training data (run.json's) is not on "
                "this machine with the same sha256, or the checkpoint does not record it")
    line = f"{seen} of the {n} scored records are in the training split of {path} (matched by id)"
    return f"warning: {line}: their scores measure recall, not another data set" if seen and not data.own else line
