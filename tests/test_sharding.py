"""--phase full under torchrun shards the LM with FSDP2 (training/sharding.py): 2 gloo processes on the CPU each hold
half of the LM, reach one process's weights, skip a non-finite step together, and each write their half of the
checkpoint, which resumes exactly on 2 processes and loads, captions and exports in one."""
import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, cli_args, steps_saved, tiny_config, train_as_one_process
from generate import main as generate_main
from models.vlm import SHARDED_WEIGHTS, read_weights
from test_full_phase import full_cfg
from data.loading import open_data
from models.vlm import load_tokenizer
from training import checkpoint, loop
from data.shapes import draw
from models.vision import image_pixels

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(n, cfg, log, script="main.py", expect_ok=True, **changes):
    """Runs `script` (main.py) with cfg's flags on n processes; returns the out_dir's newest checkpoint."""
    launch(n, [script, *cli_args(cfg, **changes)], log, expect_ok)
    return checkpoint.newest(changes.get("out_dir", cfg.out_dir))


def launch(n, args, log, expect_ok=True):
    """torchrun on n processes: args are the script and its arguments; stderr goes to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it for 2 processes: the same matmul sums
    with open(log, "a") as err:  # (a file: a full pipe would block)
        job = subprocess.run([*TORCHRUN, "--nproc_per_node", str(n), *map(str, args)],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    assert (job.returncode == 0) == expect_ok, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def full(tiny_assets, tmp_path_factory):
    """A full phase of 3 steps of 2 micro-batches, from a projector checkpoint; 9 validation records: 5 on rank 0
    and 4 on rank 1 of 2, so with batch 4 one rank has a validation batch more than the other."""
    return full_cfg(tiny_config(tiny_assets, tmp_path_factory.mktemp("full")), grad_accum=2, max_steps=3, val_size=9)


CRASH_AFTER_THREE_STEPS = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from torch.optim.optimizer import register_optimizer_step_pre_hook
import main
steps = []
def crash(optimizer, args, kwargs):
    steps.append(1)
    if len(steps) == 4:
        raise RuntimeError("simulated crash after step 3")
register_optimizer_step_pre_hook(crash)
main.main(sys.argv[1:])
"""

# main.main once for each [hook, folder, flags] of the JSON file argv[1], one after the other in one process (each
# run opens and closes its process group): torchrun's start-up and the imports, ~20 s a launch on 2 cores, are paid
# once. A hook changes its own run only: each run's weights and log are bit for bit those of a launch of its own.
SEVERAL_RUNS = f"""
import contextlib, json, os, sys
sys.path.insert(0, {str(REPO)!r})
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import main
from training import loop

@contextlib.contextmanager
def count_shards(folder):
    \"\"\"Once the run has sharded its model, each rank writes what it holds to folder/rank_R.json.\"\"\"
    distribute = loop.distribute
    def counted(model, cfg, world, device):
        forward = distribute(model, cfg, world, device)
        lm = [p for n, p in model.named_parameters() if n.startswith("lm.")]
        vision = list(model.vision.parameters())
        counts = dict(lm_sharded=all(isinstance(p, DTensor) for p in lm), lm=sum(p.numel() for p in lm),
                      lm_here=sum(p.to_local().numel() for p in lm),
                      vision_whole=not any(isinstance(p, DTensor) for p in vision))
        open(folder + f"/rank_{{os.environ['RANK']}}.json", "w").write(json.dumps(counts))
        return forward
    loop.distribute = counted
    try:
        yield
    finally:
        loop.distribute = distribute

@contextlib.contextmanager
def nan_on_rank_1_at_step_2(folder):
    clip, calls = torch.nn.utils.clip_grad_norm_, []
    def clip_after_a_nan(params, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and os.environ["RANK"] == "1":
            params[0].grad.to_local().fill_(float("nan"))  # this rank's shard of one weight's reduced gradient
        return clip(params, *args, **kwargs)
    torch.nn.utils.clip_grad_norm_ = clip_after_a_nan
    try:
        yield
    finally:
        torch.nn.utils.clip_grad_norm_ = clip

for i, (hook, folder, argv) in enumerate(json.load(open(sys.argv[1]))):
    if i:  # the first run opens its process group as main.py does; a later one on keys of its own in torchrun's
           # store (on the same keys it would find the last run's addresses, its peers long gone)
        store = dist.PrefixStore(f"run_{{i}}/", next(dist.rendezvous("env://"))[0])
        dist.init_process_group("gloo", store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    with globals()[hook](folder) if hook else contextlib.nullcontext():
        main.main(argv)
"""


def torchrun_several(n, runs, log, folder):
    """main.py's runs [(hook or None, cfg, {changes})] (the hooks: SEVERAL_RUNS), one after the other in one
    torchrun launch of n processes; a hook writes what it records into `folder`."""
    (folder / "runs.json").write_text(json.dumps([(hook, str(folder), cli_args(cfg, **changes))
                                                  for hook, cfg, changes in runs]))
    (folder / "several.py").write_text(SEVERAL_RUNS)
    launch(n, [folder / "several.py", folder / "runs.json"], log)


@pytest.fixture(scope="module")
def runs(full, tmp_path_factory):
    """Every run this file checks, in 2 torchrun launches (not 7: each launch pays the start-up and imports):
    - one/: that full phase (validation at the end) as 1 process x batch 8, in this process;
    - broken/: 2 sharded processes x batch 4, 6 steps saved every 3, that crash after step 3 (both ranks, at the
      same optimizer step);
    - then one launch of 2 sharded processes x batch 4, one run after the other: broken/ resumed; unbroken/, the
      same 6 steps never interrupted; two/, one/'s full phase, each rank writing what it holds once sharded
      (rank_R.json); nan/, with a NaN in rank 1's gradient shard at step 2, saved every step."""
    tmp, cfg = tmp_path_factory.mktemp("sharded"), dataclasses.replace(full, batch_size=4)
    resumable = dataclasses.replace(cfg, max_steps=6, save_every=3, val_size=0)
    one = train_as_one_process(dataclasses.replace(full, batch_size=8, out_dir=str(tmp / "one")))["checkpoint"]
    crash = tmp / "crash.py"
    crash.write_text(CRASH_AFTER_THREE_STEPS)
    torchrun(2, resumable, tmp / "broken.log", script=crash, expect_ok=False, out_dir=tmp / "broken")
    saved_at_the_crash = steps_saved(tmp / "broken")
    torchrun_several(2, [(None, resumable, dict(out_dir=tmp / "broken")),
                         (None, resumable, dict(out_dir=tmp / "unbroken")),
                         ("count_shards", cfg, dict(out_dir=tmp / "two")),
                         ("nan_on_rank_1_at_step_2", cfg, dict(save_every=1, keep_last=3, val_size=0,
                                                               out_dir=tmp / "nan"))],
                     tmp / "several.log", tmp)
    return SimpleNamespace(cfg=cfg, dir=tmp, one=one, two=checkpoint.newest(tmp / "two"),
                           saved_at_the_crash=saved_at_the_crash)


@pytest.mark.slow
def test_two_sharded_processes_reach_the_weights_and_validation_loss_of_one(runs):
    """The validation loss too, though one rank has a batch more (its peer runs a forward that counts nothing, as
    each forward gathers weights from both)."""
    cfg, one, two = runs.cfg, runs.one, runs.two
    tokenizer = load_tokenizer(cfg)
    assert [len(open_data(cfg, tokenizer, rank, 2)["val_batches"]) for rank in (0, 1)] == [2, 1]
    val_one, val_two = (val_losses(run.parent) for run in (one, two))
    assert val_one.keys() == val_two.keys() == {cfg.max_steps}
    assert val_two[cfg.max_steps] == pytest.approx(val_one[cfg.max_steps], rel=1e-5)
    a, b = read_weights(one), read_weights(two)
    assert not (one / SHARDED_WEIGHTS).exists() and a.keys() == b.keys()
    # As the DDP test (test_train.py) explains: other rows per rank sum matmuls in another order (fp32 rounding),
    # and AdamW can move a weight whose gradient is itself at rounding level by up to 2 lr a step.
    reach = 2 * cfg.full_lr * cfg.max_steps
    for k in a:
        off = (b[k] - a[k]).abs()
        assert (off > 1e-6 + 1e-5 * a[k].abs()).float().mean() < 1e-3 and off.max() <= reach, (k, off.max())


@pytest.mark.slow
def test_each_process_writes_its_half_of_the_weights(runs):
    """Each rank's DCP file holds only its shards: about half of the weights' bytes (every weight trains, so none is
    replicated and written by rank 0 alone)."""
    files = sorted((runs.two / SHARDED_WEIGHTS).glob("*.distcp"))
    assert [f.name for f in files] == ["__0_0.distcp", "__1_0.distcp"]
    total = sum(t.numel() * t.element_size() for t in read_weights(runs.two).values())
    assert all(0.4 * total < f.stat().st_size < 0.6 * total for f in files)


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_captions_and_exports_in_one_process(runs, tmp_path):
    cfg, two = runs.cfg, runs.two
    saved = read_weights(two)
    model = checkpoint.load_model(two).eval()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    started = loop.build_model(dataclasses.replace(cfg, init_from=str(two), out_dir=str(tmp_path / "next")),
                               torch.device("cpu"), resuming=False)
    assert all(torch.equal(p, params[n]) for n, p in started.named_parameters())
    pixels = image_pixels(model.processor, [draw("red", "circle", "center"), draw("blue", "square", "top left")])
    captions = model.generate(pixels, max_new_tokens=8)
    generate_main(["--checkpoint", str(two), "--export", str(tmp_path / "exported")])
    assert checkpoint.load_model(tmp_path / "exported").generate(pixels, max_new_tokens=8) == captions


@pytest.mark.slow
def test_each_process_holds_half_of_the_lm_and_the_whole_tower(runs):
    """Each process keeps about half of the LM (what sharding saves) and the whole frozen tower: as run two/ held
    them once sharded."""
    ranks = [json.loads((runs.dir / f"rank_{r}.json").read_text()) for r in range(2)]
    assert all(r["lm_sharded"] and r["vision_whole"] for r in ranks)
    assert sum(r["lm_here"] for r in ranks) == ranks[0]["lm"]  # each element on exactly one rank
    assert all(0.4 * r["lm"] < r["lm_here"] < 0.6 * r["lm"] for r in ranks)


@pytest.mark.slow
def test_a_sharded_run_resumes_exactly(runs):
    """2 sharded processes crash after step 3 of 6 (both ranks, at the same optimizer step) and resume: the same
    losses and bitwise the same weights as a run that was never interrupted."""
    broken, unbroken = runs.dir / "broken", runs.dir / "unbroken"
    assert runs.saved_at_the_crash == [3]
    assert losses(broken) == losses(unbroken) and len(losses(unbroken)) == 6
    a, b = read_weights(checkpoint.newest(broken)), read_weights(checkpoint.newest(unbroken))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out_dir, key="loss"):
    """{step: loss} from a run's log.jsonl (a resumed run's lines follow the crashed run's)."""
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if key in line}


def val_losses(out_dir):
    return losses(out_dir, "val_loss")


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(runs):
    """The gradient norm over sharded gradients is the whole model's, so a NaN in one rank's shard skips the step
    everywhere: the weights after step 2 are those after step 1, and step 3 trains."""
    out = runs.dir / "nan"
    one, two, three = (read_weights(out / f"step_{s:08d}") for s in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one) and not all(torch.equal(two[k], three[k]) for k in two)
    skipped_so_far = [json.loads(line)["bad_steps"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert skipped_so_far == [0, 1, 1]
