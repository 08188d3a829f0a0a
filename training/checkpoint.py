"""Checkpoints: what a run saves, how it resumes, and which checkpoint fits which config.

A checkpoint is a directory, out_dir/step_XXXXXXXX/ for a training run:
    config.json              the config that trained it (one source of truth for rebuilding the model)
    trainable.safetensors    the projector and the adapters (the full phase: the LM too), and any frozen weights taken
                             from init_from (init_weights); the rest of the backbones is rebuilt from their ids
    run.json                 which run wrote it (its id) and the data it trained on (what eval.py compares)
    train_state.pt           optimizer, scheduler, step, data and non-finite counts (training runs only)
    rng_<rank>.pt            each rank's RNG state (dropout differs per rank)

A sharded run (--phase full under torchrun, training/sharding.py) holds, instead of trainable.safetensors and the
optimizer in train_state.pt, two torch.distributed.checkpoint (DCP) folders, each rank writing its own shards:
    weights.dcp/             the same weights as trainable.safetensors, by the same names
    optimizer.dcp/           AdamW's state, by weight name
DCP reads them on any number of processes: resuming (the same number: check_resume), and as whole tensors in one
process for init_from, generation, evaluation and export (models.vlm.read_weights).

Every file and the folder reach the disk before the rename that makes a checkpoint, and resuming passes over one
that is incomplete all the same (a disk or file system that reorders writes): see newest().

An out_dir holds one run: a new run into a used out_dir stops before any slow work (OutDir), and rotation only
ever removes checkpoints of the run that is saving.
"""
import fcntl
import json
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import safetensors.torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from data.download import chat_json_path, file_sha256
from models.config import ConfigError, VLMConfig
from models.lora import lora_delta
from models.vlm import SHARDED_WEIGHTS, VLM, WEIGHTS, load_weights, read_weights
from training.sharding import is_sharded

RUN_INFO = "run.json"
# Fields a resumed run may change: they do not touch the math of training. Any other change stops the run. (A
# preset only sets other fields, which are compared themselves.)
RESUMABLE_CHANGES = ("preset", "cache_dir", "num_workers", "max_bad_fraction", "max_bad_steps",
                     "device", "compile", "cuda_graphs", "gradient_checkpointing", "log_every", "eval_every",
                     "eval_captions", "metric_records", "save_every", "keep_last", "out_dir", "resume", "wandb_project")
SAME_BACKBONES = ("vision_model", "fused_vision_model", "lm_model", "vision_feature_layer", "pixel_unshuffle",
                  "projector", "projector_hidden_dim")


# ----------------------------------------------------------------------------- finding checkpoints
def resolve(path):
    """A checkpoint directory (it holds config.json), or a run's out_dir: then its newest step_* checkpoint."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return path
    steps = sorted(path.glob("step_*"))
    if not steps:
        runs = sorted({str(p.parent) for p in path.glob("*/step_*")})  # e.g. the demo's projector/ and lora/
        raise ConfigError(f"{path} is neither a checkpoint (no config.json) nor a run directory with step_* "
                          "checkpoints in it" + (f"; the runs in it: {', '.join(runs)}" if runs else ""))
    return steps[-1]


def newest(out_dir):
    """The newest complete checkpoint of a run, or None. An incomplete one (a power loss while it was saved) is
    passed over with a warning: the run resumes from the one before, and saves that step again."""
    for path in sorted(Path(out_dir).glob("step_*"), reverse=True):
        if not (why := incomplete(path)):
            return path
        warnings.warn(f"skipping checkpoint {path}: {why} (cut short while it was saved?); resuming from the one "
                      "before it", stacklevel=2)
    return None


SHARDED_OPTIMIZER = "optimizer.dcp"


def required(path):
    """The files a checkpoint cannot resume without (a DCP folder is written when its .metadata is)."""
    weights = [WEIGHTS]
    if (path / SHARDED_WEIGHTS).is_dir():
        weights = [f"{SHARDED_WEIGHTS}/.metadata", f"{SHARDED_OPTIMIZER}/.metadata"]
    return ["config.json", *weights, "train_state.pt", "rng_0.pt"]


def incomplete(path):
    """Why a checkpoint cannot be resumed from, or "": a file it needs is missing, or one of its files is empty (as
    a crash after the rename can leave a file whose data never reached the disk). Names and sizes only: cheap."""
    missing = [name for name in required(path) if not (path / name).is_file()]
    empty = sorted(p.name for p in path.iterdir() if p.is_file() and p.stat().st_size == 0)
    return "; ".join(filter(None, [missing and f"no {', '.join(missing)}", empty and f"empty {', '.join(empty)}"]))


# ----------------------------------------------------------------------------- one run per out_dir
class OutDir:
    """Claims cfg.out_dir for this run, before any slow work: a lock keeps a second process out while this one
    trains (the OS releases it when a process dies, so a killed run's lock never blocks), and a fresh run
    (--resume false) refuses an out_dir that holds another run's checkpoints or log. Rank 0 claims for all ranks."""

    def __init__(self, cfg, rank):
        self.cfg, self.rank, self.lock = cfg, rank, None

    def __enter__(self):
        if self.rank != 0:
            return self
        out = Path(self.cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.lock = open(out / ".lock", "a+")  # (a+: opening it changes nothing in it)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            holder, self.lock = self.lock.read().strip(), self.lock.close()
            raise ConfigError(f"another training ({holder or 'a process'}) is writing to {out}; wait for it to end, "
                              "or pass another --out_dir") from None
        used = sorted(p.name for p in out.glob("step_*")) + [p.name for p in [out / "log.jsonl"] if p.exists()]
        if used and not self.cfg.resume:  # refused before the pid goes in: the folder stays as its run left it
            self.__exit__()
            raise ConfigError(f"{out} holds another run ({', '.join(used)}), and --resume false would start a new "
                              f"one there. Resume it (leave out --resume false), train into a new --out_dir (with "
                              f"--init_from {out} to start from its weights), or delete {out} first.")
        self.lock.truncate(0)
        self.lock.write(f"pid {os.getpid()}\n")
        self.lock.flush()
        return self

    def __exit__(self, *exc):
        if self.lock:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
            self.lock = None


def new_run_id():
    """A fresh run id: rank 0's, on every rank."""
    ids = [uuid.uuid4().hex[:16]]
    if dist.is_initialized():
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def run_info(path):
    """A checkpoint's run.json ({"run_id", "data"}), or {} for a checkpoint written before it existed."""
    path = Path(path) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


# ----------------------------------------------------------------------------- which checkpoint fits
def check_init_from(cfg):
    """init_from names a checkpoint of the same backbones and projector shape (checked before loading)."""
    if not cfg.init_from:
        return
    try:
        path = resolve(cfg.init_from)
    except ConfigError as e:
        raise ConfigError(f"config field 'init_from' = {cfg.init_from!r}: {e}") from None
    other = VLMConfig.load(path / "config.json")
    for name in SAME_BACKBONES:
        if getattr(other, name) != getattr(cfg, name):
            raise ConfigError(f"config field '{name}' = {getattr(cfg, name)!r}, but checkpoint {path} "
                              f"was trained with {getattr(other, name)!r}; use the same value")


def check_resume(cfg, path, world):
    """Resuming continues the same run: a changed field that alters the math (learning rates, batch, schedule,
    phase, LoRA shape, backbones, ...), other data (chat.json's bytes: another split and order) or another number
    of processes (the global batch) stops it here, before any slow work."""
    saved = VLMConfig.load(Path(path) / "config.json")
    changed = [f"  --{name}: {getattr(saved, name)!r} in the checkpoint, {getattr(cfg, name)!r} now"
               for name in cfg.to_dict() if name not in RESUMABLE_CHANGES and getattr(saved, name) != getattr(cfg, name)]
    changed += changed_data(cfg, run_info(path).get("data"))
    saved_world = len(list(Path(path).glob("rng_*.pt")))  # one per rank
    if saved_world != world:
        changed.append(f"  processes (GPUs): {saved_world} in the checkpoint, {world} now")
    if changed:
        raise ConfigError(f"{cfg.out_dir} holds a run with other settings ({path}); resuming it would mix them:\n"
                          + "\n".join(changed) + "\nStart over with --resume false in a new --out_dir (with "
                          f"--init_from {cfg.out_dir} to start from its weights).")


def changed_data(cfg, trained_on):
    """[a line saying how] if this run's chat.json is not the bytes the checkpoint trained on (its run.json's
    data_identity), else []. A checkpoint without run.json (older), or data not downloaded yet, is not compared."""
    chat_json = chat_json_path(cfg)
    if not trained_on or not chat_json.is_file():
        return []
    sha256 = file_sha256(chat_json)
    if sha256 == trained_on["sha256"]:  # the same bytes, wherever they are now
        return []
    return [f"  data: {trained_on['chat_json']} (sha256 {trained_on['sha256'][:12]}) in the checkpoint, {chat_json} "
            f"(sha256 {sha256[:12]}) now: its split and order would differ"]


# ----------------------------------------------------------------------------- weights: config + trainable
def save_model(model, path):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.cfg.save(path / "config.json")
    (path / WEIGHTS).write_bytes(safetensors.torch.save(model.trainable_state_dict()))  # save_file would make it private (0600)


def sharded_weights(model, names=None):
    """A sharded model's entries of trainable_state_dict (or those `names`): this rank's shards, as DTensors."""
    names = names or model.saved_names()
    return {n: t for n, t in get_model_state_dict(model).items() if n in names}


def save_shards(model, optimizer, path):
    """Every rank writes its shards of the weights and of the optimizer state (one collective call each)."""
    dcp.save(sharded_weights(model), checkpoint_id=path / SHARDED_WEIGHTS)
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=path / SHARDED_OPTIMIZER)


def load_shards(model, optimizer, path):
    """A sharded checkpoint's weights and optimizer state into a sharded model and its optimizer, each rank reading
    the parts of its own shards (DCP reshards across process counts)."""
    names = set(FileSystemReader(path / SHARDED_WEIGHTS).read_metadata().state_dict_metadata)
    weights = sharded_weights(model, names)
    dcp.load(weights, checkpoint_id=path / SHARDED_WEIGHTS)
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))  # (no frozen tower in it)
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path / SHARDED_OPTIMIZER)
    set_optimizer_state_dict(model, optimizer, state)
    model.carried = names - {n for n, p in model.named_parameters() if p.requires_grad}


def load_model(path):
    """The model a checkpoint (or a run's out_dir) describes: its config's backbones plus its weights."""
    return VLM.from_checkpoint(resolve(path))


PARTS = {"lm.": ("the LM", "LM"), "vision.": ("the vision tower", "vision")}  # a checkpoint's name prefix: its words


def unwrapped(name):
    """A weight's name in the model without adapters (a LoRALinear holds the layer it adapts as .base)."""
    return name.replace(".base.", ".")


def init_weights(model, path):
    """Start a new run's `model` as the model checkpoint `path` describes, as far as its phase holds it: the
    projector, the LM's (and tower's) weights the checkpoint holds, and its adapters where the model has the same
    ones, else merged into the weights they adapt (the model's fresh adapters start at zero: its outputs stay the
    source's). A projector phase keeps a trained LM too: the source's projector learned to feed that LM. The frozen
    weights taken are carried into the run's checkpoints, as the backbones' own files do not hold them. Returns the
    line that says what was taken."""
    path = resolve(path)
    source = VLMConfig.load(path / "config.json")
    state = read_weights(path)
    params = dict(model.named_parameters())
    names = {unwrapped(n): n for n in params}  # a model without adapters' names -> this model's
    same_scale = source.lora_alpha / source.lora_r == model.cfg.lora_alpha / model.cfg.lora_r
    taken = ["projector"]

    def take(name, tensor):
        p = params[name]
        p.data.copy_(tensor.to(p.dtype))
        if not p.requires_grad:
            model.carried.add(name)

    for name, tensor in state.items():  # the weights before the adapters, which may adapt them
        if ".lora_" not in name:
            take(names[unwrapped(name)], tensor)
    for prefix, (whole, short) in PARTS.items():
        if any(n.startswith(prefix) and ".lora_" not in n for n in state):
            taken.append(f"{whole}'s weights")
        adapters = {n: t for n, t in state.items() if n.startswith(prefix) and ".lora_" in n}
        if adapters and same_scale and all(n in params and params[n].shape == t.shape for n, t in adapters.items()):
            for name, tensor in adapters.items():
                take(name, tensor)
            taken.append(f"{short} adapters")
        elif adapters:
            for layer in {n.rsplit(".", 1)[0] for n in adapters}:
                weight = names[unwrapped(layer) + ".weight"]
                delta = lora_delta(adapters[layer + ".lora_A"], adapters[layer + ".lora_B"],
                                   source.lora_alpha / source.lora_r)
                take(weight, params[weight].detach() + delta)  # summed in fp32, whatever the weight's dtype
            taken.append(f"{short} adapters merged into {whole}")
    return f"init_from {path} (phase {source.phase}): {', '.join(taken)}"


# ----------------------------------------------------------------------------- training state and RNG
def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


def barrier():
    if dist.is_initialized():
        dist.barrier()


def fsync(path):
    """Flushes a file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(out_dir, model, optimizer, scheduler, state, rank, keep_last):
    """Every rank writes its RNG and data counts, rank 0 the rest. Written into a temp dir, each file and the dir
    flushed to the disk, then renamed (and the rename flushed): a crash or power loss mid-save leaves the previous
    checkpoint intact, and never a renamed one with empty files, with the older ones already rotated away. Then all
    but the newest keep_last checkpoints of this run (state["run_id"]) are removed; another run's are never
    touched. Returns the checkpoint's path."""
    out = Path(out_dir)
    final = out / f"step_{state['step']:08d}"
    tmp = out / f".tmp-{final.name}"
    if rank == 0:
        for stale in out.glob(".tmp-step_*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save({**rng_state(), "data": state["data"]}, tmp / f"rng_{rank}.pt")
    train_state = {"scheduler": scheduler.state_dict(),
                   "state": {k: v for k, v in state.items() if k not in ("data", "data_identity")}}
    if is_sharded(model):  # every rank writes its shards
        save_shards(model, optimizer, tmp)
    if rank == 0:
        if is_sharded(model):
            model.cfg.save(tmp / "config.json")
        else:
            save_model(model, tmp)
            train_state["optimizer"] = optimizer.state_dict()
        (tmp / RUN_INFO).write_text(json.dumps({"run_id": state["run_id"], "data": state["data_identity"]}) + "\n")
        torch.save(train_state, tmp / "train_state.pt")
    barrier()
    if rank == 0:
        for path in [*tmp.rglob("*"), tmp]:  # every rank's files are written (the barrier)
            fsync(path)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync(out)
        ours = [p for p in sorted(out.glob("step_*"))
                if not incomplete(p) and run_info(p).get("run_id") == state["run_id"]]
        for old in ours[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def load(path, model, optimizer, scheduler, rank):
    """Restores weights, optimizer, schedule and this rank's RNG; returns the saved training state."""
    saved = torch.load(Path(path) / "train_state.pt", weights_only=False)
    if is_sharded(model):
        load_shards(model, optimizer, Path(path))
    else:
        load_weights(model, path)
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    per_rank = torch.load(Path(path) / f"rng_{rank}.pt", weights_only=False)
    set_rng_state(per_rank)
    return {**saved["state"], "data": per_rank["data"]}
