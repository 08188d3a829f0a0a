"""Train tinyvlm, one phase per run. Read it top to bottom: the setup, the parts, then the loop.

    uv run python main.py                                   # phase 1: align the projector on LLaVA-CC3M-595K
    uv run python main.py --phase lora --init_from checkpoints/run --out_dir checkpoints/lora   # phase 2
    torchrun --standalone --nproc_per_node 8 main.py --batch_tokens 2048   # DDP, one process per GPU: 16384 a step
    uv run python main.py --help                            # every config field, its default and its meaning
    uv run python demo.py                                   # offline, CPU, about a minute: both phases
"""
import sys

from models.config import ConfigError, VLMConfig, parse_or_exit
from models.hub import HubError, check_reachable

if __name__ == "__main__":  # --help, typos, bad values and an unreachable hub answer now, before the slow imports
    try:
        check_reachable(parse_or_exit(sys.argv[1:], prog="main.py", description=__doc__.splitlines()[0]).validate())
    except (ConfigError, HubError) as e:
        sys.exit(f"error: {e}")

import gc  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from contextlib import closing, nullcontext  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from training import checkpoint  # noqa: E402
from data.download import DataError, ensure_dataset  # noqa: E402
from data.llava import (ImageStore, LlavaDataset, SkipTally, data_identity, ignore_stop_signals,  # noqa: E402
                        load_records, split_indices, start_workers, steps_of_micro_batches)
from data.packing import MODEL_INPUTS, Packer, PackedBatchSampler, plan_micro_batches, sample_lengths  # noqa: E402
from models.vision import n_image_tokens  # noqa: E402
from models.vlm import VLM, check_shapes, load_tokenizer  # noqa: E402
from training.metrics import score_line  # noqa: E402
from training.report import Reporter, caption_metrics, sample_captions, step_line  # noqa: E402
from training.throughput import Meter  # noqa: E402


# ----------------------------------------------------------------------------- setup
def setup_distributed(cfg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python main.py` is rank 0 of 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field 'device' = 'cuda', but torch sees no CUDA GPU here (no driver, or a CPU "
                          "build of torch); use --device cpu, or auto")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return rank, world, device


def all_reduce(t, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(t, op)
    return t


def skips_over_ranks(tally):
    """(samples seen, Counter of skipped samples by reason, samples truncated), summed over every rank: the log
    reports the run, not rank 0's share of it."""
    mine = (tally.seen, tally.skipped, tally.truncated)
    parts = [mine]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    return sum(p[0] for p in parts), sum((p[1] for p in parts), Counter()), sum(p[2] for p in parts)


def follow_applied_steps(scheduler, applied):
    """Point the LR schedule at the number of updates applied: a skipped (non-finite) step must not advance it.
    The skips are only read at log lines (reading them makes the host wait for the GPU), so it is set there."""
    if scheduler.last_epoch != applied:
        scheduler.last_epoch = applied - 1
        scheduler.step()


# ----------------------------------------------------------------------------- model, data, optimizer
def build_model(cfg, device, resuming, tokenizer=None):
    model = VLM.from_config(cfg, tokenizer)
    if cfg.init_from and not resuming:  # start from an earlier run: its projector (and adapters, lora to lora)
        init = checkpoint.resolve(cfg.init_from)
        with_adapters = cfg.phase == "lora" and VLMConfig.load(init / "config.json").phase == "lora"
        checkpoint.load_weights(model, init, only=None if with_adapters else "projector.")
    return model.place(device)


def open_data(cfg, tokenizer, rank, world):
    """The records, their split, the images, and this rank's packed micro-batches, planned before the model loads
    (packing needs every record's length: one pass over the text, data/packing.py): a data mistake (an empty or
    truncated file, too few records) costs seconds, not the minutes of loading."""
    root = ensure_dataset(cfg)
    chat_json = Path(cfg.chat_json).expanduser() if cfg.chat_json else root / "chat.json"
    records = load_records(chat_json)
    train_idx, val_idx = split_indices(len(records), cfg.val_size)
    images = ImageStore(root)

    def lengths(indices):
        text = LlavaDataset(records, indices, images, tokenizer, None, n_image_tokens(cfg), cfg.max_text_tokens)
        return sample_lengths(text, cfg.num_workers)
    sampler = PackedBatchSampler(lengths(train_idx), cfg.batch_size, cfg.batch_tokens, rank, world, cfg.seed)
    if len(sampler) < cfg.grad_accum:
        raise ConfigError(f"config field 'grad_accum' = {cfg.grad_accum}: more micro-batches than one epoch has "
                          f"({len(sampler)} per rank); lower grad_accum or batch_tokens")
    val_idx = val_idx[rank::world]
    val_batches = plan_micro_batches(range(len(val_idx)), lengths(val_idx), cfg.batch_size, cfg.batch_tokens)
    return dict(records=records, train_idx=train_idx, val_idx=val_idx, images=images, sampler=sampler,
                val_batches=val_batches, identity=data_identity(chat_json, len(records)))


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


def build_optimizer(cfg, model):
    """AdamW with one group per (lr, weight decay): projector vs adapters (full phase: one rate for all); decay on
    matrices only."""
    projector_lr = {"projector": cfg.projector_lr, "lora": cfg.lora_projector_lr, "full": cfg.full_lr}[cfg.phase]
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = projector_lr if name.startswith("projector.") else cfg.full_lr if cfg.phase == "full" else cfg.lora_lr
            groups.setdefault((lr, cfg.weight_decay if p.ndim >= 2 else 0.0), []).append(p)
    # fused on every device: one kernel for all tensors, and it can skip a step on the device (found_inf)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             fused=True)


def to_device(batch, device):
    return {k: batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def evaluate(model, loader, device, autocast):
    """Mean loss over the whole validation split (each rank its shard, summed across ranks). It runs eager:
    compiled layers would compile and record a second (no-grad) set of CUDA graphs for every length, for a
    small share of the run's time, and interleave them with training's."""
    model.eval()
    loss_sum, n_tokens = torch.zeros((), device=device), 0
    for b in start_workers(loader):
        with autocast:
            loss_sum += model(**to_device(b, device)).loss_sum
        n_tokens += b["n_label_tokens"]
    model.train()
    total = all_reduce(torch.stack([loss_sum, torch.tensor(float(n_tokens), device=device)]))
    return (total[0] / total[1].clamp(min=1)).item()


class Stopped(Exception):
    """A stop signal's checkpoint is saved. The command exits 128 + the signal's number (130 for SIGINT, 143 for
    SIGTERM), as a process killed by it would: `main.py && main.py --phase lora`, the demo and schedulers see a
    run that did not finish."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped by {signum.name} at step {step}; saved {path}. Run the same command again to "
                         "resume it")
        self.signum = signum


class StopRequest:
    """SIGINT/SIGTERM finish the current step, save and stop (main.Stopped); a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self.signum, self.previous = False, 0, {}

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
        self.requested, self.signum = True, self.signum or signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving, then exiting", flush=True)


class FrozenHeap:
    """Python's full garbage collections scan every object alive; after the first step those are chiefly compile's
    millions, alive for good, and each scan stalled a step for 0.5-0.7 s (measured on an H100 machine's host).
    freeze() hides what is alive from later collections (what later steps make is still collected); on exit it is
    all collectable again, for a next run in this process (the sweep, the notebook)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        gc.unfreeze()

    def freeze(self):
        gc.freeze()


# ----------------------------------------------------------------------------- the loop
def train(cfg: VLMConfig):
    """One phase, from config to final checkpoint. Returns {"model", "step", "checkpoint", "losses": [(step,
    loss)], "stats": [one per log line], "val_loss", "caption_scores" (rank 0, end of phase), "skipped": {reason:
    count}}. A stop signal saves, then raises Stopped."""
    cfg.validate()  # every check that needs no weights comes first: a mistake costs seconds, not minutes
    check_shapes(cfg)
    checkpoint.check_init_from(cfg)
    rank, world, device = setup_distributed(cfg)
    with checkpoint.OutDir(cfg, rank):  # one run in out_dir at a time, and never a new run over another's
        return train_phase(cfg, rank, world, device)


def train_phase(cfg, rank, world, device):
    resume_from = checkpoint.newest(cfg.out_dir) if cfg.resume else None
    if resume_from:
        checkpoint.check_resume(cfg, resume_from, world)
    tokenizer = load_tokenizer(cfg)
    data = open_data(cfg, tokenizer, rank, world)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; DDP gives every rank rank 0's initial weights
    model = build_model(cfg, device, resume_from is not None, tokenizer)
    train_loader, val_loader = build_data(cfg, model, rank, world, data)
    steps_per_epoch = len(train_loader.batch_sampler) // cfg.grad_accum
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(cfg, model)
    scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_frac * total), total)
    state = {"step": 0, "bad_steps": 0, "bad_in_a_row": 0, "data": SkipTally().state_dict()}
    if resume_from:
        state = checkpoint.load(resume_from, model, optimizer, scheduler, rank)
    # the run's id (kept across resumes: wandb's run, and which checkpoints rotation may remove) and its data
    state["run_id"] = state.get("run_id") or new_run_id()
    state["data_identity"] = data["identity"]
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else None
    forward = ddp or model
    if cfg.compile and device.type == "cuda":
        model.compile_blocks(cuda_graphs=cfg.cuda_graphs and ddp is None)
    autocast = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # fixed gradient buffers, zeroed after each step: a CUDA-graphed backward writes its outputs
        p.grad = torch.zeros_like(p)  # to memory that the next micro-batch's replay reuses (grad_accum > 1)
    steps = steps_of_micro_batches(train_loader, state["step"], cfg.grad_accum)
    tally, min_seen = SkipTally(**state["data"]), min(100, len(data["train_idx"]))
    # non-finite steps and the logged loss are summed on the device and read at log lines: no sync per step
    bad_total, bad_streak = torch.tensor(state["bad_steps"], device=device), torch.tensor(state["bad_in_a_row"], device=device)
    # a resumed run's streak goes on, but only steps of this run can stop it: a run stopped for non-finite steps
    # is given another try when resumed (its first step decides)
    worst_streak, loss_sum, loss_tokens = torch.zeros_like(bad_streak), torch.zeros((), device=device), torch.zeros((), device=device)
    meter, reporter = Meter(model, device, world), Reporter(cfg, rank, state["step"], state["run_id"])
    seen, skipped, truncated = tally.seen, tally.skipped, tally.truncated  # summed over ranks at each log line
    result = {"losses": [], "stats": [], "val_loss": None, "caption_scores": None, "checkpoint": resume_from}
    reporter.print(f"phase {cfg.phase}: {sum(p.numel() for p in params):,} trainable parameters, {model.n_image_tokens} "
                   f"image tokens, {cfg.batch_tokens * cfg.grad_accum * world} tokens a step, steps {state['step']}->{total}"
                   + (f", resumed from {resume_from}" if resume_from else ""))
    bar = tqdm(total=total, initial=state["step"], disable=rank != 0, dynamic_ncols=True, leave=False)
    first_step, stopping = state["step"] + 1, 0  # the step that compiles; the signal that stopped the run
    # closing(steps): the data workers stop when training ends, not whenever the garbage collector finds them
    with bar, StopRequest() as stop, closing(steps), FrozenHeap() as heap:
        while state["step"] < total:
            lr = scheduler.get_last_lr()[0]  # this step's learning rate (the scheduler steps after it)
            t0 = time.perf_counter()
            batches = next(steps)  # grad_accum micro-batches
            data_wait = time.perf_counter() - t0
            tally.add(batches)
            tally.check(cfg.max_bad_fraction, min_seen)
            # Each micro-batch's summed loss is divided by the label-token count of the whole global batch, so the
            # accumulated gradient is exactly the global batch's (not a mean of micro-batch means). DDP averages
            # over ranks, hence * world; it all-reduces once, on the last micro-step (no_sync before it).
            n_local = torch.tensor(float(sum(b["n_label_tokens"] for b in batches)))
            n_global = all_reduce(n_local.to(device, non_blocking=True))  # a blocking copy would wait for the GPU
            step_loss = torch.zeros((), device=device)
            try:
                for i, batch in enumerate(batches):  # (one whose records were all unusable trains nothing: same shape)
                    with ddp.no_sync() if ddp and i < len(batches) - 1 else nullcontext():
                        with autocast:
                            out = forward(**to_device(batch, device))
                        (out.loss_sum * world / n_global.clamp(min=1)).backward()
                    step_loss += out.loss_sum.detach()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
                finite = torch.isfinite(norm)
                optimizer.found_inf = (~finite).float()  # fused AdamW skips the update on the device (GradScaler's hook)
                optimizer.step()
            except torch.cuda.OutOfMemoryError:
                raise RuntimeError(f"CUDA out of memory at batch_tokens={cfg.batch_tokens}: lower --batch_tokens and "
                                   "raise --grad_accum by the same factor (a step's tokens stay the same)") from None
            scheduler.step()
            optimizer.zero_grad(set_to_none=False)
            state["step"] += 1
            step, done = state["step"], state["step"] == total
            bar.update()
            meter.add(batches, data_wait)
            loss_sum += torch.where(finite, step_loss, 0.0)  # a skipped step does not poison the logged loss
            loss_tokens += torch.where(finite, n_global, 0.0)
            bad_total, bad_streak = bad_total + (~finite).long(), (bad_streak + 1) * (~finite).long()
            worst_streak = torch.maximum(worst_streak, bad_streak)
            if step == first_step:
                heap.freeze()

            if step % cfg.log_every == 0 or done:
                summed, tokens = torch.stack([all_reduce(loss_sum), loss_tokens]).tolist()  # one host sync per log line
                loss = summed / tokens if tokens else None  # None: nothing trained (unusable samples, skipped steps)
                stats = meter.read()
                state["bad_steps"], state["bad_in_a_row"], worst = torch.stack([bad_total, bad_streak, worst_streak]).tolist()
                follow_applied_steps(scheduler, step - state["bad_steps"])
                loss_sum, loss_tokens, worst_streak = torch.zeros_like(loss_sum), torch.zeros_like(loss_tokens), bad_streak.clone()
                seen, skipped, truncated = skips_over_ranks(tally)
                result["losses"].append((step, loss))
                result["stats"].append(stats)
                reporter.print(step_line(step, total, lr, loss, stats, sum(skipped.values()), truncated))
                reporter.log(step, {"loss": loss, "lr": lr, **stats, "bad_steps": state["bad_steps"],
                                    "truncated": truncated, **{f"skipped/{k}": v for k, v in skipped.items()}})
                if worst >= cfg.max_bad_steps:
                    state["data"] = tally.state_dict()
                    path = checkpoint.save(cfg.out_dir, model, optimizer, scheduler, state, rank, cfg.keep_last)
                    raise RuntimeError(
                        f"{cfg.max_bad_steps} steps in a row had a non-finite loss or gradient (by step {step}); saved "
                        f"{path}, its weights the last finite ones. To go on at a lower learning rate, start a new run "
                        f"from it: --init_from {path} --out_dir {cfg.out_dir}-lower-lr and a lower --{lr_field(cfg)} "
                        "(resuming this run retries at the same rate; --max_bad_steps tolerates longer streaks)")

            if cfg.val_size and (step % cfg.eval_every == 0 or done):
                result["val_loss"] = evaluate(model, val_loader, device, autocast)
                captions = sample_captions(model, val_loader.dataset, cfg.eval_captions, device)[0] if rank == 0 else []
                reporter.print(f"step {step}: val loss {result['val_loss']:.4f}")
                reporter.log(step, {"val_loss": result["val_loss"]}, captions)
                if done and cfg.metric_records and rank == 0:  # the captioning metrics: once a phase, they are slow
                    result["caption_scores"], _, _ = caption_metrics(model, val_loader.dataset, cfg.metric_records, device)
                    reporter.print(f"step {step}: " + score_line(result["caption_scores"]))
                    reporter.log(step, {f"val_{k}": v for k, v in result["caption_scores"].items()})
            if step % cfg.eval_every == 0 or done:
                reporter.plot_curves()

            stopping = stop.signum  # every rank stops together if any was asked to
            if world > 1:
                stopping = int(all_reduce(torch.tensor(stopping, device=device), dist.ReduceOp.MAX))
            if step % cfg.save_every == 0 or done or stopping:
                state["bad_steps"], state["bad_in_a_row"] = torch.stack([bad_total, bad_streak]).tolist()
                state["data"] = tally.state_dict()
                result["checkpoint"] = checkpoint.save(cfg.out_dir, model, optimizer, scheduler, state, rank, cfg.keep_last)
            if stopping:
                break
    reporter.close()
    if skipped:  # as of the last log line (the last step always logs; a stop request may come between)
        reporter.print(f"skipped {sum(skipped.values())} of {seen} samples: {dict(skipped)}")
        if sum(skipped.values()) > cfg.max_bad_fraction * seen:  # a short run ends before the check starts
            reporter.print(f"warning: that is more than max_bad_fraction={cfg.max_bad_fraction}; the run did not stop "
                           f"for it because the check starts after {min_seen} samples. Check the data")
    if truncated:
        reporter.print(f"truncated {truncated} of {seen} samples at the end of an assistant turn to fit "
                       f"max_text_tokens={cfg.max_text_tokens}: their later turns did not train (raise it to keep them)")
    if stopping:
        raise Stopped(signal.Signals(stopping), state["step"], result["checkpoint"])
    return {**result, "model": model, "step": state["step"], "skipped": dict(skipped), "truncated": truncated}


def lr_field(cfg):
    return {"projector": "projector_lr", "lora": "lora_lr", "full": "full_lr"}[cfg.phase]


def new_run_id():
    """Rank 0's fresh id, on every rank."""
    ids = [checkpoint.new_run_id()]
    if dist.is_initialized():
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def run_command(task):
    """Runs task() as a command: no download bars, a user's mistake as one line (no traceback), and the
    process group closed however it ends."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizing happens in the workers
    transformers.utils.logging.disable_progress_bar()
    try:
        return task()
    except (ConfigError, DataError, HubError) as e:
        sys.exit(f"error: {e}")
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv):
    cfg = parse_or_exit(argv, prog="main.py", description=__doc__.splitlines()[0])
    return run_command(lambda: train(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
