"""Benchmark the real training loop (training.loop.train: data set, collator, workers, model, optimizer) on
full-size backbones with random weights, over synthetic CC3M-like JPEGs read from a zip. No hub needed.

    uv run python -m tools.bench                             # projector phase, 2x2 unshuffle: 49 image tokens
    uv run python -m tools.bench --data dirty                # 3% records without their image, 6% text-only
    uv run python -m tools.bench --data instruct --max_text_tokens 1024   # multi-turn, long-tailed (make_instruct_like)
    uv run python -m tools.bench --pixel_unshuffle 1         # 196 image tokens
    uv run python -m tools.bench --phase lora                # adapters on every LM linear layer
    uv run python -m tools.bench --records 595375 --max_steps 20     # start-up at CC3M's size (start_s)
    torchrun --standalone --nproc_per_node 2 -m tools.bench  # data parallel
    uv run python -m tools.bench --size clip-l-336+phi-3-mini --phase lora --batch_size 16 --gradient_checkpointing true
Any VLMConfig flag works (--batch_size, --compile false, ...). `--size` picks the backbones' shapes (SHAPES);
`--size tiny` runs the same path on tiny backbones (the CPU test does that). `--profile_at N` profiles 8 steps
from step N; `--records N` makes the data set N records (CC3M-595K's
count is CC3M_EPOCH; a second run reads the records' lengths the first kept, data/length_cache.py). `bash
tools/bench_all.sh` runs the README's tables (captioning: tools/bench_generate.py).
"""
import gc
import io
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.optim.optimizer import register_optimizer_step_post_hook

from training import loop
from models.config import VLMConfig, parse_overrides
from models.tiny import build_lm, build_vision
from models.vlm import VLM
from training import checkpoint
from training.distributed import pick_device, setup_distributed

CC3M_EPOCH = 595_375  # records in LLaVA-CC3M-Pretrain-595K
WORDS = ("a man woman dog cat car tree house city street beach sunset people group young old red blue green "
         "white black sitting standing walking on in with at the of near water mountain field road table food "
         "portrait view background illustration vector cartoon person holding playing during event").split()
INSTRUCTIONS = ("Provide a brief description of the given image.", "Write a terse but informative summary of "
                "the picture.", "Share a concise interpretation of the image provided.", "Describe the image concisely.")


def cc3m_like_jpeg(rng, width, height):
    """Smooth noise with some edges: compresses to about 11 KB at 300x250, like CC3M's JPEGs."""
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC).filter(ImageFilter.DETAIL)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=70)
    return buf.getvalue()


def make_cc3m_like(out_dir, n, distinct=256, seed=0):
    """chat.json + images.zip with n records in LLaVA format; `distinct` image payloads are reused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng, pyrng = np.random.default_rng(seed), random.Random(seed)
    jpegs = [cc3m_like_jpeg(rng, pyrng.randint(250, 400), pyrng.randint(200, 350)) for _ in range(distinct)]
    records = []
    with zipfile.ZipFile(out_dir / "images.zip", "w") as zf:
        for i in range(n):
            name = f"GCC_train_{i:09d}.jpg"
            zf.writestr(name, jpegs[i % distinct])
            caption = " ".join(pyrng.choice(WORDS) for _ in range(pyrng.randint(6, 16))) + " ."
            user = pyrng.choice(INSTRUCTIONS)
            user = f"{user}\n<image>" if pyrng.random() < 0.5 else f"<image>\n{user}"
            records.append({"id": name[:-4], "image": name, "conversations": [
                {"from": "human", "value": user}, {"from": "gpt", "value": caption}]})
    (out_dir / "chat.json").write_text(json.dumps(records))
    return [r["conversations"][1]["value"] for r in records[:2000]] + list(INSTRUCTIONS)


def make_dirty(out_dir, n, seed=0):
    """The CC3M-like set as users' copies look: 3% of the records name an image the zip does not hold, 6% are
    text-only (no image key, no <image> in the prompt)."""
    corpus = make_cc3m_like(out_dir, n, seed=seed)
    records, rng = json.loads((out_dir / "chat.json").read_text()), random.Random(seed + 1)
    for r in records:
        u = rng.random()
        if u < 0.03:
            r["image"] = "missing_" + r["image"]
        elif u < 0.09:
            del r["image"]
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "").strip()
    (out_dir / "chat.json").write_text(json.dumps(records))
    return corpus


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def make_instruct_like(out_dir, n, seed=0):
    """An instruction set shaped like LLaVA-1.5's mix665k, over the CC3M-like images: 40% VQA-style records of 1-10
    question/answer turns with 1-3 word answers (VQAv2, GQA), 54% conversations of 1-4 turns whose answers have
    log-normal lengths (median 60 words, sigma 0.7, at most 400: LLaVA-Instruct's detailed descriptions and
    reasoning), and 6% text-only chats with longer answers (median 120 words, at most 700: ShareGPT). Lengths are
    long-tailed: from a few dozen tokens to over a thousand (bench.py prints the percentiles it made)."""
    corpus = make_cc3m_like(out_dir, n, seed=seed)
    records, rng = json.loads((out_dir / "chat.json").read_text()), random.Random(seed + 2)

    def lognormal_words(median, most):
        return min(most, round(median * math.exp(rng.gauss(0, 0.7))))
    for r in records:
        u = rng.random()
        if u < 0.40:
            turns = [(words(rng, rng.randint(4, 12)) + "?", words(rng, rng.randint(1, 3))) for _ in range(rng.randint(1, 10))]
        elif u < 0.94:
            turns = [(words(rng, rng.randint(6, 20)) + "?", words(rng, lognormal_words(60, 400)) + " .")
                     for _ in range(rng.randint(1, 4))]
        else:
            del r["image"]
            turns = [(words(rng, rng.randint(8, 30)) + "?", words(rng, lognormal_words(120, 700)) + " .")
                     for _ in range(rng.randint(1, 3))]
        r["conversations"] = [t for q, a in turns for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        if "image" in r:
            r["conversations"][0]["value"] = "<image>\n" + r["conversations"][0]["value"]
    (out_dir / "chat.json").write_text(json.dumps(records))
    return corpus


DATA = {"clean": make_cc3m_like, "dirty": make_dirty, "instruct": make_instruct_like}


def pop_flag(argv, flag, default):
    """(argv without `flag VALUE`, VALUE or default): bench's own flags, beside VLMConfig's."""
    if flag not in argv:
        return argv, default
    at = argv.index(flag)
    return argv[:at] + argv[at + 2:], argv[at + 1]


# --size: (vision family, vision size, LM family, LM size) of models.tiny; "base" is the default backbones' shapes
SHAPES = {"tiny": ("siglip", "tiny", "llama", "tiny"), "base": ("siglip", "base", "llama", "base"),
          "clip-l-336+phi-2": ("clip", "clip-l-336", "phi", "phi-2"),
          "clip-l-336+phi-3-mini": ("clip", "clip-l-336", "phi3", "phi-3-mini")}


def records_of(size):
    """The synthetic data set's records for --size (--records sets another count)."""
    return {"tiny": 400, "base": 20_000}.get(size, 2_000)


def prepare(root, size, n_records, data="clean"):
    """The backbones (their tokenizer trained on the clean set's text) and the `data` variant, made once each."""
    if not (root / "lm" / "config.json").is_file():
        vision_family, vision_size, lm_family, lm_size = SHAPES[size]
        corpus = make_cc3m_like(root / "data", records_of(size))
        torch.manual_seed(0)
        build_vision(root / "vision", vision_family, vision_size)
        build_lm(root / "lm", corpus, lm_family, size=lm_size)
    folder = root / ("data" if data == "clean" else f"data-{data}")
    if n_records != records_of(size):
        folder = folder.with_name(f"{folder.name}-{n_records}")
    if not (folder / "chat.json").is_file():
        DATA[data](folder, n_records)
    return str(folder), str(root / "vision"), str(root / "lm")


def bench_config(argv):
    """Bench defaults (full-size backbones, 40 steps, no evaluation), then the user's flags."""
    argv, size = pop_flag(argv, "--size", "base")
    argv, data = pop_flag(argv, "--data", "clean")
    argv, records = pop_flag(argv, "--records", None)
    root = Path("checkpoints/bench") / size
    cfg = parse_overrides(argv, VLMConfig(grad_accum=1, max_steps=40, log_every=10, val_size=256,
                                          eval_every=10**9, eval_captions=0, metric_records=0, save_every=10**9,
                                          resume=False,
                                          num_workers=min(16, torch.multiprocessing.cpu_count())))
    data_dir, vision, lm = prepare(root, size, int(records or records_of(size)), data)
    tag = f"{cfg.phase}-{data}-u{cfg.pixel_unshuffle}-t{cfg.batch_tokens}" + ("-compiled" if cfg.compile else "")
    cfg = VLMConfig.from_dict({**cfg.to_dict(), "data_dir": data_dir, "vision_model": vision, "lm_model": lm,
                               "out_dir": str(root / "runs" / tag)})
    if os.environ.get("RANK", "0") == "0":  # the bench's own scratch run: each measurement starts from nothing
        shutil.rmtree(cfg.out_dir, ignore_errors=True)
    if cfg.phase != "projector" and not cfg.init_from:  # a (random) projector checkpoint to start from
        cfg.init_from = str(root / "projector-init")
        checkpoint.save_model(VLM.from_config(VLMConfig.from_dict({**cfg.to_dict(), "phase": "projector", "init_from": ""})),
                              cfg.init_from)
    return cfg


def seconds_since_process_start():
    """Wall seconds since this process began (Linux), so a cold start counts the imports too."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")


class StepClock:
    """GPU time of every optimizer step, from CUDA events recorded after each (the loop never waits for them), and
    the host's time from one to the next; the seconds from process start to the first step done (one wait, at that
    step); and by step what else the host did that can stall one: the garbage collector's full collections, and
    torch.compile's work (graphs compiled, CUDA graphs recorded, through torch._dynamo's compilation callbacks)."""

    def __init__(self):
        self.events, self.host_s, self.start_s = [], [], None
        self.full_gc_ms, self.gc_t0, self.compile_work = {}, 0.0, {}
        self.hook = register_optimizer_step_post_hook(self.tick)
        gc.callbacks.append(self.on_gc)
        torch._dynamo.callback_handler.register_start_callback(self.on_compile)

    def on_compile(self, args):
        work = self.compile_work.setdefault(len(self.events) + 1, {})  # in the step after the len(events) done
        kind = args.callback_trigger.name.lower()  # dynamo (a graph compiled), cudagraph_recording, lazy_backward
        work[kind] = work.get(kind, 0) + 1

    def on_gc(self, phase, info):
        if info["generation"] == 2 and phase == "start":
            self.gc_t0 = time.perf_counter()
        elif info["generation"] == 2:  # in the step after the len(events) done
            step = len(self.events) + 1
            self.full_gc_ms[step] = self.full_gc_ms.get(step, 0) + round(1000 * (time.perf_counter() - self.gc_t0))

    def tick(self, optimizer, args, kwargs):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)
        self.host_s.append(time.perf_counter())
        if self.start_s is None:
            event.synchronize()
            self.start_s = seconds_since_process_start()

    def summary(self, warmup=20, profiled=()):
        """step_verdict over the run's steps (step i + 2 is events[i] to events[i + 1]), with the start-up time."""
        torch.cuda.synchronize()
        gpu_ms = {i: a.elapsed_time(b) for i, (a, b) in enumerate(zip(self.events, self.events[1:]), start=2)}
        host_ms = {i: 1000 * (b - a) for i, (a, b) in enumerate(zip(self.host_s, self.host_s[1:]), start=2)}
        return {"start_s": self.start_s, **step_verdict(gpu_ms, host_ms, self.compile_work, self.full_gc_ms, warmup,
                                                        profiled)}


def step_verdict(gpu_ms, host_ms, compile_work, full_gc_ms, warmup=20, profiled=()):
    """Median and slowest step ({step: ms} on the GPU) after `warmup` steps (half the run if shorter), which took
    over 2x the median, and what each of those met: compile work, a full collection, and the host's time for it
    (host_ms near the step's own: the host stalled, not the GPU). `profiled`: the steps the profiler ran over (it
    slows them), left out."""
    warmup = min(warmup, len(gpu_ms) // 2)
    ms = {step: m for step, m in gpu_ms.items() if step > warmup + 1 and step not in profiled}
    median = statistics.median(ms.values())
    slow = {step: round(m) for step, m in ms.items() if m > 2 * median}
    causes = {step: {**compile_work.get(step, {}), **({"full_gc_ms": full_gc_ms[step]} if step in full_gc_ms else {}),
                     "host_ms": round(host_ms[step])} for step in slow}
    return {"step_ms_median": median, "step_ms_max": max(ms.values()), "steps_over_2x_median": len(slow),
            "slow_steps_ms": slow, "steps_timed": len(ms), "full_gc_ms": full_gc_ms,
            "compile_work_after_warmup": {s: w for s, w in compile_work.items() if s > warmup + 1},
            "slow_step_causes": causes}


class StepProfiler:
    """torch.profiler over `n` optimizer steps starting at step `start`; prints the top GPU kernels and how busy
    the GPU was: a GPU busy far less than the step time means the host (kernel launches) bounds the step."""

    def __init__(self, start=100, n=8):
        self.start, self.n, self.step, self.prof = start, n, 0, None
        self.slowed = range(start + 1, start + n + 2)  # the steps it runs over (StepClock's numbering)
        self.hook = register_optimizer_step_post_hook(self.tick)

    def tick(self, optimizer, args, kwargs):
        self.step += 1
        if self.step == self.start:
            torch.cuda.synchronize()
            self.prof, self.t0 = torch.profiler.profile(), time.perf_counter()
            self.prof.__enter__()
        elif self.step == self.start + self.n:
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - self.t0) * 1000 / self.n
            prof, self.prof = self.prof, None  # not kept: its records would lengthen every later full collection
            prof.__exit__(None, None, None)
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_ms = sum(e.self_device_time_total for e in kernels) / 1000 / self.n
            print(events.table(sort_by="self_device_time_total", row_limit=15))
            print(f"PROFILE step {wall_ms:.1f} ms wall, GPU busy {gpu_ms:.1f} ms ({gpu_ms / wall_ms:.0%})")


def summarize(cfg, result, world):
    """Median over the log intervals after the first (which holds start-up and compilation)."""
    stats = result["stats"]
    steady = stats[1:] or stats
    med = {k: statistics.median(s[k] for s in steady) for k in ("samples_per_s", "tokens_per_s", "fill", "data_wait")}
    mfu = [s["mfu"] for s in steady if s["mfu"] is not None]
    mem = max((s["peak_mem_gb"] or 0) for s in stats)
    device = torch.cuda.get_device_name() if pick_device(cfg.device).type == "cuda" else "cpu"
    return {"phase": cfg.phase, "data": Path(cfg.data_dir).name, "image_tokens": result["model"].n_image_tokens,
            "gpus": world, "device": device, "step_tokens": cfg.batch_tokens * cfg.grad_accum * world,
            "compile": cfg.compile, "compiled_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"], **med, "mfu": statistics.median(mfu) if mfu else None, "peak_mem_gb": mem,
            "epoch_minutes": CC3M_EPOCH / med["samples_per_s"] / 60,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__}


if __name__ == "__main__":
    argv, profile_at = pop_flag(sys.argv[1:], "--profile_at", "0")
    cfg = bench_config(argv)
    clock = StepClock() if pick_device(cfg.device).type == "cuda" else None
    profiler = StepProfiler(int(profile_at)) if clock and int(profile_at) else None
    result = loop.train(cfg)
    rank, world, _ = setup_distributed(cfg)
    if rank == 0:
        steps = clock.summary(profiled=profiler.slowed if profiler else ()) if clock else {}
        print("BENCH " + json.dumps({**summarize(cfg, result, world), **steps}))
