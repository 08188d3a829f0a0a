"""Find LLaVA-CC3M on disk, or download chat.json and images.zip from the hub (resumable)."""
import shutil
from pathlib import Path

from models.hub import OFFLINE_DEMO, hub_reachable

FILES = ("chat.json", "images.zip")


class DataError(RuntimeError):
    """The data set is missing or unusable; the message says what to do."""


def is_complete(root):
    return (root / "chat.json").is_file() and ((root / "images.zip").is_file() or (root / "images").is_dir())


def ensure_dataset(cfg):
    """Return the folder holding chat.json and the images, downloading into the cache if needed. With
    cfg.chat_json (an instruction file such as llava_v1_5_mix665k.json), data_dir is the folder its image
    paths are relative to (coco/train2017/000000033471.jpg, gqa/images/..., ...)."""
    if cfg.data_dir:
        root = Path(cfg.data_dir).expanduser()
        if not cfg.chat_json and not is_complete(root):
            raise DataError(f"data_dir {root} must hold chat.json and images.zip (or an images/ folder)")
        return root
    root = Path(cfg.cache_dir).expanduser() / cfg.dataset.replace("/", "--")
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
