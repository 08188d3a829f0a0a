"""From the config to this rank's data loaders: the records, their split, every record's length (packing plans
with them, before the model loads), then the loaders of packed micro-batches."""
from collections import Counter

import torch
from torch.utils.data import DataLoader

from data.download import DataError, chat_json_path, ensure_dataset
from data.length_cache import kept_lengths, length_key
from data.llava import (ImageStore, LlavaDataset, data_identity, id_of, ignore_stop_signals, load_records,
                        split_indices)
from data.packing import Packer, PackedBatchSampler, plan_micro_batches, text_lengths
from models.config import ConfigError
from models.vision import n_image_tokens


def open_data(cfg, tokenizer, rank, world):
    """The records, their split, the images, and this rank's packed micro-batches, planned before the model loads
    (packing needs every record's length: one pass over the text, data/packing.py, kept for the next start by
    data/length_cache.py): a data mistake (an empty or truncated file, too few records, too many unusable ones) costs
    seconds, not the minutes of loading. The records found unusable are judged over the whole data set (unusable) and
    left out of both splits; the split itself stays that of every record (the same held-out records whatever is
    missing)."""
    root = ensure_dataset(cfg)
    chat_json = chat_json_path(cfg)
    records = load_records(chat_json)
    identity = data_identity(chat_json, len(records))
    images = ImageStore(root)
    text = LlavaDataset(records, range(len(records)), images, tokenizer, None, n_image_tokens(cfg), cfg.max_text_tokens)
    key = length_key(identity["sha256"], tokenizer, text.n_image_tokens, cfg.max_text_tokens)
    from_text = kept_lengths(cfg.cache_dir, key, len(records), lambda: text_lengths(text, cfg.num_workers))
    image_names = records["image"][:]  # a list: a datasets Column iterates row by row, for seconds
    lengths, reasons = zip(*with_images(from_text, image_names, images))
    unusable = judge_unusable(records, reasons, cfg.max_bad_fraction)
    train_idx, val_idx = ([i for i in split if lengths[i]] for split in split_indices(len(records), cfg.val_size))
    sampler = PackedBatchSampler([lengths[i] for i in train_idx], cfg.batch_size, cfg.batch_tokens, rank, world,
                                 cfg.seed)
    if len(sampler) < cfg.grad_accum:
        raise ConfigError(f"config field 'grad_accum' = {cfg.grad_accum}: more micro-batches than one epoch has "
                          f"({len(sampler)} per rank); lower grad_accum or batch_tokens")
    if cfg.sharded(world) and 0 < len(val_idx) < world:  # a sharded model's every forward needs all ranks
        raise ConfigError(f"config field 'val_size' = {cfg.val_size}: {len(val_idx)} usable validation records for "
                          f"{world} processes, and each needs one; raise val_size to at least {world} (or 0: none)")
    val_idx = val_idx[rank::world]
    val_batches = plan_micro_batches(range(len(val_idx)), [lengths[i] for i in val_idx], cfg.batch_size,
                                     cfg.batch_tokens)
    return dict(records=records, train_idx=train_idx, val_idx=val_idx, images=images, sampler=sampler,
                val_batches=val_batches, unusable=unusable, identity=identity)


def with_images(text_lengths, image_names, images):
    """Each record's (length, reason): its text's (text_lengths), or (0, "missing_image") if the image it names is not
    there. Looked up at every start, never kept: images come and go without chat.json changing."""
    return [(0, "missing_image") if name is not None and not images.has(name) else found
            for found, name in zip(text_lengths, image_names)]


def judge_unusable(records, reasons, max_bad_fraction):
    """{reason: count} of the records the length pass found unusable (reasons: one per record, None if usable); a
    DataError naming examples if they are more than max_bad_fraction of the data set. Every record is known here, so
    this is the data set's own share, not an estimate: SkipTally judges only what loading finds later."""
    bad = [i for i, reason in enumerate(reasons) if reason]
    counts = Counter(reasons[i] for i in bad)
    if len(bad) > max_bad_fraction * len(reasons):
        examples = [id_of(records[i]["record"], i) for i in bad[:5]]
        raise DataError(f"{len(bad)} of {len(reasons)} records are unusable ({dict(counts)}), more than "
                        f"max_bad_fraction={max_bad_fraction}; for example {examples}. Fix the data, or raise "
                        "--max_bad_fraction")
    return counts


def build_data(cfg, model, rank, world, data=None):
    """This rank's training loader (packed micro-batches from a sampler that can start at any step) and validation
    loader, over open_data's data (opened here if not given)."""
    data = data or open_data(cfg, model.tokenizer, rank, world)

    def dataset(indices):
        return LlavaDataset(data["records"], indices, data["images"], model.tokenizer, model.processor,
                            model.n_image_tokens, cfg.max_text_tokens, cfg.image_fit)

    # Training's workers live as long as the run's one iterator (the sampler never ends), an evaluation's as long
    # as the evaluation: none outlive the run. They leave stop signals to this process (ignore_stop_signals).
    loading = dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                   collate_fn=Packer(model.tokenizer.pad_token_id, model.vision.pixel_shape, cfg.batch_size,
                                     cfg.batch_tokens, model.max_sample_len),
                   worker_init_fn=ignore_stop_signals,
                   generator=torch.Generator())  # its own RNG: starting the data must not shift dropout's
    return (DataLoader(dataset(data["train_idx"]), batch_sampler=data["sampler"], **loading),
            DataLoader(dataset(data["val_idx"]), batch_sampler=data["val_batches"], **loading))
