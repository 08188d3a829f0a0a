"""Stop signals: SIGINT/SIGTERM (Ctrl-C, a scheduler) finish the current step, save, and stop the run."""
import signal

import torch
import torch.distributed as dist


class Stopped(Exception):
    """A stop signal's checkpoint is saved. The command exits 128 + the signal's number (130 for SIGINT, 143 for
    SIGTERM), as a process killed by it would: `main.py && main.py --phase lora`, the demo and schedulers see a
    run that did not finish."""

    def __init__(self, signum, step, path):
        super().__init__(f"stopped by {signum.name} at step {step}; saved {path}. Run the same command again to "
                         "resume it")
        self.signum = signum


class StopRequest:
    """SIGINT/SIGTERM finish the current step, save and stop (Stopped); a second Ctrl-C stops at once."""

    def __init__(self):
        self.requested, self.signum, self.previous, self.group = False, 0, {}, None

    def __enter__(self):
        if dist.is_initialized():  # every rank enters together (a new group is a collective call)
            self.group = dist.new_group(backend="gloo")
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

    def agreed(self):
        """The signal that stops the run (0: none), the same on every rank: all stop together, on the same step, if
        any was asked. The ranks agree over a CPU (gloo) group: an all-reduce on the GPUs' group, read on the host,
        made the host wait every step for the GPU to finish the step's queued work."""
        if self.group is None:
            return self.signum
        flag = torch.tensor(self.signum)
        dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group)
        return int(flag)
