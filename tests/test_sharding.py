"""--phase full under torchrun shards the LM with FSDP2 (training/sharding.py): 2 gloo processes on the CPU each hold
half of the LM, reach one process's weights, skip a non-finite step together, and each write their half of the
checkpoint, which resumes exactly on 2 processes and loads, captions and exports in one."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cli_args, steps_saved, tiny_config
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
    out_dir = changes.get("out_dir", cfg.out_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it for 2 processes: the same matmul sums
    with open(log, "a") as err:  # (a file: a full pipe would block)
        job = subprocess.run([*TORCHRUN, "--nproc_per_node", str(n), str(script), *cli_args(cfg, **changes)],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    assert (job.returncode == 0) == expect_ok, log.read_text()[-3000:]
    return checkpoint.newest(out_dir)


@pytest.fixture(scope="module")
def full(tiny_assets, tmp_path_factory):
    """A full phase of 3 steps of 2 micro-batches, from a projector checkpoint; 9 validation records: 5 on rank 0
    and 4 on rank 1 of 2, so with batch 4 one rank has a validation batch more than the other."""
    return full_cfg(tiny_config(tiny_assets, tmp_path_factory.mktemp("full")), grad_accum=2, max_steps=3, val_size=9)


@pytest.fixture(scope="module")
def runs(full, tmp_path_factory):
    """That full phase (validation at the end) as 1 process x batch 8 and as 2 sharded processes x batch 4."""
    tmp, cfg = tmp_path_factory.mktemp("sharded"), full
    one = torchrun(1, cfg, tmp / "one.log", batch_size=8, out_dir=tmp / "one")
    two = torchrun(2, cfg, tmp / "two.log", batch_size=4, out_dir=tmp / "two")
    return dataclasses.replace(cfg, batch_size=4), one, two


@pytest.mark.slow
def test_two_sharded_processes_reach_the_weights_and_validation_loss_of_one(runs):
    """The validation loss too, though one rank has a batch more (its peer runs a forward that counts nothing, as
    each forward gathers weights from both)."""
    cfg, one, two = runs
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
    _, _, two = runs
    files = sorted((two / SHARDED_WEIGHTS).glob("*.distcp"))
    assert [f.name for f in files] == ["__0_0.distcp", "__1_0.distcp"]
    total = sum(t.numel() * t.element_size() for t in read_weights(two).values())
    assert all(0.4 * total < f.stat().st_size < 0.6 * total for f in files)


@pytest.mark.slow
def test_a_sharded_checkpoint_loads_captions_and_exports_in_one_process(runs, tmp_path):
    cfg, _, two = runs
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


SHARD_AND_COUNT = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from torch.distributed.tensor import DTensor
from models.config import VLMConfig
from training import loop
from training.distributed import setup_distributed
from training.sharding import distribute
cfg = VLMConfig.load(sys.argv[1])
rank, world, device = setup_distributed(cfg)
model = distribute(loop.build_model(cfg, device, resuming=False), cfg, world, device)
lm = [p for n, p in model.named_parameters() if n.startswith("lm.")]
vision = list(model.vision.parameters())
counts = dict(lm_sharded=all(isinstance(p, DTensor) for p in lm), lm=sum(p.numel() for p in lm),
              lm_here=sum(p.to_local().numel() for p in lm),
              vision_whole=not any(isinstance(p, DTensor) for p in vision))
open(sys.argv[2] + f"/rank_{{rank}}.json", "w").write(json.dumps(counts))
"""


@pytest.mark.slow
def test_each_process_holds_half_of_the_lm_and_the_whole_tower(full, tmp_path):
    full.save(tmp_path / "config.json")
    script = tmp_path / "shard.py"
    script.write_text(SHARD_AND_COUNT)
    log = tmp_path / "shard.log"
    with open(log, "w") as err:
        job = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", str(script), str(tmp_path / "config.json"),
                              str(tmp_path)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err, timeout=300)
    assert job.returncode == 0, log.read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    assert all(r["lm_sharded"] and r["vision_whole"] for r in ranks)
    assert sum(r["lm_here"] for r in ranks) == ranks[0]["lm"]  # each element on exactly one rank
    assert all(0.4 * r["lm"] < r["lm_here"] < 0.6 * r["lm"] for r in ranks)


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


@pytest.mark.slow
def test_a_sharded_run_resumes_exactly(runs, tmp_path):
    """2 sharded processes crash after step 3 of 6 (both ranks, at the same optimizer step) and resume: the same
    losses and bitwise the same weights as a run that was never interrupted."""
    cfg = dataclasses.replace(runs[0], max_steps=6, save_every=3, val_size=0)
    unbroken = torchrun(2, cfg, tmp_path / "unbroken.log", out_dir=tmp_path / "unbroken")
    script = tmp_path / "crash.py"
    script.write_text(CRASH_AFTER_THREE_STEPS)
    torchrun(2, cfg, tmp_path / "broken.log", script=script, expect_ok=False, out_dir=tmp_path / "broken")
    assert steps_saved(tmp_path / "broken") == [3]
    resumed = torchrun(2, cfg, tmp_path / "broken.log", out_dir=tmp_path / "broken")
    assert losses(tmp_path / "broken") == losses(tmp_path / "unbroken") and len(losses(tmp_path / "unbroken")) == 6
    a, b = read_weights(resumed), read_weights(unbroken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out_dir, key="loss"):
    """{step: loss} from a run's log.jsonl (a resumed run's lines follow the crashed run's)."""
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {line["step"]: line[key] for line in lines if key in line}


def val_losses(out_dir):
    return losses(out_dir, "val_loss")


NAN_GRADIENT_ON_RANK_1_AT_STEP_2 = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import torch
import main
clip, calls = torch.nn.utils.clip_grad_norm_, []
def clip_after_a_nan(params, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        params[0].grad.to_local().fill_(float("nan"))  # this rank's shard of one weight's reduced gradient
    return clip(params, *args, **kwargs)
torch.nn.utils.clip_grad_norm_ = clip_after_a_nan
main.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(full, tmp_path):
    """The gradient norm over sharded gradients is the whole model's, so a NaN in one rank's shard skips the step
    everywhere: the weights after step 2 are those after step 1, and step 3 trains."""
    script = tmp_path / "nan.py"
    script.write_text(NAN_GRADIENT_ON_RANK_1_AT_STEP_2)
    out = tmp_path / "run"
    torchrun(2, full, tmp_path / "run.log", script=script, batch_size=4, save_every=1, keep_last=3, val_size=0,
             out_dir=out)
    one, two, three = (read_weights(out / f"step_{s:08d}") for s in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one) and not all(torch.equal(two[k], three[k]) for k in two)
    skipped_so_far = [json.loads(line)["bad_steps"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert skipped_so_far == [0, 1, 1]
