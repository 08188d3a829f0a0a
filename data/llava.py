"""LLaVA-format data: chat.json records, images from a folder or straight out of images.zip.

A record without an "image" key (LLaVA-Instruct's mix665k has 40k) is a text-only conversation: it
trains the LM alone, and a batch may mix such samples with image samples.

Everything slow (JSON parsing, tokenizing, JPEG decoding, resizing) happens in __getitem__, i.e. in
DataLoader worker processes. A record that cannot be used comes back as {"skip": reason} and is
dropped (and counted) by the collator (data/packing.py), so one bad JPEG never ends a run.
"""
import atexit
import gc
import io
import json
import math
import multiprocessing
import os
import signal
import time
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image, ImageOps

from data.download import DataError, file_sha256, not_records
from models.prompt import SampleError, encode, encoded_length, rendered_lengths, to_messages, trained_turns
from models.vision import image_pixels


def load_records(chat_json):
    """chat.json (one JSON array) -> a `datasets.Dataset` of one JSON string per record ("record") and the image file
    it names ("image"; None for a text-only or malformed record: data/loading.py checks that each is there).

    Records stay serialized so that a malformed one fails alone, in its worker, instead of breaking
    schema inference for all 595k; the Arrow column is shared by forked workers without copies.
    """
    gc.disable()  # parsing makes millions of objects at CC3M's size: each full collection scans them all, for nothing
    try:
        raw = json.loads(Path(chat_json).read_bytes().decode("utf-8", errors="replace"))
        if not isinstance(raw, list) or not raw:
            raise not_records(chat_json, empty=raw == [])
        return Dataset.from_dict({"record": [json.dumps(r) for r in raw], "image": [image_name(r) for r in raw]})
    except json.JSONDecodeError as e:
        raise DataError(f"{chat_json} is not valid JSON ({e}): a truncated download or copy?") from None
    finally:
        gc.enable()


def image_name(record):
    """The image file a record names, if it is well formed (parse_record) and names one. A name that is no text (a lone
    surrogate, which Arrow cannot hold) becomes "": no file has either name, so either way the image is missing."""
    image = record.get("image") if isinstance(record, dict) else None
    if not isinstance(image, str):
        return None
    try:
        image.encode("utf-8")
    except UnicodeEncodeError:
        return ""
    return image


def parse_record(text):
    record = json.loads(text)
    if not isinstance(record, dict) or not isinstance(record.get("image", ""), str):
        raise SampleError("malformed_record", "needs 'conversations' and, if any, an 'image' file name")
    return record


def data_identity(chat_json, n_records):
    """What a checkpoint records of its training data: eval.py compares it to tell the checkpoint's own data
    (where --split val means something) from another data set. The hash is of the file's bytes, so a moved copy
    is still the same data."""
    return {"chat_json": str(Path(chat_json).resolve()), "sha256": file_sha256(chat_json), "records": n_records}


SPLIT_SEED = 0  # the validation split is a property of the data set: every run on it, any --seed, holds out the same


def split_indices(n, val_size):
    """A held-out validation split chosen by a fixed permutation (the same on every rank, run and seed; a smaller
    val_size holds out a subset of a larger one's records)."""
    if val_size >= n:
        raise DataError(f"--val_size {val_size} leaves no training data in a data set of {n} records; lower "
                        f"--val_size (e.g. --val_size {n // 10})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return perm[val_size:], perm[:val_size]


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def ignore_stop_signals(worker_id):
    """Every DataLoader's worker_init_fn: SIGINT and SIGTERM are the main process's to handle (it finishes the
    step and saves). A scheduler or a shell signals the whole process group, and a worker killed by it made the
    main process fail mid-step, before it saved. A worker still ends when its main process goes away (the
    DataLoader's watchdog). Signals held back while it started (start_workers) are dropped now."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader):
    """iter(loader), with stop signals held back while its workers fork: a signal that reached a worker before
    ignore_stop_signals ran would kill it. This process gets it right after."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        workers = iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    atexit.unregister(kill_workers)  # (re)registered after multiprocessing's own exit hook, so it runs before it
    atexit.register(kill_workers)
    return workers


def kill_workers():
    """At exit, multiprocessing ends the daemonic children (the data workers) with SIGTERM, then waits for them,
    and the workers ignore SIGTERM: a loader iterator still alive at exit (training's, once torch.compile ran on
    a GPU) made the process wait forever after its work was done. SIGKILL them first, with SIGCHLD back to its
    default: torch's loader watches its workers with a handler that reports these deaths as a failed worker."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()


class ImageStore:
    """Image bytes by file name, from root/images.zip, root/images/ or root itself."""

    def __init__(self, root):
        root = Path(root)
        self.zip_path = root / "images.zip" if (root / "images.zip").is_file() else None
        self.folder = root / "images" if (root / "images").is_dir() else root
        self._zip = self._members = self._pid = None
        if self.zip_path:  # a truncated download fails here, in one line, not inside a data worker
            try:
                self.members()  # (kept: reading the index of 595K members takes seconds, and has() needs it next)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{self.zip_path} is not a readable zip ({e}): a truncated download or copy? "
                                "Download or copy it again") from None

    def __getstate__(self):  # zip handles do not cross process boundaries; each worker opens its own
        return {**self.__dict__, "_zip": None, "_members": None, "_pid": None}

    def has(self, name):
        """Whether the image exists (packing's planning leaves a missing one out before reading any image)."""
        return (self.folder / name).is_file() if self.zip_path is None else name in self.members()

    def members(self):
        if self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.zip_path), os.getpid()
            self._members = {os.path.basename(i.filename): i for i in self._zip.infolist() if not i.is_dir()}
        return self._members

    def read(self, name):
        if self.zip_path is None:
            path = self.folder / name
            if not path.is_file():  # also False for a NUL or lone surrogate in the name, and for a FIFO or a
                raise SampleError("missing_image", repr(name))  # device, whose reading could block or never end
            try:
                return path.read_bytes()
            except OSError as e:  # permissions, I/O error
                raise SampleError("unreadable_image", f"{name!r}: {e.strerror}") from None
        if name not in self.members():
            raise SampleError("missing_image", name)
        try:
            return self._zip.read(self._members[name])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError, NotImplementedError) as e:
            raise SampleError("corrupt_image", f"{name}: {e}") from None  # bad CRC, encrypted, unknown method


def to_rgb(img):
    """Any PIL mode -> RGB: alpha over white, 16/32-bit scaled to 8-bit, CMYK/palette/gray converted."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / max(a.max() - a.min(), 1e-9) * 255
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def decode_image(data):
    if not data:
        raise SampleError("empty_image_file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # decode now, so truncated files fail here and not later
        ImageOps.exif_transpose(img, in_place=True)  # a photo taken sideways is stored sideways, with a tag
        return to_rgb(img)
    except Image.DecompressionBombError:
        raise SampleError("image_too_large") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise SampleError("corrupt_image", type(e).__name__) from None


def id_of(text, index):
    """A record's id (text: its JSON, the index-th record of its file), printable (a lone surrogate escaped); its place
    in the file when it has none or is no JSON object."""
    record = json.loads(text)
    found = record.get("id", f"record #{index}") if isinstance(record, dict) else f"record #{index}"
    return str(found).encode("utf-8", "backslashreplace").decode()


class LlavaDataset(torch.utils.data.Dataset):
    def __init__(self, records, indices, images, tokenizer, processor, n_image_tokens, max_text_tokens,
                 image_fit="resize"):
        self.records, self.indices, self.images = records, indices, images
        self.tokenizer, self.processor, self.image_fit = tokenizer, processor, image_fit
        self.n_image_tokens, self.max_text_tokens = n_image_tokens, max_text_tokens

    def __len__(self):
        return len(self.indices)

    def text_lengths(self, indices):
        """For each of the records `indices`: (tokens, None), the tokens its sample will take, from its text alone (no
        image is looked at); or (0, reason) for one whose text is known to be unusable (malformed, or too long). Their
        texts are tokenized in one call (models.prompt.rendered_lengths)."""
        results, parsed = [], []  # parsed: (position, messages, has_image) of each record whose text parses
        for at, text in enumerate(self.records[[self.indices[i] for i in indices]]["record"]):
            try:
                record = parse_record(text)
                parsed.append((at, checked_messages(record.get("conversations")), "image" in record))
                results.append(None)
            except SampleError as e:
                results.append((0, e.reason))
        counts = rendered_lengths(self.tokenizer, [messages for _, messages, _ in parsed])
        for (at, messages, has_image), n in zip(parsed, counts):
            try:
                results[at] = encoded_length(self.tokenizer, messages, self.n_image_tokens, self.max_text_tokens,
                                             has_image, rendered=n), None
            except SampleError as e:
                results[at] = 0, e.reason
        return results

    def __getitem__(self, i):
        record_id = id_of(self.records[self.indices[i]]["record"], self.indices[i])
        try:
            record = parse_record(self.records[self.indices[i]]["record"])
            messages = checked_messages(record.get("conversations"))
            input_ids, labels = encode(self.tokenizer, messages, self.n_image_tokens, self.max_text_tokens,
                                       has_image="image" in record)
            cut = sum(m["role"] == "assistant" for m in messages) > len(trained_turns(labels))  # over max_text_tokens
            sample = {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "id": record_id,
                      "truncated": cut}
            if "image" in record:
                image = decode_image(self.images.read(record["image"]))
                sample["pixel_values"] = image_pixels(self.processor, [image], self.image_fit)[0]  # [3, H, W] uint8
        except SampleError as e:
            return {"skip": e.reason, "id": record_id}
        return sample


def checked_messages(conversations):
    """to_messages, and every turn's text encodable: a lone surrogate ("\\ud800" in the JSON) is valid JSON but no
    text, and the tokenizer would raise a TypeError that ends the run."""
    messages = to_messages(conversations)
    try:
        for m in messages:
            m["content"].encode("utf-8")
    except UnicodeError:
        raise SampleError("bad_text", "text that cannot be encoded") from None
    return messages


def steps_of_micro_batches(loader, start_step, grad_accum):
    """Yields the grad_accum micro-batches of each optimizer step from any step on, from one iterator over the
    endless sampler: the data order is a function of the step alone, which is what makes resuming exact. (When
    grad_accum does not divide an epoch's batches, a step may hold the end of one epoch and the start of the next.)
    Each comes with the seconds the loop waited for it (the time this generator ran to make it). The workers start
    at once, not at the first step: they open the images (at CC3M's size, a zip index of 595K members each) and make
    the first batches while the model compiles."""
    loader.batch_sampler.start = start_step * grad_accum
    return timed_steps(start_workers(loader), grad_accum)


def timed_steps(batches, grad_accum):
    t0 = time.perf_counter()
    while True:
        step = [next(batches) for _ in range(grad_accum)]
        yield step, time.perf_counter() - t0
        t0 = time.perf_counter()


FALSE_STOP = 1e-6  # the chance at which a share of unusable samples no higher than max_bad_fraction may stop a run


def beyond_chance(bad, seen, max_bad_fraction):
    """Whether `bad` unusable samples of `seen` show the data's unusable share to be above max_bad_fraction, rather
    than an unlucky draw from data within it. Chernoff's bound for the binomial tail, P(X >= bad) <= exp(-seen *
    KL(bad/seen || max_bad_fraction)), must fall below FALSE_STOP. A fixed minimum of samples cannot do this for every
    limit: 10 of the first 167 samples (6%) are a common draw from 3% unusable data, and trip a 5% limit. With the
    bound, 3% never stopped a 5% limit in 2,000 simulated runs of 20,000 samples each checked (nor did 4%), while 10%
    stops after about 600 samples, and 8 of the first 8 (not 1 of 1) stop a 5% limit."""
    q, f = bad / seen, max_bad_fraction
    if q <= f:
        return False
    if f == 0:
        return True
    kl = q * math.log(q / f) + ((1 - q) * math.log((1 - q) / (1 - f)) if q < 1 else 0.0)
    return seen * kl > -math.log(FALSE_STOP)


class SkipTally:
    """Samples seen, skipped (by reason) and truncated on this rank: the records only loading finds unusable (a corrupt
    image, ...; those the length pass found are left out before, data/loading.py). Stops the run when they are more
    than max_bad_fraction beyond chance (beyond_chance), so an unlucky first batch does not end a run."""

    def __init__(self, seen=0, skipped=(), examples=(), truncated=0):
        self.seen, self.skipped, self.examples = seen, Counter(dict(skipped)), list(examples)
        self.truncated = truncated  # samples cut at a turn's end to fit max_text_tokens (trained, not skipped)

    def state_dict(self):
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": self.examples,
                "truncated": self.truncated}

    def add(self, batches):
        for b in batches:
            self.seen += len(b["lengths"]) + len(b["skipped_ids"])
            self.truncated += b["truncated"]
            self.skipped.update(b["skipped"])
            self.examples = (self.examples + b["skipped_ids"])[:5]

    def check(self, max_bad_fraction):
        bad = sum(self.skipped.values())
        if bad and beyond_chance(bad, self.seen, max_bad_fraction):
            raise DataError(f"{bad} of the first {self.seen} samples were unusable ({dict(self.skipped)}), more "
                            f"than max_bad_fraction={max_bad_fraction} beyond chance; for example {self.examples}. "
                            "Fix the data, or raise --max_bad_fraction")
