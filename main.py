"""Train tinyvlm.

    uv run python main.py                          # phase 1: projector alignment on LLaVA-CC3M-595K
    uv run python main.py --phase lora --init_from checkpoints/run --out_dir checkpoints/lora
    torchrun --nproc_per_node 8 main.py ...        # data parallel, one process per GPU
    uv run python main.py --demo                   # offline, CPU, two minutes: both phases on synthetic shapes

Every VLMConfig field is a flag (models/config.py).
"""
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import transformers
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.utils.data import DataLoader
from tqdm import tqdm

from data.download import DataError, ensure_dataset
from data.llava import Collator, ImageStore, LlavaDataset, ShardedBatchSampler, load_records, split_indices
from models.config import ConfigError, VLMConfig, parse_overrides, resolve_checkpoint
from models.lora import LoRALinear
from models.vlm import VLM, HubError, preflight

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


# ----------------------------------------------------------------------------- distributed
def setup_distributed(cfg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python main.py` is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return rank, world, device


def all_reduce(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def sync_gradients(params):
    """One all-reduce per optimizer step (never on the micro-steps before it). The losses are already
    divided by the global label-token count, so summing gives the gradient of the whole global batch."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(_flatten_dense_tensors(grads))
    for p, g in zip(params, _unflatten_dense_tensors(flat, grads)):
        p.grad = g


# ----------------------------------------------------------------------------- model, data, optimizer
def build_model(cfg, device, resuming):
    model = VLM.from_config(cfg)
    if cfg.phase == "lora" and not resuming:  # phase 2 starts from the aligned projector
        model.load_trainable(resolve_checkpoint(cfg.init_from), only="projector.")
    model.to(device)
    if device.type == "cuda":
        model.cast_frozen(torch.bfloat16)
    return model


def build_data(cfg, model, rank, world):
    root = ensure_dataset(cfg)
    records = load_records(root / "chat.json")
    train_idx, val_idx = split_indices(len(records), cfg.val_size, cfg.seed)
    images = ImageStore(root)

    def dataset(indices):
        return LlavaDataset(records, indices, images, model.tokenizer, model.processor,
                            model.n_image_tokens, cfg.max_text_tokens)

    workers = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                   pin_memory=torch.cuda.is_available(), collate_fn=Collator(model.tokenizer.pad_token_id),
                   generator=torch.Generator())  # its own RNG: starting an epoch must not shift dropout's
    sampler = ShardedBatchSampler(len(train_idx), cfg.batch_size, rank, world, cfg.seed)
    train_loader = DataLoader(dataset(train_idx), batch_sampler=sampler, **workers)
    val_set = dataset(val_idx)
    val_loader = DataLoader(dataset(val_idx[rank::world]), batch_size=cfg.batch_size, **workers)
    return train_loader, sampler, val_loader, val_set


def build_optimizer(cfg, model):
    """AdamW with one group per (lr, weight decay): projector vs adapters; decay on matrices only."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = cfg.projector_lr if name.startswith("projector.") else cfg.lora_lr
            groups.setdefault((lr, cfg.weight_decay if p.ndim >= 2 else 0.0), []).append(p)
    # fused on every device: one kernel for all tensors, and it can skip a step on the device (found_inf)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             fused=True)


def lr_schedule(total_steps, warmup_frac):
    warmup = max(1, round(total_steps * warmup_frac))

    def factor(step):  # linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
    return factor


def micro_batches(sampler, loader, start_step, steps_per_epoch, grad_accum):
    """Yields the micro-batches of each optimizer step, from any step on (the data order is a function
    of the step alone, which is what makes resuming exact)."""
    epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    while True:
        sampler.set_position(epoch, step_in_epoch * grad_accum)
        it = iter(loader)
        for _ in range(step_in_epoch, steps_per_epoch):
            yield [next(it) for _ in range(grad_accum)]
        epoch, step_in_epoch = epoch + 1, 0


def to_device(batch, device):
    keys = ("input_ids", "pixel_values", "attention_mask", "labels")
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


# ----------------------------------------------------------------------------- FLOPs and MFU
def matmul_params(module):
    """Weights that multiply activations (linear and conv layers), LoRA adapters counted apart."""
    dense = sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in module.modules() if isinstance(m, LoRALinear))
    return dense, lora


def flop_counter(model):
    """Returns flops(lengths, n_label_tokens): model FLOPs of one training step (a multiply-add is 2 FLOPs),
    written out so it can be checked. The parameter counts are taken once, here.

    vision (frozen, forward only):      2 * P_v * N  + 4 * L_v * N^2 * D_v          per image
    projector (trained; its input       4 * P_gate_up * n_img + 6 * P_down * n_img    per image
        needs no gradient):
    LM (frozen: forward, plus backward  4 * P_lm * T + 12 * L * T^2 * D            per sample of T tokens
        to the activations only):       + 6 * P_lora * T  (adapters get weight gradients too)
    LM head (label positions only):     4 * V * D                                   per label token
    """
    v, lm = model.vision.config, model.lm.config
    n_patches = (v.image_size // v.patch_size) ** 2
    p_vision, _ = matmul_params(model.vision)
    p_down, _ = matmul_params(model.projector.down)
    p_gate_up = matmul_params(model.projector)[0] - p_down
    p_lm, p_lora = matmul_params(model.lm.base_model)
    per_image = 2 * p_vision * n_patches + 4 * v.num_hidden_layers * n_patches ** 2 * v.hidden_size \
        + (4 * p_gate_up + 6 * p_down) * model.n_image_tokens
    per_token, per_token_pair = 4 * p_lm + 6 * p_lora, 12 * lm.num_hidden_layers * lm.hidden_size
    per_label = 4 * lm.vocab_size * lm.hidden_size

    def flops(lengths, n_label_tokens):
        return sum(per_image + per_token * T + per_token_pair * T * T for T in lengths) + per_label * n_label_tokens
    return flops


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- checkpoints
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


def save_checkpoint(cfg, model, optimizer, scheduler, state, rank):
    """Write into a temp dir, then rename: a crash mid-save leaves the previous checkpoint intact."""
    out = Path(cfg.out_dir)
    final = out / f"step_{state['step']:08d}"
    tmp = out / f".tmp-{final.name}"
    if rank == 0:
        for stale in out.glob(".tmp-step_*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_{rank}.pt")  # every rank's RNG (dropout differs per rank)
    if rank == 0:
        model.save(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state},
                   tmp / "train_state.pt")
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(out.glob("step_*"))[:-cfg.keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(path, model, optimizer, scheduler, rank):
    model.load_trainable(path)
    saved = torch.load(Path(path) / "train_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = Path(path) / f"rng_{rank}.pt"
    set_rng_state(torch.load(rng if rng.exists() else Path(path) / "rng_0.pt", weights_only=False))
    return saved["state"]


# ----------------------------------------------------------------------------- the loop
class StopRequest:
    """SIGINT/SIGTERM finish the current step, save and exit cleanly; a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving, then exiting", flush=True)


def train_step(forward, micro, device, autocast):
    """Forward/backward over the micro-batches of one step. Each micro-batch's summed loss is divided by
    the label-token count of the whole global batch, so the accumulated gradient is exactly the gradient
    of the whole batch (not a mean of per-micro-batch means)."""
    n_global = all_reduce(torch.full((), float(sum(b["n_label_tokens"] for b in micro)), device=device))
    loss_sum = torch.zeros((), device=device)
    for b in micro:
        if b["pixel_values"] is None:  # every record of this micro-batch was unusable
            continue
        with autocast:
            out = forward(**to_device(b, device))
        (out.loss_sum / n_global.clamp(min=1)).backward()
        loss_sum += out.loss_sum.detach()
    return loss_sum, n_global


def optimizer_step(cfg, params, optimizer, scheduler):
    """Clip, then step unless the gradient is non-finite. Returns that verdict as a device tensor: the
    skip happens on the device (fused AdamW's found_inf, the hook GradScaler uses), so no step waits on
    the host to read it."""
    sync_gradients(params)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
    finite = torch.isfinite(norm)
    optimizer.found_inf = (~finite).float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return finite


class NonFiniteSteps:
    """Skipped (non-finite) steps, counted on the device and read at log lines and saves."""

    def __init__(self, device, total=0, streak=0):
        self.total, self.streak = torch.tensor(total, device=device), torch.tensor(streak, device=device)
        self.longest = self.streak.clone()  # longest streak since the last read

    def add(self, finite):
        bad = (~finite).long()
        self.total = self.total + bad
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)

    def read(self, state):
        """Copies the counts into `state` (a host sync); returns the longest streak since the last read."""
        state["bad_steps"], state["bad_in_a_row"], longest = torch.stack([self.total, self.streak, self.longest]).tolist()
        self.longest = self.streak.clone()
        return longest


def count_data(cfg, state, micro, min_seen):
    """Tally skipped records; stop when the data set is mostly (or entirely) unusable. The fraction is
    judged once min_seen samples were seen, so one unlucky first batch does not end a run."""
    for b in micro:
        state["seen"] += len(b["input_ids"]) + len(b["skipped_ids"])
        state["skipped"].update(b["skipped"])
        state["bad_examples"] = (state["bad_examples"] + b["skipped_ids"])[:5]
    seen, bad = state["seen"], sum(state["skipped"].values())
    if bad and seen >= min_seen and (bad == seen or bad > cfg.max_bad_fraction * seen):
        raise DataError(f"{bad} of the first {seen} samples were unusable ({dict(state['skipped'])}), "
                        f"more than max_bad_fraction={cfg.max_bad_fraction}; for example "
                        f"{state['bad_examples']}. Fix the data, or raise --max_bad_fraction")


class Meter:
    """Throughput between two log lines. Host clocks only: the loss is read once per log line."""

    def __init__(self, model, device, world):
        self.device, self.world, self.peak = device, world, peak_flops(device)
        self.flops_of = flop_counter(model)
        self.reset()

    def reset(self):
        self.t0, self.steps, self.samples, self.tokens, self.flops, self.data_wait = time.perf_counter(), 0, 0, 0, 0, 0.0
        self.loss_sum = torch.zeros((), device=self.device)
        self.n_tokens = torch.zeros((), device=self.device)

    def add(self, micro, loss_sum, n_global, finite, data_wait):
        lengths = [n for b in micro for n in b["attention_mask"].sum(1).tolist()]  # unpadded, on the CPU
        self.steps, self.samples, self.tokens = self.steps + 1, self.samples + len(lengths), self.tokens + sum(lengths)
        self.flops += self.flops_of(lengths, sum(b["n_label_tokens"] for b in micro))
        self.data_wait += data_wait
        self.loss_sum += torch.where(finite, loss_sum, 0.0)  # a skipped step does not poison the logged loss
        self.n_tokens += torch.where(finite, n_global, 0.0)

    def read(self):
        loss = (all_reduce(self.loss_sum.clone()) / self.n_tokens.clamp(min=1)).item()  # syncs the GPU
        dt = time.perf_counter() - self.t0
        w = self.world  # every rank did the same amount of work
        stats = {"loss": loss, "dt_ms": 1000 * dt / self.steps, "samples_per_s": w * self.samples / dt,
                 "tokens_per_s": w * self.tokens / dt, "data_wait": self.data_wait / dt,
                 "mfu": self.flops / dt / self.peak if self.peak else None,
                 "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None}
        self.reset()
        return stats


def format_line(step, total, lr, s, skipped):
    mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
    return (f"step {step:>6}/{total} | loss {s['loss']:.4f} | lr {lr:.2e} | dt {s['dt_ms']:.0f}ms | "
            f"{s['samples_per_s']:,.0f} samples/s | {s['tokens_per_s']:,.0f} tok/s | mfu {mfu} | "
            f"data wait {100 * s['data_wait']:.0f}% | skipped {skipped}")


@torch.no_grad()
def evaluate(model, loader, device, autocast):
    """Mean loss over the whole validation split (each rank its shard, summed across ranks)."""
    model.eval()
    total = torch.zeros(2, device=device)
    for b in loader:
        if b["pixel_values"] is not None:
            with autocast:
                out = model(**to_device(b, device))
            total += torch.stack([out.loss_sum, out.n_tokens.float()])
    model.train()
    total = all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def sample_captions(model, val_set, n, device):
    """Captions for the first n (fixed) validation images, next to their reference."""
    rows = []
    for item in (val_set[i] for i in range(min(n, len(val_set)))):
        if "skip" in item:
            continue
        [caption] = model.generate(item["pixel_values"][None].to(device))
        truth = model.tokenizer.decode([t for t in item["labels"].tolist() if t >= 0], skip_special_tokens=True)
        rows.append((item["id"], caption, truth))
    return rows


class Reporter:
    """Rank 0 writes log.jsonl, prints, and logs to wandb when a project is set; other ranks stay quiet."""

    def __init__(self, cfg, rank):
        self.path, self.quiet, self.wandb = Path(cfg.out_dir) / "log.jsonl", rank != 0, None
        if cfg.wandb_project and not self.quiet:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, config=cfg.to_dict(), resume="allow")

    def print(self, line):
        if not self.quiet:
            tqdm.write(line)

    def log(self, step, metrics, captions=()):
        if self.quiet:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for id_, caption, truth in captions:
            tqdm.write(f"  [{id_}] {caption!r}  (reference: {truth!r})")
        if self.wandb:
            import wandb
            extra = {"captions": wandb.Table(columns=["id", "caption", "reference"], data=list(captions))} if captions else {}
            self.wandb.log({**metrics, **extra}, step=step)

    def close(self):
        if self.wandb:
            self.wandb.finish()


def out_of_memory(cfg):
    return RuntimeError(f"CUDA out of memory at batch_size={cfg.batch_size}, max_text_tokens={cfg.max_text_tokens}. "
                        "Lower --batch_size and raise --grad_accum by the same factor (the global batch stays), "
                        "or turn --pixel_unshuffle 2 on to cut image tokens by 4x")


@dataclasses.dataclass
class Run:
    """What the loop of one phase works on."""
    cfg: VLMConfig
    rank: int
    world: int
    device: torch.device
    model: VLM
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: dict  # step, data and non-finite counts: saved with every checkpoint
    total: int
    val_loader: DataLoader
    val_set: LlavaDataset


def train(cfg: VLMConfig):
    """Run one phase. Returns {"step", "losses": [(step, loss)], "stats": [per log line], "val_loss",
    "skipped": {reason: count}, "checkpoint", "model"}."""
    cfg.validate()
    preflight(cfg)  # config errors surface here, before any weights or data load
    rank, world, device = setup_distributed(cfg)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    resume_from = resolve_checkpoint(cfg.out_dir) if cfg.resume and any(Path(cfg.out_dir).glob("step_*")) else None
    model = build_model(cfg, device, resuming=resume_from is not None)
    train_loader, sampler, val_loader, val_set = build_data(cfg, model, rank, world)
    steps_per_epoch = len(sampler) // cfg.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"config field 'grad_accum' = {cfg.grad_accum}: more micro-batches than one epoch "
                          f"has ({len(sampler)} per rank); lower grad_accum or batch_size")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total, cfg.warmup_frac))
    state = {"step": 0, "seen": 0, "skipped": Counter(), "bad_examples": [], "bad_steps": 0, "bad_in_a_row": 0}
    if resume_from:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # identical start on every rank
        if dist.is_initialized():
            dist.broadcast(p.data, 0)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(f"phase {cfg.phase}: {sum(p.numel() for p in params):,} trainable parameters, {model.n_image_tokens} "
              f"image tokens, {len(sampler) * cfg.batch_size * world:,} samples/epoch, global batch "
              f"{cfg.batch_size * cfg.grad_accum * world}, steps {state['step']}->{total}"
              + (f", resumed from {resume_from}" if resume_from else ""))
    run = Run(cfg, rank, world, device, model, params, optimizer, scheduler, state, total, val_loader, val_set)
    batches = micro_batches(sampler, train_loader, state["step"], steps_per_epoch, cfg.grad_accum)
    result = loop(run, batches, min_seen=min(100, len(sampler) * cfg.batch_size))
    if rank == 0 and state["skipped"]:
        print(f"skipped {sum(state['skipped'].values())} of {state['seen']} samples: {dict(state['skipped'])}")
    return {**result, "checkpoint": result["checkpoint"] or resume_from, "step": state["step"],
            "skipped": dict(state["skipped"]), "model": model}


def loop(run, batches, min_seen):
    """The steps of one phase, from state["step"] to total: train, log, evaluate, save, stop on request."""
    cfg, state, device, model, total = run.cfg, run.state, run.device, run.model, run.total
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    forward = torch.compile(model) if cfg.compile else model
    meter, reporter = Meter(model, device, run.world), Reporter(cfg, run.rank)
    bad = NonFiniteSteps(device, state["bad_steps"], state["bad_in_a_row"])
    result = {"losses": [], "stats": [], "val_loss": None, "checkpoint": None}

    def save():
        bad.read(state)
        result["checkpoint"] = save_checkpoint(cfg, model, run.optimizer, run.scheduler, state, run.rank)

    bar = tqdm(total=total, initial=state["step"], disable=run.rank != 0, dynamic_ncols=True, leave=False)
    with StopRequest() as stop:
        while state["step"] < total:
            t_wait = time.perf_counter()
            micro = next(batches)
            data_wait = time.perf_counter() - t_wait
            count_data(cfg, state, micro, min_seen)
            try:
                loss_sum, n_global = train_step(forward, micro, device, autocast)
                finite = optimizer_step(cfg, run.params, run.optimizer, run.scheduler)
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory(cfg) from None
            state["step"] += 1
            bar.update(1)
            bad.add(finite)
            meter.add(micro, loss_sum, n_global, finite, data_wait)
            step, done = state["step"], state["step"] == total
            if step % cfg.log_every == 0 or done:
                if bad.read(state) >= cfg.max_bad_steps:  # checked where the loop syncs anyway
                    save()
                    raise RuntimeError(f"{cfg.max_bad_steps} steps in a row had a non-finite loss or gradient (by "
                                       f"step {step}); saved {result['checkpoint']}. Lower the learning rate "
                                       "(or raise --max_bad_steps).")
                log_step(run, reporter, meter, result)
            if step % cfg.eval_every == 0 or done:
                log_eval(run, reporter, autocast, result)
            stopping = stop.requested
            if run.world > 1:  # every rank stops together if any was asked to
                stopping = bool(all_reduce(torch.tensor(float(stopping), device=device)) > 0)
            if step % cfg.save_every == 0 or done or stopping:
                save()
            if stopping:
                break
    bar.close()
    reporter.close()
    return result


def log_step(run, reporter, meter, result):
    state, lr = run.state, run.scheduler.get_last_lr()[0]
    stats = meter.read()
    result["losses"].append((state["step"], stats["loss"]))
    result["stats"].append(stats)
    reporter.print(format_line(state["step"], run.total, lr, stats, sum(state["skipped"].values())))
    reporter.log(state["step"], {**stats, "lr": lr, "bad_steps": state["bad_steps"],
                                 **{f"skipped/{k}": v for k, v in state["skipped"].items()}})


def log_eval(run, reporter, autocast, result):
    model, step = run.model, run.state["step"]
    result["val_loss"] = evaluate(model, run.val_loader, run.device, autocast)
    captions = sample_captions(model, run.val_set, run.cfg.eval_captions, run.device) if run.rank == 0 else []
    reporter.print(f"step {step}: val loss {result['val_loss']:.4f}")
    reporter.log(step, {"val_loss": result["val_loss"]}, captions)


# ----------------------------------------------------------------------------- offline demo
def demo_config():
    """Small everything: trains both phases on 2 CPU cores in about two minutes."""
    return VLMConfig(demo=True, out_dir="checkpoints/demo", device="cpu", pixel_unshuffle=2,
                     projector_hidden_dim=256, max_text_tokens=64, lora_r=16, lora_alpha=32, lora_dropout=0.0,
                     batch_size=32, grad_accum=1, epochs=4, projector_lr=3e-3, lora_lr=3e-3, val_size=64,
                     num_workers=2, log_every=20, eval_every=100, eval_captions=3, save_every=100)


def prepare_demo(cfg):
    """Synthetic shapes data + tiny random backbones under out_dir/assets (made once)."""
    from data.shapes import make_shapes_dataset
    from models.tiny import build_backbones
    assets = Path(cfg.out_dir) / "assets"
    if not (assets / "lm" / "config.json").is_file():
        print(f"making the demo data set and tiny backbones in {assets}")
        corpus = make_shapes_dataset(assets / "data", n=2000)
        build_backbones(assets, corpus)
    return dataclasses.replace(cfg, data_dir=str(assets / "data"), vision_model=str(assets / "vision"),
                               lm_model=str(assets / "lm"))


def run_demo(cfg):
    t0 = time.time()
    cfg = prepare_demo(cfg)
    root = Path(cfg.out_dir)
    projector = dataclasses.replace(cfg, phase="projector", init_from="", out_dir=str(root / "projector"))
    print("== phase 1: projector alignment (backbones frozen)")
    train(projector)
    lora = dataclasses.replace(cfg, phase="lora", init_from=projector.out_dir, out_dir=str(root / "lora"))
    print("== phase 2: LoRA on the LM + projector")
    out = train(lora)
    print(f"== captions of held-out images (demo took {time.time() - t0:.0f}s):")
    _, _, _, val_set = build_data(lora, out["model"], 0, 1)
    for id_, caption, truth in sample_captions(out["model"], val_set, 8, torch.device("cpu")):
        print(f"  {id_}: {caption!r}  (reference: {truth!r})")
    samples = root / "samples"  # a few held-out images as files, to try generate.py on
    samples.mkdir(exist_ok=True)
    for i in range(4):
        name = json.loads(val_set.records[val_set.indices[i]]["record"])["image"]
        (samples / name).write_bytes(val_set.images.read(name))
    print(f"try: uv run python generate.py --checkpoint {lora.out_dir} {samples}/*.jpg")
    return out


def main(argv):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizing happens in the workers
    transformers.utils.logging.disable_progress_bar()
    try:
        cfg = parse_overrides(argv)
        if cfg.demo:
            return run_demo(parse_overrides(argv, demo_config()))
        return train(cfg)
    except (ConfigError, DataError, HubError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
