"""What a run tells its user: one line per log step, out_dir/log.jsonl, and Weights & Biases when asked.

Only rank 0 reports; the other ranks stay quiet.
"""
import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from data.llava import ignore_stop_signals, start_workers
from metrics import caption_scores


def printable(text):
    """A caption as one safe line: control characters (a barely trained model emits any token) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def step_line(step, total, lr, loss, s, skipped):
    """loss None: nothing trained in the interval (every sample unusable, or every step skipped as non-finite)."""
    mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
    return (f"step {step:>6}/{total} | loss {'-' if loss is None else f'{loss:.4f}'} | lr {lr:.2e} | dt {s['dt_ms']:.0f}ms | "
            f"{s['samples_per_s']:,.0f} samples/s | {s['tokens_per_s']:,.0f} tok/s | fill {100 * s['fill']:.0f}% | mfu {mfu} | "
            f"data wait {100 * s['data_wait']:.0f}% | skipped {skipped}")


def sample_captions(model, dataset, n, device, batch_size=64, num_workers=0, progress=False):
    """(rows, skipped): (id, caption, reference) for the image records among the first n (fixed) of a dataset,
    captioned in batches, and {reason: count} of the records left out (unusable ones by their skip reason,
    text-only ones as text_only); num_workers DataLoader workers decode the images meanwhile."""
    first_n = Subset(dataset, range(min(n, len(dataset))))
    rows, skipped = [], Counter()
    loader = DataLoader(first_n, batch_size, num_workers=num_workers, collate_fn=list, worker_init_fn=ignore_stop_signals)
    for chunk in tqdm(start_workers(loader), desc="captioning", disable=not progress, dynamic_ncols=True):
        skipped.update(item.get("skip", "text_only") for item in chunk if "pixel_values" not in item)
        chunk = [item for item in chunk if "pixel_values" in item]
        if not chunk:
            continue
        captions = model.generate(torch.stack([item["pixel_values"] for item in chunk]).to(device))
        rows += [(item["id"], caption, reference(model.tokenizer, item)) for item, caption in zip(chunk, captions)]
    return rows, skipped


def caption_metrics(model, dataset, n, device, **captioning):
    """(metrics.caption_scores, rows, skipped) of sample_captions over the first n records; scores {} if none is
    usable. captioning: sample_captions' batch_size, num_workers, progress."""
    rows, skipped = sample_captions(model, dataset, n, device, **captioning)
    if not rows:
        return {}, [], skipped
    return caption_scores([caption for _, caption, _ in rows], [truth for _, _, truth in rows]), rows, skipped


def reference(tokenizer, item):
    """The text a data set item trains on (its labelled tokens), special tokens left out."""
    return tokenizer.decode([t for t in item["labels"].tolist() if t >= 0], skip_special_tokens=True)


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
        """Appends {step, **metrics} to log.jsonl (and wandb); captions are (id, caption, reference) rows."""
        if self.quiet:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for id_, caption, truth in captions:
            tqdm.write(f"  [{id_}] {printable(caption)}  (reference: {printable(truth)})")
        if self.wandb:
            import wandb
            extra = {"captions": wandb.Table(columns=["id", "caption", "reference"], data=list(captions))} if captions else {}
            self.wandb.log({**metrics, **extra}, step=step)

    def plot_curves(self):
        """Redraws out_dir/curves.png from the whole log.jsonl history (matplotlib is imported only here)."""
        if not self.quiet:
            from curves import plot_curves
            plot_curves(self.path, self.path.parent / "curves.png")

    def close(self):
        if self.wandb:
            self.wandb.finish()
