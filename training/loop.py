"""The training loop: one phase, from config to final checkpoint, as `python main.py` runs it. Read train() top to
bottom: the setup, then the loop (next batch, train_step, schedule, log, evaluate, stop, save); the parts it calls
come before it, what it reports after it. What makes it fast is training/speed.py, what it counts
training/bookkeeping.py."""
import os
import signal
import sys
from contextlib import closing, nullcontext

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

from data.download import DataError
from data.llava import start_workers, steps_of_micro_batches
from data.loading import build_data, open_data
from data.packing import to_device
from models.config import PHASE_LRS, ConfigError, VLMConfig
from models.hub import HubError
from models.vlm import VLM, autocast, check_shapes, load_tokenizer
from training import checkpoint, speed
from training.bookkeeping import Bookkeeping
from training.distributed import all_reduce, exit_failed_rank, setup_distributed
from training.metrics import score_line
from training.report import Reporter, caption_metrics, sample_captions, step_line
from training.sharding import as_many_as_the_longest, distribute, is_sharded, no_sync, whole
from training.stop import StopRequest, Stopped


# ----------------------------------------------------------------------------- model and optimizer
def build_model(cfg, device, resuming, tokenizer=None):
    model = VLM.from_config(cfg, tokenizer)
    if cfg.init_from and not resuming:  # start from an earlier run's model (a resumed run's checkpoint holds it)
        line = checkpoint.init_weights(model, cfg.init_from)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(line)
    return model.place(device)


def build_optimizer(cfg, model):
    """AdamW with one group per (lr, weight decay): the projector at its rate, the other trained weights at theirs
    (models.config.PHASE_LRS); decay on matrices only."""
    projector_lr, other_lr = (getattr(cfg, field) for field in PHASE_LRS[cfg.phase])
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = projector_lr if name.startswith("projector.") else other_lr
            groups.setdefault((lr, cfg.weight_decay if p.ndim >= 2 else 0.0), []).append(p)
    # fused on every device: one kernel for all tensors, and it can skip a step on the device (found_inf)
    return torch.optim.AdamW([{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()],
                             fused=True)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def val_loss(model, loader, device):
    """Mean loss over the whole validation split (each rank its shard, summed across ranks). It runs eager:
    compiled layers would compile and record a second (no-grad) set of CUDA graphs for every length, for a
    small share of the run's time, and interleave them with training's."""
    model.eval()
    loss_sum, n_tokens = torch.zeros((), device=device), 0
    workers = start_workers(loader)
    if is_sharded(model):
        batches = as_many_as_the_longest(workers, len(loader.batch_sampler), device)
    else:
        batches = ((b, True) for b in workers)
    for b, counts in batches:
        with autocast(device):
            loss = model(**to_device(b, device)).loss_sum
        if counts:
            loss_sum += loss
            n_tokens += b["n_label_tokens"]
    model.train()
    total = all_reduce(torch.stack([loss_sum, torch.tensor(float(n_tokens), device=device)]))
    return (total[0] / total[1].clamp(min=1)).item()


def evaluate(model, val_loader, cfg, step, done, rank, device, reporter):
    """The validation loss, a few sample captions, and at the end of the phase the captioning metrics (rank 0:
    they are slow; not for a sharded model, which generates only with every rank: eval.py on its checkpoint does),
    logged. Returns what goes into train's result."""
    out = {"val_loss": val_loss(model, val_loader, device)}
    rank0_generates = rank == 0 and not is_sharded(model)
    captions = sample_captions(model, val_loader.dataset, cfg.eval_captions, device)[0] if rank0_generates else []
    reporter.print(f"step {step}: val loss {out['val_loss']:.4f}")
    reporter.log(step, {"val_loss": out["val_loss"]}, captions)
    if done and cfg.metric_records and rank0_generates:
        out["caption_scores"], _, _ = caption_metrics(model, val_loader.dataset, cfg.metric_records, device)
        reporter.print(f"step {step}: " + score_line(out["caption_scores"]))
        reporter.log(step, {f"val_{k}": v for k, v in out["caption_scores"].items()})
    return out


# ----------------------------------------------------------------------------- the loop
def train(cfg: VLMConfig):
    """One phase, from config to final checkpoint. Returns {"model", "step", "checkpoint", "losses": [(step,
    loss)], "stats": [one per log line], "val_loss", "caption_scores" (rank 0, end of phase), "unusable": {reason:
    count} (records left out before training), "skipped": {reason: count} (samples found unusable while loading),
    "truncated"}. A stop signal saves, then raises Stopped."""
    cfg.validate()  # every check that needs no weights comes first: a mistake costs seconds, not minutes
    check_shapes(cfg)
    checkpoint.check_init_from(cfg)
    rank, world, device = setup_distributed(cfg)
    # one run in out_dir at a time, and never a new run over another's
    with checkpoint.OutDir(cfg, rank), speed.FrozenHeap() as heap:
        resume_from = checkpoint.newest(cfg.out_dir) if cfg.resume else None
        if resume_from:
            checkpoint.check_resume(cfg, resume_from, world)
        tokenizer = load_tokenizer(cfg)
        data = open_data(cfg, tokenizer, rank, world)  # before the model: a data mistake costs seconds
        heap.freeze()  # the data's lengths and plans live as long as the run
        if rank == 0 and data["unusable"]:
            print(unusable_line(data["unusable"], len(data["records"])), flush=True)
        torch.manual_seed(cfg.seed + rank)  # dropout differs per rank; distribute: rank 0's initial weights on all
        model = build_model(cfg, device, resume_from is not None, tokenizer)
        forward = distribute(model, cfg, world, device)  # DDP, or the full phase's shards (training/sharding.py)
        train_loader, val_loader = build_data(cfg, model, rank, world, data)
        total = cfg.max_steps or cfg.epochs * (len(train_loader.batch_sampler) // cfg.grad_accum)
        optimizer = build_optimizer(cfg, model)
        scheduler = transformers.get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_frac * total), total)
        saved = checkpoint.load(resume_from, model, optimizer, scheduler, rank) if resume_from else {}
        # the run's id (kept across resumes: wandb's run, and which checkpoints rotation may remove) and its data
        run = {"run_id": saved.get("run_id") or checkpoint.new_run_id(), "data_identity": data["identity"]}
        book = Bookkeeping(cfg, model, device, world, total, saved)  # the counts: loss, skips, throughput, the step
        steps = steps_of_micro_batches(train_loader, book.step, cfg.grad_accum)  # its workers start before compiling
        params = speed.prepare(model, cfg, device, world)
        reporter = Reporter(cfg, rank, book.step, run["run_id"])
        result = {"val_loss": None, "caption_scores": None, "checkpoint": resume_from}

        def save():  # every rank writes its part
            state = {**book.state_dict(), **run}
            return checkpoint.save(cfg.out_dir, model, optimizer, scheduler, state, rank, cfg.keep_last)
        reporter.print(f"phase {cfg.phase}: {sum(p.numel() for p in params):,} trainable parameters, "
                       f"{model.n_image_tokens} image tokens, {cfg.batch_tokens * cfg.grad_accum * world} tokens a "
                       f"step, steps {book.step}->{total}" + (f", resumed from {resume_from}" if resume_from else ""))
        if is_sharded(model) and (cfg.eval_captions or cfg.metric_records):  # (evaluate says why)
            reporter.print("the LM is sharded: no sample captions or caption metrics while it trains; run eval.py on "
                           "a checkpoint")
        bar = tqdm(total=total, initial=book.step, disable=rank != 0, dynamic_ncols=True, leave=False)
        stopping = 0  # the signal that stopped the run
        # closing(steps): the data workers stop when training ends, not whenever the garbage collector finds them
        first_step = book.step + 1
        with bar, StopRequest() as stop, closing(steps):
            while book.step < total:
                lr = scheduler.get_last_lr()[0]  # this step's learning rate (the scheduler steps after it)
                batches, data_wait = next(steps)  # the step's grad_accum micro-batches, and the wait for them
                step_loss, n_tokens, finite = train_step(forward, batches, optimizer, params, cfg, device)
                scheduler.step()
                step = book.add(batches, data_wait, step_loss, n_tokens, finite)
                bar.update()
                if step == first_step:  # the one that compiles: what compiling made lives as long as the run
                    heap.freeze()
                if book.due(cfg.log_every):
                    logged = book.read(scheduler)  # one wait for the device; the schedule follows the applied steps
                    log_step(reporter, step, total, lr, logged)
                    if logged["longest_streak"] >= cfg.max_bad_steps:
                        raise RuntimeError(non_finite_advice(cfg, step, save()))
                if cfg.val_size and book.due(cfg.eval_every):
                    result.update(evaluate(model, val_loader, cfg, step, step == total, rank, device, reporter))
                stopping = stop.agreed()
                if book.due(cfg.eval_every) or stopping:  # a stopped run draws its curves too
                    reporter.plot_curves()
                if book.due(cfg.save_every) or stopping:
                    result["checkpoint"] = save()
                if stopping:
                    break
        reporter.close()
        report_data(reporter, cfg, *book.skips)
        if result["checkpoint"] != resume_from:  # (a finished run that is run again trains and saves nothing)
            reporter.print(f"saved {result['checkpoint']}")
        if stopping:
            raise Stopped(signal.Signals(stopping), book.step, result["checkpoint"])
        _, skipped, truncated = book.skips
        return {**result, "model": model, "step": book.step, "losses": book.losses, "stats": book.stats,
                "unusable": dict(data["unusable"]), "skipped": dict(skipped), "truncated": truncated}


def train_step(forward, batches, optimizer, params, cfg, device):
    """One optimizer step over grad_accum micro-batches (forward is the model, sharded or not, or its DDP wrapper).
    Returns, on the device: the summed loss, the global batch's label tokens, and whether the step was finite (else
    it was skipped)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    # Each micro-batch's summed loss is divided by the label-token count of the whole global batch, so the
    # accumulated gradient is exactly the global batch's (not a mean of micro-batch means). DDP and FSDP average over
    # ranks, hence * world; they reduce once, on the last micro-step (no_sync before it).
    n_local = torch.tensor(float(sum(b["n_label_tokens"] for b in batches)))
    n_global = all_reduce(n_local.to(device, non_blocking=True))  # a blocking copy would wait for the GPU
    step_loss = torch.zeros((), device=device)
    try:
        for i, batch in enumerate(batches):  # (one whose records were all unusable trains nothing: same shape)
            with no_sync(forward) if world > 1 and i < len(batches) - 1 else nullcontext():
                with autocast(device):
                    out = forward(**to_device(batch, device))
                (out.loss_sum * world / n_global.clamp(min=1)).backward()
            step_loss += out.loss_sum.detach()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        finite = torch.isfinite(whole(norm))
        # Fused AdamW skips the update on the device when found_inf is set: no host sync. found_inf is GradScaler's
        # channel, not a public API (none skips on the device), so a GPU test and a CPU test guard it.
        optimizer.found_inf = (~finite).float()
        optimizer.step()
    except torch.cuda.OutOfMemoryError:
        raise RuntimeError(f"CUDA out of memory at batch_tokens={cfg.batch_tokens}: lower --batch_tokens and "
                           "raise --grad_accum by the same factor (a step's tokens stay the same)") from None
    optimizer.zero_grad(set_to_none=False)  # zeroed, not freed: the fixed buffers of training/speed.py
    return step_loss, n_global, finite


# ----------------------------------------------------------------------------- what the loop reports
def log_step(reporter, step, total, lr, logged):
    """One log line (Bookkeeping.read's numbers): printed, and into log.jsonl and wandb."""
    loss, stats, (_, skipped, truncated) = logged["loss"], logged["stats"], logged["skips"]
    reporter.print(step_line(step, total, lr, loss, stats, sum(skipped.values()), truncated))
    reporter.log(step, {"loss": loss, "lr": lr, **stats, "bad_steps": logged["bad_steps"], "truncated": truncated,
                        **{f"skipped/{k}": v for k, v in skipped.items()}})


def non_finite_advice(cfg, step, path):
    return (f"{cfg.max_bad_steps} steps in a row had a non-finite loss or gradient (by step {step}); saved {path}, "
            f"its weights the last finite ones. To go on at a lower learning rate, start a new run from it: "
            f"--init_from {path} --out_dir {cfg.out_dir}-lower-lr and a lower --{PHASE_LRS[cfg.phase][1]} (resuming this run "
            "retries at the same rate; --max_bad_steps tolerates longer streaks)")


def unusable_line(unusable, n_records):
    bad = sum(unusable.values())
    return (f"data: {bad} of {n_records} records unusable ({dict(unusable)}), left out of training and validation: "
            f"using the other {n_records - bad}")


def report_data(reporter, cfg, seen, skipped, truncated):
    """What the data cost the run, as of the last log line (the last step always logs)."""
    if skipped:
        reporter.print(f"skipped {sum(skipped.values())} of {seen} samples: {dict(skipped)}")
        if sum(skipped.values()) > cfg.max_bad_fraction * seen:  # too few samples to stop for (SkipTally.check)
            reporter.print(f"warning: that is more than max_bad_fraction={cfg.max_bad_fraction}; the run did not stop "
                           "for it because so few samples could be chance. Check the data")
    if truncated:
        reporter.print(f"truncated {truncated} of {seen} samples at the end of an assistant turn to fit "
                       f"max_text_tokens={cfg.max_text_tokens}: their later turns did not train (raise it to keep them)")


def run_command(task):
    """Runs task() as a command: no download bars, a user's mistake as one line (no traceback), and the
    process group closed however it ends (within TEARDOWN_S after a crash: training/distributed.py)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizing happens in the workers
    transformers.utils.logging.disable_progress_bar()
    try:
        return task()
    except (ConfigError, DataError, HubError) as e:
        sys.exit(f"error: {e}")
    except Stopped as e:
        print(e, file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception:
        if dist.is_initialized():
            exit_failed_rank()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
