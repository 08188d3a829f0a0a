"""Every record's length from its text, kept from one start to the next.

Packing plans with the length of every record before the first step (data/packing.py), and finding them tokenizes
every record: minutes of CPU time at CC3M's 595K records, at every start, resume and rank. They depend on nothing
but the data and the tokenizer, so the first start keeps them in a small file, cache_dir/lengths/ (next to the
downloaded data set and the converted models), and every later start reads it: a second run, a resume, on every rank.
(On the first start each rank tokenizes for itself, alongside the others: ranks need not share a filesystem, and
waiting for rank 0 would take as long.) The file's name and contents carry what the lengths depend on (length_key);
one that does not match, or cannot be read, is ignored and written anew. Whether each image is there is not kept:
images come and go without chat.json changing, so every start looks (data/loading.py). Removing the folder costs
the next start one pass over the text.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import transformers

from data import llava
from models import prompt

SAMPLE_CODE = (prompt, llava)  # the code that makes a record's text a sample: the prompt format, the record's parsing


def length_key(data_sha256, tokenizer, n_image_tokens, max_text_tokens):
    """What the lengths depend on: the data's bytes, the tokenizer, the sample's settings, and the code and library
    that render and tokenize it."""
    return {"data_sha256": data_sha256, "tokenizer": tokenizer.name_or_path,
            "tokenizer_sha256": tokenizer_sha256(tokenizer), "n_image_tokens": n_image_tokens,
            "max_text_tokens": max_text_tokens, "transformers": transformers.__version__,
            "code_sha256": sha256_of(*(Path(module.__file__).read_text() for module in SAMPLE_CODE))}


def tokenizer_sha256(tokenizer):
    """A hash of what makes a tokenizer's token counts: a fast tokenizer's whole definition (vocabulary, merges,
    normalizer, pre-tokenizer, added tokens, <image> among them) or a slow one's vocabulary, its special tokens and
    its chat template. Two tokenizers of one name_or_path (a folder rewritten, a template changed) differ here."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps(tokenizer.special_tokens_map, sort_keys=True)
    return sha256_of(definition, specials, tokenizer.chat_template or "")


def sha256_of(*texts):
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())  # each part hashed alone: no two splits of a text alike
    return digest.hexdigest()


def cache_path(cache_dir, key):
    """cache_dir/lengths/<the data's hash>-<the key's hash>.json: one file per data set and settings."""
    name = f"{key['data_sha256'][:16]}-{sha256_of(json.dumps(key, sort_keys=True))[:16]}.json"
    return Path(cache_dir).expanduser() / "lengths" / name


def read_lengths(path, key, n_records):
    """The (length, reason) of every record kept at `path` for `key`; None if there are none (no file, another key,
    another count, or a file that does not parse)."""
    try:
        kept = json.loads(Path(path).read_text())
        lengths, reasons = kept["lengths"], kept["reasons"]
        if kept["key"] != key or len(lengths) != n_records or not all(type(n) is int for n in lengths):
            return None
        return [(n, reasons.get(str(i))) for i, n in enumerate(lengths)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_lengths(path, key, lengths):
    """Keep `lengths` ((length, reason) per record) at `path`. The file is written whole under a temporary name in its
    folder, then renamed over `path` (os.replace is atomic): ranks that write at once, or a run killed while writing,
    leave one whole file. A folder that cannot be written costs the next start a pass over the text, not this run."""
    kept = {"key": key, "lengths": [n for n, _ in lengths],
            "reasons": {str(i): reason for i, (_, reason) in enumerate(lengths) if reason}}
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            json.dump(kept, f)
        os.replace(tmp, path)
    except OSError as e:
        if tmp:
            tmp.unlink(missing_ok=True)
        print(f"could not keep the records' lengths in {path} ({e}); the next start tokenizes them again", flush=True)


def kept_lengths(cache_dir, key, n_records, compute):
    """compute()'s (length, reason) of every record: read from cache_dir if a start before kept them for `key`,
    else computed and kept."""
    path = cache_path(cache_dir, key)
    lengths = read_lengths(path, key, n_records)
    if lengths is None:
        lengths = compute()
        write_lengths(path, key, lengths)
    return lengths
