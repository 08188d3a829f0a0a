"""What the loop counts between two log lines, kept on the device: reading a number from the GPU makes the host
wait for it, so these are added to every step and read only at log lines (one sync each)."""
import torch

from training.distributed import all_reduce


class LoggedLoss:
    """The training loss since the last log line: summed over label tokens (the global batch's, every rank's) of
    the steps that were applied; a skipped (non-finite) step does not poison it."""

    def __init__(self, device):
        self.loss_sum, self.n_tokens = torch.zeros((), device=device), torch.zeros((), device=device)

    def add(self, step_loss, n_tokens, finite):
        self.loss_sum += torch.where(finite, step_loss, 0.0)
        self.n_tokens += torch.where(finite, n_tokens, 0.0)

    def read(self):
        """The mean loss per label token since the last read, or None if nothing trained (only unusable samples,
        or only skipped steps)."""
        summed, tokens = torch.stack([all_reduce(self.loss_sum), self.n_tokens]).tolist()
        self.loss_sum, self.n_tokens = torch.zeros_like(self.loss_sum), torch.zeros_like(self.n_tokens)
        return summed / tokens if tokens else None


class NonFiniteSteps:
    """Steps skipped for a non-finite loss or gradient: how many in all, how many in a row now, and the longest
    streak since the last read. A resumed run's streak goes on, but only this run's steps can stop it: a run
    stopped for non-finite steps gets another try when resumed (its first step decides)."""

    def __init__(self, state, device):  # state: the train state's "bad_steps" and "bad_in_a_row"
        self.total = torch.tensor(state["bad_steps"], device=device)
        self.in_a_row = torch.tensor(state["bad_in_a_row"], device=device)
        self.longest = torch.zeros_like(self.in_a_row)

    def count(self, finite):
        bad = (~finite).long()
        self.total, self.in_a_row = self.total + bad, (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)

    def state_dict(self):
        total, in_a_row = torch.stack([self.total, self.in_a_row]).tolist()
        return {"bad_steps": total, "bad_in_a_row": in_a_row}

    def read(self):
        """(state_dict(), the longest streak since the last read)."""
        total, in_a_row, longest = torch.stack([self.total, self.in_a_row, self.longest]).tolist()
        self.longest = self.in_a_row.clone()
        return {"bad_steps": total, "bad_in_a_row": in_a_row}, longest


def follow_applied_steps(scheduler, applied):
    """Point the LR schedule at the number of updates applied: a skipped (non-finite) step must not advance it.
    The skips are only read at log lines, so it is set there."""
    if scheduler.last_epoch != applied:
        scheduler.last_epoch = applied - 1
        scheduler.step()
