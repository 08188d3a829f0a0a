"""Find LLaVA-CC3M on disk, or download chat.json and images.zip from the hub (resumable).

Nothing heavy is imported here: main.py checks a user's data with it before it imports torch.
"""
import hashlib
import os
import shutil
import time
from pathlib import Path

from models.hub import OFFLINE_DEMO, hub_reachable

FILES = ("chat.json", "images.zip")


class DataError(RuntimeError):
    """The data set is missing or unusable; the message says what to do."""


def is_complete(root):
    return (root / "chat.json").is_file() and ((root / "images.zip").is_file() or (root / "images").is_dir())


def data_root(cfg):
    """The folder of the images (and of chat.json, unless cfg.chat_json names it): data_dir, or the cache's copy."""
    return Path(cfg.data_dir or Path(cfg.cache_dir) / cfg.dataset.replace("/", "--")).expanduser()


def chat_json_path(cfg):
    return Path(cfg.chat_json).expanduser() if cfg.chat_json else data_root(cfg) / "chat.json"


def check_data_dir(cfg):
    """A user's data (--data_dir, --chat_json) is there and chat.json starts like a JSON array of records: cheap
    (no torch, chat.json's first bytes only), so main.py says a mistake before its slow imports. Returns cfg."""
    if cfg.data_dir:
        if not cfg.chat_json and not is_complete(data_root(cfg)):
            raise DataError(f"data_dir {data_root(cfg)} must hold chat.json and images.zip (or an images/ folder)")
        check_chat_json_start(chat_json_path(cfg))
    return cfg


HEAD_BYTES = 4096


def check_chat_json_start(chat_json):
    """chat.json opens a JSON array with something in it; load_records parses the whole file later."""
    with open(chat_json, "rb") as f:
        head = f.read(HEAD_BYTES).decode("utf-8", errors="replace").lstrip()
    empty = not head or head[1:].lstrip().startswith("]")  # an empty file, or []
    if empty or not head.startswith("["):
        raise not_records(chat_json, empty)


def not_records(chat_json, empty):
    """The error of a chat.json that is no JSON array of records (load_records and check_chat_json_start)."""
    return DataError(f"{chat_json} must hold a JSON array of LLaVA records" + (", and it is empty" if empty else ""))


_SHA256 = {}  # (path, size, modification time, inode) -> the file's sha256
SETTLED_S = 2.0  # a file modified more recently than this is never remembered (file_sha256)


def file_sha256(path):
    """The sha256 of a file's bytes, remembered while the file keeps its size, modification time and inode: a resume
    checks chat.json against its checkpoint (training/checkpoint.py) and open_data then records it, one read of the
    file for both. A file modified in the last SETTLED_S seconds is not remembered: rewritten within the same tick of
    the filesystem's clock, it could keep all three."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key in _SHA256:
        return _SHA256[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if time.time() - stat.st_mtime >= SETTLED_S:
        _SHA256[key] = digest.hexdigest()
    return digest.hexdigest()


def ensure_dataset(cfg):
    """Return the folder holding chat.json and the images, downloading into the cache if needed. With
    cfg.chat_json (an instruction file such as llava_v1_5_mix665k.json), data_dir is the folder its image
    paths are relative to (coco/train2017/000000033471.jpg, gqa/images/..., ...)."""
    root = data_root(cfg)
    if cfg.data_dir:
        check_data_dir(cfg)
        return root
    if is_complete(root):
        return root
    if not hub_reachable():
        raise DataError(cannot_download(cfg, "the Hugging Face Hub is offline or unreachable"))
    from huggingface_hub import hf_hub_download  # progress bars; resumes an interrupted download
    print(f"downloading {cfg.dataset} ({', '.join(FILES)}; images.zip is 6.5 GB) into {root}")
    new = outermost_new_folder(root)
    try:
        for name in FILES:
            hf_hub_download(cfg.dataset, name, repo_type="dataset", local_dir=root)
    except Exception as e:  # no such repo, a broken connection, a full disk: all end the same way
        if new and not resumable(root):  # the hub's locks and markers, in folders this call made: all go
            shutil.rmtree(new, ignore_errors=True)  # (an error here must not hide the one being reported)
        raise DataError(cannot_download(cfg, f"{type(e).__name__}: {str(e)[:200]}")) from e
    return root


def cannot_download(cfg, why):
    return (f"could not download {cfg.dataset} ({why}).\nDownload {' and '.join(FILES)} from "
            f"https://huggingface.co/datasets/{cfg.dataset} into a folder and pass it as --data_dir, or {OFFLINE_DEMO}")


def outermost_new_folder(root):
    """The outermost folder of root's path that does not exist yet (None if root does): all that a failed
    download may remove, so it never touches what it did not make."""
    missing = [p for p in (root, *root.parents) if not p.exists()]
    return missing[-1] if missing else None


def resumable(root):
    """Whether root holds downloaded bytes that a rerun resumes from (a finished file, or a partial one)."""
    return any(p.stat().st_size for p in root.rglob("*") if p.name in FILES or p.suffix == ".incomplete")
