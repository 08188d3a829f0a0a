"""What the loop counts: told what happened in each step, it says when a step logs, evaluates or saves, reads the
numbers of a log line, and gives what a checkpoint keeps of them.

The loss and the non-finite steps stay on the device: reading a number from the GPU makes the host wait for it, so
they are added up every step and read only at log lines (one wait each). The samples (data/llava.py's SkipTally) and
the throughput (training/throughput.py's Meter) are counted on the host.
"""
import torch

from data.llava import SkipTally
from training.distributed import all_reduce, skips_over_ranks
from training.throughput import Meter


class Bookkeeping:
    """A run's counts from step `saved["step"]` on (saved: a resumed checkpoint's training state, {} for a new run).

    Non-finite steps: how many in all, how many in a row now, and the longest streak since the last log line. A
    resumed run's streak goes on, but only this run's steps can stop it: a run stopped for non-finite steps gets
    another try when resumed (its first step decides)."""

    def __init__(self, cfg, model, device, world, total, saved):
        self.step, self.total, self.max_bad_fraction = saved.get("step", 0), total, cfg.max_bad_fraction
        self.tally = SkipTally(**saved.get("data", {}))  # samples seen, skipped and truncated on this rank
        self.meter = Meter(model, device, world)
        self.loss_sum, self.n_tokens = torch.zeros((), device=device), torch.zeros((), device=device)
        self.bad_steps = torch.tensor(saved.get("bad_steps", 0), device=device)
        self.bad_in_a_row = torch.tensor(saved.get("bad_in_a_row", 0), device=device)
        self.longest_streak = torch.zeros_like(self.bad_in_a_row)
        self.skips = (self.tally.seen, self.tally.skipped, self.tally.truncated)  # every rank's, as of the last read
        self.losses, self.stats = [], []  # (step, loss) and the rates of each log line

    def add(self, batches, data_wait, step_loss, n_tokens, finite):
        """One optimizer step over `batches` (train_step's loss, label tokens and finiteness, on the device); returns
        its number. Raises DataError once the unusable samples are too many beyond chance (SkipTally.check)."""
        self.tally.add(batches)
        self.tally.check(self.max_bad_fraction)
        self.meter.add(batches, data_wait)
        self.loss_sum += torch.where(finite, step_loss, 0.0)  # a skipped step does not poison the logged loss
        self.n_tokens += torch.where(finite, n_tokens, 0.0)
        bad = (~finite).long()
        self.bad_steps, self.bad_in_a_row = self.bad_steps + bad, (self.bad_in_a_row + 1) * bad
        self.longest_streak = torch.maximum(self.longest_streak, self.bad_in_a_row)
        self.step += 1
        return self.step

    def due(self, every):
        """Whether this step logs, evaluates or saves (every: log_every, eval_every, save_every): every `every`
        steps, and the last step always."""
        return self.step % every == 0 or self.step == self.total

    def read(self, scheduler):
        """The log line's numbers since the last read: {"loss" (per label token, every rank's; None if nothing
        trained), "stats" (Meter.read), "bad_steps", "longest_streak", "skips" (samples seen, skipped by reason and
        truncated, over all ranks)}. The skipped steps are known here, so `scheduler` is pointed at the updates
        applied: a skipped step does not advance the learning rate."""
        summed, tokens, bad_steps, longest = torch.stack([all_reduce(self.loss_sum), self.n_tokens,
                                                          self.bad_steps.float(), self.longest_streak.float()]).tolist()
        self.loss_sum, self.n_tokens = torch.zeros_like(self.loss_sum), torch.zeros_like(self.n_tokens)
        self.longest_streak = self.bad_in_a_row.clone()
        loss, stats, self.skips = summed / tokens if tokens else None, self.meter.read(), skips_over_ranks(self.tally)
        self.losses.append((self.step, loss))
        self.stats.append(stats)
        applied = self.step - int(bad_steps)
        if scheduler.last_epoch != applied:
            scheduler.last_epoch = applied - 1
            scheduler.step()
        return {"loss": loss, "stats": stats, "bad_steps": int(bad_steps), "longest_streak": int(longest),
                "skips": self.skips}

    def state_dict(self):
        """What a checkpoint keeps: the step, the non-finite counts, this rank's sample counts."""
        bad_steps, bad_in_a_row = torch.stack([self.bad_steps, self.bad_in_a_row]).tolist()
        return {"step": self.step, "bad_steps": bad_steps, "bad_in_a_row": bad_in_a_row,
                "data": self.tally.state_dict()}
