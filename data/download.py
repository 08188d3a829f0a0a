"""Find LLaVA-CC3M on disk, or download chat.json and images.zip from the hub (resumable)."""
from pathlib import Path

FILES = ("chat.json", "images.zip")


class DataError(RuntimeError):
    """The data set is missing or unusable; the message says what to do."""


def is_complete(root):
    return (root / "chat.json").is_file() and ((root / "images.zip").is_file() or (root / "images").is_dir())


def ensure_dataset(cfg):
    """Return the folder holding chat.json and the images, downloading into the cache if needed."""
    if cfg.data_dir:
        root = Path(cfg.data_dir).expanduser()
        if not is_complete(root):
            raise DataError(f"data_dir {root} must hold chat.json and images.zip (or an images/ folder)")
        return root
    root = Path(cfg.cache_dir).expanduser() / cfg.dataset.replace("/", "--")
    if is_complete(root):
        return root
    from huggingface_hub import hf_hub_download  # progress bars; resumes an interrupted download
    print(f"downloading {cfg.dataset} ({', '.join(FILES)}; images.zip is 6.5 GB) into {root}")
    try:
        for name in FILES:
            hf_hub_download(cfg.dataset, name, repo_type="dataset", local_dir=root)
    except Exception as e:  # offline, no such repo, or a broken connection: all end the same way
        raise DataError(
            f"could not download {cfg.dataset} ({type(e).__name__}: {str(e)[:200]}).\n"
            f"Download {' and '.join(FILES)} from https://huggingface.co/datasets/{cfg.dataset} into a "
            f"folder and pass it as --data_dir, or try the offline demo: `uv run python demo.py`"
        ) from e
    return root
