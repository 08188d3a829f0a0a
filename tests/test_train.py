"""The training loop: exact accumulation, DDP equivalence, exact resume, data sources, phases, demo."""
import dataclasses
import gc
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import main
from training import loop
from conftest import REPO, cli_args, train_as_one_process, trainable_params
from data.llava import ImageStore, LlavaDataset, load_records
from data.packing import PackedBatchSampler
from training.checkpoint import WEIGHTS
from models.vlm import VLM


def weights(checkpoint):
    return load_file(str(checkpoint / WEIGHTS))


def dataset(cfg, model, root):
    records = load_records(f"{cfg.data_dir}/chat.json")
    return LlavaDataset(records, list(range(len(records))), ImageStore(root), model.tokenizer, model.processor,
                        model.n_image_tokens, cfg.max_text_tokens)


def first_step_gradient(cfg, on_optimizer_step, **changes):
    """The gradient the optimizer sees at each step of loop.train (no clipping)."""
    grads = []
    on_optimizer_step(lambda opt: grads.append(torch.cat([p.grad.flatten() for p in trainable_params(opt)])))
    loop.train(dataclasses.replace(cfg, grad_clip=0.0, out_dir=tempfile.mkdtemp(dir=Path(cfg.out_dir).parent), **changes))
    return grads


def test_accumulation_equals_whole_batch(tiny_cfg, on_optimizer_step):
    """4 micro-batches of 2 reach the gradient of one batch of the same 8 samples (the sampler deals the same
    samples either way), although the micro-batches hold different numbers of label tokens."""
    [whole] = first_step_gradient(tiny_cfg, on_optimizer_step, batch_size=8, grad_accum=1, max_steps=1)
    [accumulated] = first_step_gradient(tiny_cfg, on_optimizer_step, batch_size=2, grad_accum=4, max_steps=1)
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())
    # the pitfall this guards against: a mean of per-micro-batch means. The same 4 batches as 4 steps at a
    # learning rate too small to move the weights give those per-batch means.
    means = first_step_gradient(tiny_cfg, on_optimizer_step, batch_size=2, grad_accum=1, max_steps=4,
                                projector_lr=1e-30, warmup_frac=0.0)
    mean_of_means = sum(means[-4:]) / 4
    assert (mean_of_means - whole).abs().max() > 100 * (accumulated - whole).abs().max()


def test_zip_and_folder_give_identical_samples(tiny_cfg, tmp_path):
    model = VLM.from_config(tiny_cfg)
    with zipfile.ZipFile(f"{tiny_cfg.data_dir}/images.zip") as zf:
        zf.extractall(tmp_path / "images")
    (tmp_path / "chat.json").write_bytes((REPO / tiny_cfg.data_dir / "chat.json").read_bytes())
    from_zip, from_folder = dataset(tiny_cfg, model, tiny_cfg.data_dir), dataset(tiny_cfg, model, tmp_path)
    assert from_zip.images.zip_path and not from_folder.images.zip_path
    for i in range(len(from_zip)):
        a, b = from_zip[i], from_folder[i]
        assert a["id"] == b["id"] and "skip" not in a
        for k in ("input_ids", "labels", "pixel_values"):
            assert torch.equal(a[k], b[k])


def frozen_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "projector" not in k and "lora_" not in k}


@pytest.mark.parametrize("phase", ["projector", "lora"])
def test_phase_trains_only_its_parameters(tiny_cfg, phase):
    cfg = dataclasses.replace(tiny_cfg, max_steps=2)
    if phase == "lora":
        cfg = dataclasses.replace(cfg, phase="lora", out_dir=cfg.out_dir + "-lora",
                                  init_from=str(loop.train(cfg)["checkpoint"]))
    before = frozen_state(VLM.from_config(cfg))
    model = loop.train(cfg)["model"]
    after = frozen_state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    trained = {n.split(".")[0] + (".lora" if "lora_" in n else "") for n, p in model.named_parameters() if p.requires_grad}
    assert trained == ({"projector"} if phase == "projector" else {"projector", "lm.lora"})


def test_lora_phase_starts_from_the_projector_checkpoint(tiny_cfg):
    proj = loop.train(dataclasses.replace(tiny_cfg, max_steps=2))
    lora_cfg = dataclasses.replace(tiny_cfg, phase="lora", init_from=str(proj["checkpoint"]), out_dir=tiny_cfg.out_dir + "-l")
    model = loop.build_model(lora_cfg, torch.device("cpu"), resuming=False)
    assert all(torch.equal(p, proj["model"].projector.state_dict()[n]) for n, p in model.projector.state_dict().items())


def check_resume_is_exact(cfg, on_optimizer_step, phase="lora"):
    """A phase-2 run (LoRA with dropout on, or the full phase) crashes after step 3 of 6 and resumes: the same
    losses and bitwise the same weights as a run that was never interrupted."""
    proj = loop.train(dataclasses.replace(cfg, max_steps=2, out_dir=cfg.out_dir + "-p"))
    cfg = dataclasses.replace(cfg, phase=phase, init_from=str(proj["checkpoint"]), lora_dropout=0.2,
                              max_steps=6, save_every=3, grad_accum=2, batch_size=4)
    unbroken = loop.train(dataclasses.replace(cfg, out_dir=cfg.out_dir + "-unbroken"))
    calls = []

    def crash_after_three(optimizer):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated crash after step 3")

    on_optimizer_step(crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg)
    resumed = loop.train(cfg)
    assert [s for s, _ in resumed["losses"]] == [4, 5, 6]
    assert resumed["losses"] == unbroken["losses"][3:]
    a, b = weights(resumed["checkpoint"]), weights(unbroken["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_resume_is_exact(tiny_cfg, on_optimizer_step):
    check_resume_is_exact(tiny_cfg, on_optimizer_step)


def test_the_sampler_deals_epoch_after_epoch_from_any_batch():
    """Each epoch is a new permutation planned into micro-batches (its tail dropped), the next follows without end,
    and a sampler started at micro-batch k deals what one started at 0 deals from its k-th on: a run resumes
    mid-epoch exactly. Each micro-batch keeps to both budgets."""
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 9, 1, 5, 7]
    sampler = PackedBatchSampler(lengths, batch_size=3, batch_tokens=16, seed=1)
    stream = list(itertools.islice(sampler, 30))
    assert all(len(b) <= 3 and sum(lengths[i] for i in b) <= 16 for b in stream)
    epochs, at = [], 0
    for e in range(3):
        n = len(sampler.epoch(e))
        epochs.append(sum(stream[at:at + n], []))
        at += n
    assert all(len(set(e)) == len(e) and set(e) <= set(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    sampler.start = 4
    assert list(itertools.islice(sampler, 10)) == stream[4:14]


def test_ranks_share_every_epoch_equally():
    """Two ranks deal one plan alternately: the same number of micro-batches each, no record on both."""
    lengths = list(range(1, 40))
    ranks = [PackedBatchSampler(lengths, 4, 30, rank=r, world=2, seed=3) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    mine = [sum(r.epoch(0), []) for r in ranks]
    assert not set(mine[0]) & set(mine[1])


def test_a_run_of_three_epochs_reads_its_data_through_one_iterator(tiny_cfg, monkeypatch):
    """Every training record once per epoch, a new order each epoch, and one iterator over the training loader
    for the whole run: a new one per epoch would restart the data workers, a stall at every epoch's start."""
    train_iterators, read = [], []
    real_iter, real_item = DataLoader.__iter__, LlavaDataset.__getitem__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: (
        isinstance(self.batch_sampler, PackedBatchSampler) and train_iterators.append(self)) or real_iter(self))
    monkeypatch.setattr(LlavaDataset, "__getitem__", lambda self, i: read.append(self.indices[i]) or real_item(self, i))
    # 144 training records in batches of 48 (the token budget holds 48 of the longest): 3 steps an epoch
    result = loop.train(dataclasses.replace(tiny_cfg, batch_size=48, batch_tokens=48 * 68, epochs=3, resume=False))
    assert result["step"] == 9 and len(train_iterators) == 1
    epochs = [read[e * 144:(e + 1) * 144] for e in range(3)]  # (no workers: records are read in training order)
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 144 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_the_heap_is_frozen_while_training_and_freed_after(tiny_cfg, on_optimizer_step):
    """Once the data is open, and again after its first step, the loop hides what is alive from Python's full
    collections (each scan of a compiled run's heap stalled a step for over half a second); a finished run's model
    is collectable again, as the sweep's runs in one process need."""
    frozen = []
    on_optimizer_step(lambda opt: frozen.append(gc.get_freeze_count()), when="after")
    result = loop.train(dataclasses.replace(tiny_cfg, max_steps=3, resume=False))
    model = weakref.ref(result.pop("model"))
    del result
    gc.collect()
    assert 0 < frozen[0] < frozen[1] and gc.get_freeze_count() == 0 and model() is None


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_two_nodes_match_two_processes(tiny_cfg, tmp_path):
    """2 ranks x batch 4 (gloo) reach the same weights as 1 process x batch 8; and the README's two-node command
    (one torchrun agent per node, c10d rendezvous, node ranks assigned as the agents join), here two agents on this
    machine, reaches exactly the 2-process run's weights: the same job. Rank-0-only work keyed on the local rank
    would fail here (each node has a local rank 0: two claims on the shared out_dir)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as torchrun sets it for 2 processes: the same matmul sums

    def run(launch, batch_size, out_dir):
        args = ["main.py", *cli_args(tiny_cfg, batch_size=batch_size, grad_accum=2, max_steps=3, out_dir=out_dir)]
        logs = [tmp_path / f"{out_dir.name}_{i}.log" for i in range(len(launch))]  # (files: a full pipe would block)
        jobs = [subprocess.Popen([*torchrun, *cmd, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                 stderr=open(log, "w")) for cmd, log in zip(launch, logs)]
        try:
            for job in jobs:
                job.wait(timeout=300)
        finally:
            for job in jobs:  # one agent failing leaves the other waiting for its peer
                job.kill()
        assert all(job.returncode == 0 for job in jobs), [log.read_text()[-2000:] for log in logs]
        return weights(sorted(out_dir.glob("step_*"))[-1])

    one = weights(train_as_one_process(dataclasses.replace(tiny_cfg, batch_size=8, grad_accum=2, max_steps=3,
                                                           out_dir=str(tmp_path / "one")))["checkpoint"])
    two = run([["--standalone", "--nproc_per_node", "2"]], 4, tmp_path / "two")
    # The ranks' rows hold other samples than the one process's, so matmuls sum in another order: gradients agree to
    # fp32 rounding (~1e-7 relative). AdamW divides each gradient by its own running size, so where a gradient is
    # itself at rounding level, that rounding moves the weight by up to 2 lr a step (seen: 1 entry of 16,384 off by
    # 2.1e-6, torch 2.11). Hence: all but 1 in 1,000 entries within fp32 noise, every one within AdamW's reach.
    reach = 2 * tiny_cfg.projector_lr * 3
    for k in one:
        off = (two[k] - one[k]).abs()
        assert (off > 1e-6 + 1e-5 * one[k].abs()).float().mean() < 1e-3 and off.max() <= reach, (k, off.max())

    with socket.socket() as s:  # a free port for the rendezvous (the OS picks it)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes"]
    nodes = run([node, node], 4, tmp_path / "nodes")
    assert nodes.keys() == two.keys() and all(torch.equal(nodes[k], two[k]) for k in two)
    assert sorted(p.name for p in (tmp_path / "nodes" / "step_00000003").glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]


@pytest.mark.slow
def test_offline_demo_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, "demo.py", f"--out_dir={tmp_path}"], cwd=REPO, timeout=900,
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    captions = [l for l in out.stdout.splitlines() if "(reference:" in l and l.startswith("  shape_")]
    correct = [l for l in captions if l.split(": ", 1)[1].startswith(l.split("(reference: ")[1][:-1])]
    assert len(captions) == 8 and len(correct) >= 6, out.stdout[-3000:]
    val = [json.loads(l)["val_loss"] for l in open(tmp_path / "lora" / "log.jsonl") if "val_loss" in l]
    assert val[-1] < 0.5 < val[0] or val[-1] < 0.2


def test_default_run_offline_names_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main.main([f"--cache_dir={tmp_path}"])
    assert "demo.py" in str(e.value)


def test_resume_with_other_settings_stops_naming_each_field(tiny_cfg, monkeypatch):
    """A rerun that changes the math (here the batch size and a learning rate) stops before anything loads, with
    both values and the two ways out; a harmless change (logging) resumes."""
    loop.train(dataclasses.replace(tiny_cfg, max_steps=2))
    changed = dataclasses.replace(tiny_cfg, max_steps=2, batch_size=4, projector_lr=5e-2)
    monkeypatch.setattr(loop, "build_model", lambda *a: pytest.fail("loaded a model before refusing"))
    with pytest.raises(loop.ConfigError) as e:
        loop.train(changed)
    for text in ("--batch_size: 8 in the checkpoint, 4 now", "--projector_lr: 0.001 in the checkpoint, 0.05 now",
                 "--resume false", "new --out_dir"):
        assert text in str(e.value)
    monkeypatch.undo()
    assert loop.train(dataclasses.replace(tiny_cfg, max_steps=2, log_every=5))["step"] == 2


def test_resume_on_data_edited_in_place_stops_before_loading(tiny_cfg, tmp_path, monkeypatch):
    """chat.json changed in place (same path, other bytes) resumed with another split and order: it stops before
    anything loads, naming the data and the ways out. A checkpoint without run.json (older) resumes as before."""
    data = Path(shutil.copytree(tiny_cfg.data_dir, tmp_path / "data"))
    cfg = dataclasses.replace(tiny_cfg, data_dir=str(data), max_steps=2)
    loop.train(cfg)
    records = json.loads((data / "chat.json").read_text())
    (data / "chat.json").write_text(json.dumps(records[:-1]))
    monkeypatch.setattr(loop, "build_model", lambda *a: pytest.fail("loaded a model before refusing"))
    with pytest.raises(loop.ConfigError) as e:
        loop.train(cfg)
    for text in (f"data: {data / 'chat.json'} (sha256 ", " in the checkpoint, ", "split and order",
                 "--resume false in a new --out_dir", f"--init_from {cfg.out_dir}"):
        assert text in str(e.value)
    monkeypatch.undo()
    (Path(cfg.out_dir) / "step_00000002" / "run.json").unlink()  # as an older tinyvlm saved it
    assert loop.train(cfg)["step"] == 2


@pytest.mark.parametrize("phase, expected", [("projector", 1e-3), ("lora", 2e-5)])
def test_each_phase_trains_the_projector_at_its_own_rate(tiny_cfg, phase, expected):
    cfg = dataclasses.replace(tiny_cfg, phase=phase, init_from="x", projector_lr=1e-3, lora_projector_lr=2e-5)
    model = VLM.from_config(cfg)
    groups = loop.build_optimizer(cfg, model).param_groups
    projector = {id(p) for p in model.projector.parameters()}
    assert {g["lr"] for g in groups if any(id(p) in projector for p in g["params"])} == {expected}
