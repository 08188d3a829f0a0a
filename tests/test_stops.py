"""A run stopped anywhere loses nothing: SIGKILL at any point, then resume, matches an unbroken run; SIGTERM or
SIGINT (to the main process, to the whole process group, to a torchrun job) finish the step, save and exit with
the signal's code; a rank that fails ends every rank without a hang; a finished process exits with its data
workers alive.

These run training in real child processes (SIGKILL, SIGTERM and SIGINT reach a process of its own) forked from a
server that has imported the loop (training/loop.py) once: `python main.py` would pay the ~15 s import of torch + transformers on every
launch and restart.
"""
import dataclasses
import faulthandler
import json
import multiprocessing
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import main
from training import loop
from conftest import REPO, cli_args, log_lines, same, steps_saved
from training import checkpoint, distributed
from training.checkpoint import WEIGHTS


FORKSERVER = multiprocessing.get_context("forkserver")
FORKSERVER.set_forkserver_preload(["main", "training.loop"])


def _at_nth(point, n, action):
    """Runs action() at the n-th time a child reaches `point`: "load" (before it loads the data), "step" (before an
    optimizer step: its gradient is computed, the weights not yet changed), "save" (mid-save: the weights are in
    the temp dir, the train state is not), "eval" (in an evaluation, its data workers started)."""
    calls = []

    def reached(*args):
        calls.append(1)
        if len(calls) == n:
            action()
    if point == "step":
        register_optimizer_step_pre_hook(reached)
        return
    owner, name, after = {"load": (loop, "build_data", False), "save": (checkpoint, "save_model", True),
                          "eval": (loop, "start_workers", True)}[point]
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if not after:
            reached()
        out = real(*args, **kwargs)
        if after:
            reached()
        return out
    setattr(owner, name, wrapped)


def _hold(marker):
    """Tell the test where we are (the marker file), then wait for its signal. SIGKILL ends us here; SIGTERM and
    SIGINT are caught from before the marker appears, so none is lost, then re-raised for the run's handler. (Not
    a sigwait with the signals blocked: blocked in this thread only, the kernel gives one to another thread, a
    data loader's queue thread, and the wait never ends. A Python handler runs here whichever thread got it.)"""
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    Path(marker).touch()
    while not received:
        time.sleep(0.001)
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    signal.raise_signal(received[0])


def _child(argv, log, env, fail_at=None, pause_at=None, hang_teardown=None):
    """In a fresh child process, in a process group of its own (with its data workers, as a shell's job or a
    scheduler's step): what `python main.py ARGV` does, output to `log`; with fail_at=(rank, step),
    that rank raises at that step; with pause_at=(point, n), the run holds the n-th time it reaches that point
    (see _at_nth) until the test signals it (a kill at a point the test chose, never after a delay); with
    hang_teardown=rank, closing that rank's process group never returns, and it is ended 5 s after a failure."""
    if os.getpgid(0) != os.getpid():  # (torchrun starts each rank as the leader of its own)
        os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)  # like python -u: a killed run's log is complete
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a hung run's stacks (finish), its workers' too
    os.environ.update(env)
    if fail_at:
        def fail():
            if int(os.environ["RANK"]) == fail_at[0]:
                raise RuntimeError(f"simulated failure at {fail_at}")
        _at_nth("step", fail_at[1], fail)
    if pause_at:
        _at_nth(*pause_at, lambda: _hold(f"{log}.held"))
    if hang_teardown is not None and int(os.environ["RANK"]) == hang_teardown:
        distributed.TEARDOWN_S = 5
        torch.distributed.destroy_process_group = lambda *args: time.sleep(3600)
    main.main(argv)


class Run:
    """One training process (see _child) and its log."""

    def __init__(self, argv, log, env=None, fail_at=None, pause_at=None, workers=False, hang_teardown=None):
        """workers: the run starts data workers, which a daemon process may not; the test then ends it (finish)."""
        self.log, self.held = Path(log), Path(f"{log}.held")
        self.process = FORKSERVER.Process(target=_child, daemon=not workers,
                                          args=(argv, str(log), env or {}, fail_at, pause_at, hang_teardown))
        self.process.start()

    def wait_for(self, condition, timeout=300):
        """Polls `condition` until it holds (True) or the process has ended (False)."""
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.001)
        assert time.monotonic() < deadline, f"timed out:\n{self.output()}"
        return False

    def wait_until_held(self):
        assert self.wait_for(self.held.exists), f"ended before reaching its pause point:\n{self.output()}"

    def signal(self, signum):
        os.kill(self.process.pid, signum)

    def signal_group(self, signum):
        """As a scheduler or a shell stops a job: every process of the group, the data workers too."""
        os.killpg(self.process.pid, signum)

    def finish(self, timeout=300):
        self.process.join(timeout)
        if self.process.is_alive():
            os.killpg(self.process.pid, signal.SIGUSR1)  # every process of the run prints its stacks to the log
            time.sleep(2)
            self.process.kill()
            pytest.fail(f"still running after {timeout}s:\n{self.output(tail=20_000)}")
        return self.process.exitcode

    def output(self, tail=3000):
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""


def newest(out_dir):
    return (steps_saved(out_dir) or [0])[-1]


def final_weights(out_dir):
    return load_file(str(Path(out_dir) / f"step_{newest(out_dir):08d}" / WEIGHTS))


def unbroken_weights(cfg):
    """The final weights of the same run, in this process and never interrupted."""
    out_dir = cfg.out_dir + "-unbroken"
    loop.train(dataclasses.replace(cfg, out_dir=out_dir))
    return final_weights(out_dir)


def run_to_completion(cfg, log, expected_weights):
    run = Run(cli_args(cfg), log, workers=cfg.num_workers > 0)
    assert run.finish() == 0, run.output()
    assert newest(cfg.out_dir) == cfg.max_steps
    assert same(final_weights(cfg.out_dir), expected_weights)
    return run


def kill_at(cfg, log, point, n):
    """Starts a run, holds it the n-th time it reaches `point` (see _at_nth), and SIGKILLs it there."""
    run = Run(cli_args(cfg), log, pause_at=(point, n))
    run.wait_until_held()
    run.signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    return run


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_an_unbroken_run(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, max_steps=16, batch_size=4, save_every=1, keep_last=2)
    out, rng = Path(cfg.out_dir), random.Random(0)
    expected = unbroken_weights(cfg)
    kill_at(cfg, tmp_path / "load.txt", "load", 1)  # while it loads the model and data
    assert newest(out) == 0
    n = rng.randint(1, 3)
    kill_at(cfg, tmp_path / "save.txt", "save", n)  # during the n-th save: the temp dir is half written
    assert newest(out) == n - 1 and [p.name for p in out.glob(".tmp-step_*")] == [f".tmp-step_{n:08d}"]
    for i in range(3):  # at random steps, after this run's first new checkpoint
        before, k = newest(out), rng.randint(2, 4)
        run = kill_at(cfg, tmp_path / f"random{i}.txt", "step", k)
        assert newest(out) == before + k - 1
        assert not before or f"resumed from {out / f'step_{before:08d}'}" in run.output()
        latest = out / f"step_{newest(out):08d}"  # the newest checkpoint is always whole
        assert sorted(p.name for p in latest.iterdir()) == ["config.json", "rng_0.pt", "run.json", "train_state.pt", WEIGHTS]
    assert newest(out) < cfg.max_steps
    run_to_completion(cfg, tmp_path / "last.txt", expected)
    assert not list(out.glob(".tmp-*"))  # the half-written checkpoint was cleared when its step was saved again
    assert all(json.loads(line) for line in log_lines(out))  # and no log line was torn


@pytest.mark.slow
def test_sigterm_and_sigint_save_and_exit_cleanly_then_resume_exactly(tiny_cfg, tmp_path):
    cfg = dataclasses.replace(tiny_cfg, max_steps=16, batch_size=4, save_every=1000)  # saves only when asked
    out = Path(cfg.out_dir)
    expected = unbroken_weights(cfg)

    for signum in (signal.SIGTERM, signal.SIGINT):
        before = newest(out)
        run = Run(cli_args(cfg), tmp_path / f"{signum.name}.txt", pause_at=("step", 3))  # 2 steps trained
        run.wait_until_held()
        run.signal(signum)
        assert run.finish() == 128 + signum, run.output()  # 143, 130: a stopped run is not a finished one
        assert f"{signum.name}: finishing this step, saving, then exiting" in run.output()
        assert newest(out) == before + 3  # it finished the step it was in, saved it, and trained no other
        assert json.loads(log_lines(out)[-1])["step"] == newest(out)
        assert not before or f"resumed from {out / f'step_{before:08d}'}" in run.output()
    run_to_completion(cfg, tmp_path / "last.txt", expected)


STOP_POINTS = [("step", 3, 3), ("eval", 1, 4), ("save", 1, 7)]  # (point, n-th time, the checkpoint it ends with)


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_still_saves_then_resumes_exactly(tiny_cfg, tmp_path):
    """A scheduler's stop reaches every process of the job, the data workers too: they leave it to the main
    process, which finishes its step (its evaluation, its save), saves and exits 143, wherever the signal finds it."""
    cfg = dataclasses.replace(tiny_cfg, max_steps=12, batch_size=4, num_workers=2, save_every=2, eval_every=4,
                              val_size=8)
    out = Path(cfg.out_dir)
    expected = unbroken_weights(dataclasses.replace(cfg, num_workers=0))  # workers do not change the numbers
    for point, n, saved in STOP_POINTS:
        run = Run(cli_args(cfg), tmp_path / f"{point}.txt", pause_at=(point, n), workers=True)
        try:
            run.wait_until_held()
            run.signal_group(signal.SIGTERM)
        finally:
            assert run.finish() == 128 + signal.SIGTERM, run.output()
        assert "DataLoader worker" not in run.output() and newest(out) == saved, (point, run.output())
        assert "stopped by SIGTERM" in run.output()
    run_to_completion(cfg, tmp_path / "last.txt", expected)


def test_a_process_exits_with_a_data_loader_still_alive():
    """The data workers ignore SIGTERM (the test above), which is how multiprocessing ends them at exit: a loader
    iterator still alive then (the GPU machine kept training's alive) made the finished process wait forever.
    It exits quietly: no report of a failed worker for the workers it ended itself."""
    script = ("import torch; from torch.utils.data import DataLoader; from data.llava import ignore_stop_signals, "
              "start_workers\n"
              "loader = DataLoader(range(100), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)\n"
              "alive = start_workers(loader); next(alive); print('done', flush=True)\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "done" in run.stdout and "Traceback" not in run.stderr, run.stderr


def test_a_second_ctrl_c_stops_at_once(capsys):
    handler = signal.getsignal(signal.SIGINT)
    with loop.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM only ever asks
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is handler  # and the handlers are restored after
    assert "SIGTERM: finishing this step, saving, then exiting" in capsys.readouterr().out


def test_a_stopped_run_draws_its_curves_and_every_run_names_its_last_checkpoint(tiny_cfg, capsys, on_optimizer_step):
    """README: every run draws curves.png, and a stopped one drew none; a run now ends naming what it saved."""
    cfg = dataclasses.replace(tiny_cfg, max_steps=4)
    out, steps = Path(cfg.out_dir), []

    def stop_at_the_second_step(optimizer):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    on_optimizer_step(stop_at_the_second_step)
    with pytest.raises(loop.Stopped):
        loop.train(cfg)
    assert (out / "curves.png").is_file() and f"saved {out / 'step_00000002'}" in capsys.readouterr().out
    (out / "curves.png").unlink()
    loop.train(cfg)
    assert (out / "curves.png").is_file()
    assert capsys.readouterr().out.rstrip().endswith(f"saved {out / 'step_00000004'}")


def test_ranks_agree_on_a_stop_on_the_host(monkeypatch):
    """Under DDP the ranks agree on a stop every step: over a CPU (gloo) group, where an all-reduce on the GPUs'
    group, read on the host, made the host wait for the GPU every step."""
    reduced, all_reduce = [], torch.distributed.all_reduce

    def spy(tensor, op, group):
        reduced.append((tensor.device.type, torch.distributed.get_backend(group)))
        return all_reduce(tensor, op, group=group)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(torch.distributed, "all_reduce", spy)
    try:
        with loop.StopRequest() as stop:
            assert stop.agreed() == 0
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.agreed() == signal.SIGTERM
    finally:
        monkeypatch.undo()
        torch.distributed.destroy_process_group()
    assert reduced == [("cpu", "gloo")] * 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["processes", "torchrun"])
def test_ddp_rank_failure_ends_every_rank_without_a_hang(tiny_cfg, tmp_path, launcher):
    """Rank 1 raises at step 2 while rank 0 waits for it in an all-reduce: both exit non-zero, promptly.
    `processes`: two plain processes, so rank 0 must end by itself (no agent stops it), even when closing its
    process group after the peer's death never returns (as gloo's once did): it is ended, with its stacks printed."""
    args, timeout = cli_args(tiny_cfg, max_steps=6, batch_size=4), 300
    if launcher == "processes":
        env = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        runs = [Run(args, tmp_path / f"rank{r}.txt", dict(env, RANK=str(r), LOCAL_RANK=str(r)), fail_at=(1, 2),
                    hang_teardown=0) for r in (0, 1)]
        assert [run.finish(timeout) for run in runs] == [1, 1], [run.output() for run in runs]
        assert "Timeout (0:00:05)!" in runs[0].output(tail=20_000) and "in _child" in runs[0].output(tail=20_000)
    else:
        script = tmp_path / "failing_rank.py"
        script.write_text(f"import os, sys\nsys.path[:0] = {[str(REPO), str(REPO / 'tests')]}\n"
                          "from test_stops import _child\n"
                          f"_child(sys.argv[1:], f'{tmp_path}/rank{{os.environ[\"RANK\"]}}.txt', {{}}, (1, 2))\n")
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert out.returncode != 0
        codes = dict(re.findall(r"rank\s*: (\d) .*\n\s*exitcode\s*: (-?\d+)", out.stderr))  # its summary
        assert codes.keys() == {"0", "1"} and "0" not in codes.values(), out.stderr[-3000:]
    assert "simulated failure at (1, 2)" in (tmp_path / "rank1.txt").read_text()
    if launcher == "processes":  # under torchrun the agent may stop rank 0 before its own error: both are fine
        assert "RuntimeError" in (tmp_path / "rank0.txt").read_text()  # an error of its own, not a kill


@pytest.mark.slow
def test_sigterm_to_a_torchrun_job_saves_on_every_rank_then_resumes(tiny_cfg, tmp_path):
    """SIGTERM to torchrun's process group: the agent passes it to each rank's group (the rank and its workers);
    both ranks finish the step, save it together and exit 143; running the job again ends where one process would."""
    cfg = dataclasses.replace(tiny_cfg, max_steps=6, batch_size=4, num_workers=1, save_every=1000)
    script = tmp_path / "held_rank.py"
    script.write_text(f"import os, sys\nsys.path[:0] = {[str(REPO), str(REPO / 'tests')]}\n"
                      "from test_stops import _child\n"
                      f"_child(sys.argv[1:], f'{tmp_path}/rank{{os.environ[\"RANK\"]}}.txt', {{}}, pause_at=('step', 3))\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    job = subprocess.Popen([*torchrun, str(script), *cli_args(cfg)], cwd=REPO, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = [Path(f"{tmp_path}/rank{r}.txt") for r in (0, 1)]
    deadline = time.monotonic() + 300
    while not all(Path(f"{log}.held").exists() for log in ranks):  # both ranks hold before step 3's update
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGTERM)
    agent_output = job.communicate(timeout=300)[0]
    assert job.returncode != 0, agent_output[-3000:]
    for log in ranks:
        assert "stopped by SIGTERM at step 3" in log.read_text(), log.read_text()[-3000:]
    assert steps_saved(cfg.out_dir) == [3] and not list(Path(cfg.out_dir).glob(".tmp-*"))
    try:
        subprocess.run([*torchrun, "main.py", *cli_args(cfg)], cwd=REPO, check=True, timeout=300, capture_output=True,
                       text=True)
    except subprocess.TimeoutExpired as e:  # seen once in CI (2026-12-03), not reproduced: say where it stood
        pytest.fail(f"the resumed job did not finish in 300 s; its output so far:\n{(e.output or '')[-3000:]}")
    expected = unbroken_weights(dataclasses.replace(cfg, batch_size=8, num_workers=0))  # 1 process x 8 = 2 x 4
    got = final_weights(cfg.out_dir)
    assert newest(cfg.out_dir) == 6 and got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
