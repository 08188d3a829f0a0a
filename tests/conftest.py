"""Shared fixtures: tiny random backbones, a local tokenizer and a small shapes data set. No network."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the suite may reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of pytest's 2 processes (pyproject's addopts): one thread each, also
    os.environ["OMP_NUM_THREADS"] = "1"    # for the runs it starts (with 2 threads each on 2 cores, the notebook's
                                           # test ran over 7 minutes instead of 1)

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
import transformers

from data.shapes import make_shapes_dataset
from models.config import VLMConfig
from models.tiny import build_backbones

transformers.utils.logging.disable_progress_bar()

# The files that take the longest, longest first (on 2 cores, 2026-12-03: 297 s, 202, 78, then 68 down to 34;
# test_sharding.py, missing here until 2026-12-06: 56 s alone, 95 in the suite): each of pytest's 2 processes takes
# the next whole file when it is free (--dist loadfile), so the long ones go out first and both processes end
# together (9.5 min when test_stops.py happened to go last; other files keep their order).
LONGEST_FIRST = ["test_stops.py", "test_train.py", "test_sharding.py", "test_real_lm.py", "test_notebook.py",
                 "test_generate.py", "test_instruct_data.py", "test_robustness.py", "test_full_phase.py",
                 "test_lm_families.py", "test_app.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # (stable: each file's tests keep their order)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    corpus = make_shapes_dataset(root / "data", n=160, seed=0)
    vision, lm = build_backbones(root, corpus)
    return SimpleNamespace(root=root, data_dir=str(root / "data"), vision=vision, lm=lm)


@pytest.fixture
def tiny_cfg(tiny_assets, tmp_path):
    return tiny_config(tiny_assets, tmp_path)


def tiny_config(tiny_assets, tmp_path):
    """A config for the tiny model: CPU, no workers, 16 validation records, logs every step, a cache folder of its
    own (the records' lengths, data/length_cache.py)."""
    return VLMConfig(vision_model=tiny_assets.vision, lm_model=tiny_assets.lm, data_dir=tiny_assets.data_dir,
                     cache_dir=str(tmp_path / "cache"),
                     device="cpu", out_dir=str(tmp_path / "run"), projector_hidden_dim=64, max_text_tokens=64,
                     batch_size=8, batch_tokens=544, grad_accum=1, num_workers=0, val_size=16, lora_dropout=0.0,
                     log_every=1,
                     eval_every=10_000, save_every=10_000, eval_captions=0, metric_records=0, resume=True, seed=0)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield


def cli_args(cfg, **overrides):
    """The command-line flags that rebuild `cfg` (with overrides), e.g. for a torchrun subprocess."""
    d = {**cfg.to_dict(), **overrides}
    return [f"--{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in d.items()]


REPO = Path(__file__).resolve().parent.parent


def train_as_one_process(cfg):
    """loop.train(cfg) in this process, on 1 thread as each torchrun process runs (OMP_NUM_THREADS=1: the same
    matmul sums): the 1-process run that torchrun's runs are compared with (bit for bit a 1-process torchrun's
    weights and losses), without a launch's ~20 s of start-up and imports. Returns train()'s result."""
    from training import loop
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return loop.train(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_batch():
    """Builds a labelled batch for a VLM the real way (models.prompt.encode, right padding) with random images:
    tiny_batch(model, captions) -> dict(input_ids, labels, pixel_values); packed=True: the training collator's
    packed batch (model_inputs)."""
    from models.prompt import DEFAULT_PROMPT, IGNORE, encode

    def build(model, captions=("a red circle at the center .", "a blue square at the top left ."), packed=False):
        samples = [encode(model.tokenizer, [{"role": "user", "content": DEFAULT_PROMPT},
                                            {"role": "assistant", "content": c}], model.n_image_tokens)
                   for c in captions]
        size = model.processor.size["height"]
        if packed:  # as training's collator makes it
            pixels = torch.randint(0, 256, (len(captions), 3, size, size), dtype=torch.uint8)
            return model_inputs(packer(model)([{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                                                "pixel_values": p} for (ids, labels), p in zip(samples, pixels)]))
        T = max(len(ids) for ids, _ in samples)
        pad = lambda seq, value: seq + [value] * (T - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(ids, model.tokenizer.pad_token_id) for ids, _ in samples]),
                "labels": torch.tensor([pad(labels, IGNORE) for _, labels in samples]),
                "pixel_values": torch.randint(0, 256, (len(captions), 3, size, size), dtype=torch.uint8)}
    return build


def packer(model, batch_size=8, batch_tokens=None):
    """The training collator for `model`: batch_size samples packed into batch_tokens (default: room for the
    longest batch_size samples, so the samples, not the tokens, bind)."""
    from data.packing import Packer
    return Packer(model.tokenizer.pad_token_id, model.vision.pixel_shape, batch_size,
                  batch_tokens or batch_size * model.max_sample_len, model.max_sample_len)


def model_inputs(batch, device=None):
    """The keys of a collated batch that VLM.forward takes (on `device`)."""
    from data.packing import MODEL_INPUTS
    return {k: batch[k] if device is None else batch[k].to(device) for k in MODEL_INPUTS}


@pytest.fixture
def on_optimizer_step():
    """on_optimizer_step(fn, when="before"|"after"): fn(optimizer) runs around every optimizer step until the
    test ends. The loop's step, seen from outside, without reaching into training/loop.py."""
    handles = []

    def register(fn, when="before"):
        hook = (register_optimizer_step_pre_hook if when == "before"
                else register_optimizer_step_post_hook)
        handles.append(hook(lambda optimizer, args, kwargs: fn(optimizer)))
    yield register
    for h in handles:
        h.remove()


def trainable_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


def steps_saved(out_dir):
    return sorted(int(p.name[5:]) for p in Path(out_dir).glob("step_*"))


def log_lines(out_dir):
    """Lines of out_dir/log.jsonl: one per trained step (log_every=1)."""
    path = Path(out_dir) / "log.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def same(a, b):
    """Two state dicts hold the same names and bit-identical tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
