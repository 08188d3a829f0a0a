"""What a run tells its user: one line per log step, out_dir/log.jsonl, and Weights & Biases when asked.

Only rank 0 reports; the other ranks stay quiet.
"""
import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.llava import ignore_stop_signals, start_workers
from models.prompt import trained_turns
from training.metrics import answer_scores, caption_scores


def printable(text):
    """A caption as one safe line: control characters (a barely trained model emits any token) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def step_line(step, total, lr, loss, s, skipped, truncated=0):
    """loss None: nothing trained in the interval (every sample unusable, or every step skipped as non-finite).
    skipped, truncated: samples so far; truncated is shown once there is one."""
    mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
    mem = f" | peak {s['peak_mem_gb']:.1f} GiB" if s["peak_mem_gb"] is not None else ""  # the GPU's, since the start
    return (f"step {step:>6}/{total} | loss {'-' if loss is None else f'{loss:.4f}'} | lr {lr:.2e} | dt {s['dt_ms']:.0f}ms | "
            f"{s['samples_per_s']:,.0f} samples/s | {s['tokens_per_s']:,.0f} tok/s | fill {100 * s['fill']:.0f}% | mfu {mfu}{mem} | "
            f"data wait {100 * s['data_wait']:.0f}% | skipped {skipped}" + (f" | truncated {truncated}" if truncated else ""))


class Answer(NamedTuple):
    id: str
    prompt: str      # what the model was given: the conversation up to the scored reply (special tokens left out)
    prediction: str
    reference: str


class Question(NamedTuple):
    id: str
    ids: list        # the prompt's token ids, its image positions expanded
    prompt: str      # the same as text (special tokens left out)
    reference: str   # the reply it is scored against


def sample_captions(model, dataset, n, device, batch_size=64, num_workers=0, progress=False):
    """(rows, skipped): an Answer for each usable record among the first n (fixed) of a dataset, text-only ones
    included, and {reason: count} of the records left out (by their skip reason, or prompt_longer_than_max_text_tokens).
    Each record is asked its own question: its conversation up to its last assistant reply whose prompt fits, which is
    the reference (scored_turn). Records of different prompts, with and without an image, are generated in one batch;
    num_workers DataLoader workers decode the images and write the questions (questions)."""
    first_n = Subset(dataset, range(min(n, len(dataset))))
    ask = partial(questions, tokenizer=model.tokenizer, n_image_tokens=model.n_image_tokens,
                  max_text_tokens=model.cfg.max_text_tokens, pixel_shape=model.vision.pixel_shape)
    rows, skipped = [], Counter()
    loader = DataLoader(first_n, batch_size, num_workers=num_workers, collate_fn=ask, worker_init_fn=ignore_stop_signals)
    for asked, images, skips in tqdm(start_workers(loader), desc="captioning", disable=not progress, dynamic_ncols=True):
        skipped.update(skips)
        if not asked:
            continue
        predictions = model.generate_from_ids([q.ids for q in asked], images.to(device))
        rows += [Answer(q.id, q.prompt, prediction, q.reference) for q, prediction in zip(asked, predictions)]
    return rows, skipped


def questions(items, tokenizer, n_image_tokens, max_text_tokens, pixel_shape):
    """sample_captions' collate_fn, run in a data worker: a batch of data set items -> ([Question] of the usable ones,
    their images stacked [N, *pixel_shape] uint8 in question order (N may be 0), Counter of the reasons the others
    were left out). The batch's images cross from the worker as one tensor: each item's own tensors, one
    transfer through shared memory each, cost eval.py ~3 ms a record (5,000 records on an H100: 24.7 s, now 8.8)."""
    asked, images, skipped = [], [], Counter()
    for item in items:
        turn = None if "skip" in item else scored_turn(item, tokenizer, n_image_tokens, max_text_tokens)
        if turn is None:
            skipped[item.get("skip", "prompt_longer_than_max_text_tokens")] += 1
            continue
        ids, reference = turn
        asked.append(Question(item["id"], ids, tokenizer.decode(ids, skip_special_tokens=True).strip(), reference))
        if "pixel_values" in item:
            images.append(item["pixel_values"])
    return asked, torch.stack(images) if images else torch.zeros((0, *pixel_shape), dtype=torch.uint8), skipped


def caption_metrics(model, dataset, n, device, **captioning):
    """(scores, rows, skipped) of sample_captions over the first n records: metrics.caption_scores (captions) and
    metrics.answer_scores (short answers, VQA-style), {} if no record is usable. captioning: sample_captions'
    batch_size, num_workers, progress."""
    rows, skipped = sample_captions(model, dataset, n, device, **captioning)
    if not rows:
        return {}, [], skipped
    predictions, references = [r.prediction for r in rows], [r.reference for r in rows]
    return {**caption_scores(predictions, references), **answer_scores(predictions, references)}, rows, skipped


def scored_turn(item, tokenizer, n_image_tokens, max_text_tokens):
    """(prompt ids, reference text) of a data set item's last assistant reply whose prompt fits max_text_tokens (the
    reply is never fed to the model, so it may be longer), or None if no prompt fits. The prompt is everything before
    the reply (the conversation so far and the assistant header), the reference the reply's text."""
    labels = item["labels"].tolist()
    image_positions = n_image_tokens if "pixel_values" in item else 0  # no text tokens: not counted, as in encode
    fitting = [(start, end) for start, end in trained_turns(labels) if start - image_positions <= max_text_tokens]
    if not fitting:
        return None
    start, end = fitting[-1]
    return item["input_ids"][:start].tolist(), tokenizer.decode(labels[start:end], skip_special_tokens=True).strip()


class Reporter:
    def __init__(self, cfg, rank, start_step, run_id):
        self.path, self.quiet, self.wandb = Path(cfg.out_dir) / "log.jsonl", rank != 0, None
        if self.quiet:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run rewrites the steps after its checkpoint: keep one history
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if cfg.wandb_project:
            import wandb
            # the run's own id: a resumed run logs on into its wandb run instead of starting a new one
            self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), id=run_id, resume="allow")

    def print(self, line):
        if not self.quiet:
            tqdm.write(line)

    def log(self, step, metrics, captions=()):
        """Appends {step, **metrics} to log.jsonl (and wandb); captions are sample_captions' Answer rows."""
        if self.quiet:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for row in captions:
            tqdm.write(f"  [{row.id}] {printable(row.prediction)}  (reference: {printable(row.reference)})")
        if self.wandb:
            import wandb
            extra = {"captions": wandb.Table(columns=list(Answer._fields), data=[list(r) for r in captions])} if captions else {}
            self.wandb.log({**metrics, **extra}, step=step)

    def plot_curves(self):
        """Redraws out_dir/curves.png from the whole log.jsonl history (matplotlib is imported only here). A run
        stopped before its first log line has nothing to draw."""
        if not self.quiet and self.path.exists():
            from training.curves import plot_curves
            plot_curves(self.path, self.path.parent / "curves.png")

    def close(self):
        if self.wandb:
            self.wandb.finish()
