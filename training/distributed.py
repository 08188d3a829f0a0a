"""Which device a command runs on, and the few collective operations the loop needs; with one process (no torchrun)
each is a no-op."""
import faulthandler
import os
import sys
import traceback
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from models.config import ConfigError

TEARDOWN_S = 60  # seconds a failed process of several may take to exit before it is ended


def setup_distributed(cfg):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python main.py` is rank 0 of 1. Returns (rank, world,
    device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=10))
    return rank, world, device


def pick_device(name, gpu=0):
    """The device a --device flag names: cuda (GPU number `gpu`), cpu, or auto: the GPU where torch sees one."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config field 'device' = 'cuda', but torch sees no CUDA GPU here (no driver, or a CPU "
                          "build of torch); use --device cpu, or auto")
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda", gpu) if cuda else torch.device("cpu")


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


def exit_failed_rank():
    """Ends a process of several that failed: its traceback, then exit status 1. Closing the process group follows
    (run_command's finally), and after a peer died mid-collective that can wait on the dead peer for ever (gloo's
    did, once in the tests, in a rank started without torchrun, whose agent would have ended it): if the process
    is still there TEARDOWN_S later, every thread's stack is printed and it exits all the same."""
    traceback.print_exc()
    faulthandler.dump_traceback_later(TEARDOWN_S, exit=True)
    sys.exit(1)
