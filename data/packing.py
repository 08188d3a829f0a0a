"""Packing: whole samples laid end to end in a fixed token budget, so the model meets one shape whatever the records.

A micro-batch is one row of `batch_tokens` tokens holding at most `batch_size` samples: the epoch's shuffled records,
taken in order until the next one would not fit (plan_micro_batches). The LM always sees [1, batch_tokens]; padding
is only the gap at the row's end (one sample at most) and the holes of records that turned out unusable. Each sample
keeps to itself: attention stays inside it (models/attention.py), its position ids restart at 0, and no label
crosses into the next sample. The vision tower sees the micro-batch's images padded with blank ones to a multiple of
IMAGE_MULTIPLE: a few image counts, however many records are text-only or unusable; the tower is compiled once for
all of them (its batch dimension is dynamic) and records one CUDA graph per count.

Planning needs every record's length before any image is read: text_lengths tokenizes the text of each record
once, in the DataLoader's worker processes (LlavaDataset.text_lengths), and data/length_cache.py keeps the lengths
for the next start. The records found unusable (a missing image, malformed or too long text) are left out of the plan
(data/loading.py); the collator's holes are those that only loading finds (a corrupt image, a template problem).
"""
from collections import Counter

import torch
from torch.utils.data import DataLoader

from data.llava import ignore_stop_signals, start_workers
from models.prompt import IGNORE, label_positions

MODEL_INPUTS = ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "label_index")  # VLM.forward's
IMAGE_MULTIPLE = 16  # images per micro-batch are padded up to a multiple of this: few CUDA graphs, little blank work


def image_slots(n_images, batch_size):
    """How many images the vision tower runs on for a micro-batch with n_images: n_images rounded up to a multiple
    of IMAGE_MULTIPLE (of batch_size when smaller), at least one multiple, never above the most a micro-batch holds."""
    m = min(IMAGE_MULTIPLE, batch_size)
    return min(max(m, -(-n_images // m) * m), max(batch_size, m))


def plan_micro_batches(order, lengths, batch_size, batch_tokens):
    """Cut `order` (record indices) into micro-batches of consecutive records: at most batch_size records and
    batch_tokens tokens each. A record of length 0 (known to be unusable) takes no room."""
    batches, current, used = [], [], 0
    for i in order:
        n = lengths[i]
        if current and (len(current) == batch_size or used + n > batch_tokens):
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    return batches + [current] if current else batches


class PackedBatchSampler:
    """Epoch after epoch, without end: a seeded permutation per epoch, planned into micro-batches, dealt across ranks.

    Every rank gets the same number of micro-batches per epoch (the plan's tail is dropped), and iteration can start
    at any micro-batch of any epoch (`start`), which is what makes resuming exact. Being endless, it lets one loader
    iterator serve the whole run: the workers load the next epoch's first batches while this epoch's last ones train.
    len(): micro-batches per rank in the first epoch (later epochs' plans differ by a few).
    """

    def __init__(self, lengths, batch_size, batch_tokens, rank=0, world=1, seed=0):
        self.lengths, self.batch_size, self.batch_tokens = list(lengths), batch_size, batch_tokens
        self.rank, self.world, self.seed = rank, world, seed
        self.start = 0  # the micro-batch iteration begins at, counted over epochs
        self.first_epoch = self.epoch(0)
        if not self.first_epoch:
            raise ValueError(f"{len(self.lengths)} training samples make fewer micro-batches than the {world} ranks; "
                             "lower batch_tokens or batch_size")

    def epoch(self, e):
        """This rank's micro-batches of epoch e."""
        perm = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + e)).tolist()
        plan = plan_micro_batches(perm, self.lengths, self.batch_size, self.batch_tokens)
        return plan[: len(plan) // self.world * self.world][self.rank::self.world]

    def __len__(self):
        return len(self.first_epoch)

    def __iter__(self):
        skip, e = self.start, 0
        while True:
            mine = self.first_epoch if e == 0 else self.epoch(e)
            yield from mine[skip:]
            skip, e = max(0, skip - len(mine)), e + 1


class Packer:
    """The collator: a micro-batch's samples end to end in one row of batch_tokens tokens. Skipped records are
    dropped and counted. Returns input_ids, labels, position_ids [1, N]; cu_seqlens [cap] (int32: each sample's
    start, then the padding's pieces, then N repeated to a fixed size); pixel_values [slots, 3, H, W] (the images in
    sample order, then blank ones); label_index (where the LM head runs, found here on the CPU: no GPU sync)."""

    def __init__(self, pad_id, image_shape, batch_size, batch_tokens, max_len):
        self.pad_id, self.image_shape, self.max_len = pad_id, image_shape, max_len
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.cap = batch_size + -(-batch_tokens // max_len) + 1  # every sample, every piece of padding, the end

    def __call__(self, samples):
        good = [s for s in samples if "skip" not in s]
        bad = [s for s in samples if "skip" in s]
        lengths = [len(s["input_ids"]) for s in good]
        N = self.batch_tokens
        if sum(lengths) > N or len(good) > self.batch_size:
            raise ValueError(f"{len(good)} samples of {sum(lengths)} tokens exceed a micro-batch ({self.batch_size} "
                             f"samples, {N} tokens): plan micro-batches with data.packing.plan_micro_batches")
        input_ids = torch.full((N,), self.pad_id, dtype=torch.long)
        labels = torch.full((N,), IGNORE, dtype=torch.long)
        position_ids = torch.zeros(N, dtype=torch.long)
        starts = [0]
        for s, n in zip(good, lengths):
            at = starts[-1]
            input_ids[at:at + n], labels[at:at + n] = s["input_ids"], s["labels"]
            labels[at] = IGNORE  # never the target of the previous sample's last token (templates start with one)
            starts.append(at + n)
        while starts[-1] < N:  # the padding: pieces no longer than a sample, that nothing attends to
            starts.append(min(N, starts[-1] + self.max_len))
        for at, end in zip(starts, starts[1:]):
            position_ids[at:end] = torch.arange(end - at)
        images = [s["pixel_values"] for s in good if "pixel_values" in s]
        pixel_values = torch.zeros((image_slots(len(images), self.batch_size), *self.image_shape), dtype=torch.uint8)
        if images:
            pixel_values[:len(images)] = torch.stack(images)
        label_index = label_positions(labels[None])
        return {
            "input_ids": input_ids[None],                                      # [1, N]
            "labels": labels[None],                                            # [1, N]
            "position_ids": position_ids[None],                                # [1, N]
            "cu_seqlens": torch.tensor(starts + [N] * (self.cap - len(starts)), dtype=torch.int32),  # [cap]
            "pixel_values": pixel_values,                                      # [slots, 3, H, W] uint8
            "label_index": label_index,
            "n_label_tokens": len(label_index),
            "lengths": lengths,                                                # the samples' own lengths
            "n_images": len(images),
            "truncated": sum(s.get("truncated", False) for s in good),  # cut at a turn's end to fit
            "skipped": Counter(s["skip"] for s in bad),
            "skipped_ids": [s["id"] for s in bad],
        }


class _TextLengths(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, indices):  # the DataLoader's batch in one call: its texts tokenized together
        return self.dataset.text_lengths(indices)


def text_lengths(dataset, num_workers):
    """Every record's (length in tokens, None) from its text, or (0, reason) for one whose text is unusable
    (LlavaDataset.text_lengths), tokenized 1024 records a call in num_workers worker processes."""
    loader = DataLoader(_TextLengths(dataset), batch_size=1024, num_workers=num_workers, collate_fn=list,
                        worker_init_fn=ignore_stop_signals)
    return [n for chunk in start_workers(loader) for n in chunk]


def to_device(batch, device):
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}
