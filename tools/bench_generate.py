"""Benchmark captioning: VLM.generate (models/decode.py, as generate.py, eval.py and the page run it) on a batch of
random images, beside transformers' own generate (the eager path it replaced), and eval.py on a 5,000-record split.

    uv run python -m tools.bench_generate                                   # SigLIP-B/16 + SmolLM2-135M shapes
    uv run python -m tools.bench_generate --lm "$(uv run python -m models.smollm2)"   # the real SmolLM2 weights
    uv run python -m tools.bench_generate --batch 64 --new_tokens 32 --eval_records 0
    uv run python -m tools.bench_generate --phase lora --eval_records 0    # any VLMConfig flag: adapters on the LM
    uv run python -m tools.bench_generate --profile true     # also the eager step under the profiler (GPU)

Every row decodes exactly --new_tokens tokens (end-of-text and end-of-turn are banned). Prints one GENERATE line
(JSON): `cold_s`, the first batch in a fresh process (the decoder's cache made and its step recorded as a CUDA
graph); `captions_per_s`, the median of 5 batches after it; `prefill_ms` (vision tower, projector and prompt: a
batch that decodes one token), of which `embed_ms` is the vision tower and projector, and `token_ms` (each further
token); `transformers_captions_per_s`, transformers' generate on the same batch, and `identical`, the share of
captions both decode alike (bf16 on the GPU: equal logits up to rounding, so a near tie may go either way; fp32 on
the CPU: all). With --eval_records N, eval.py then
scores N records of the bench's CC3M-like data with a checkpoint of this model (`eval_captions_per_s`: its whole
run, loading included). `--size tiny` runs it all on tiny backbones (the CPU test does).
"""
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

import eval as evaluation
from models.config import VLMConfig, parse_overrides
from models.decode import left_pad
from models.prompt import DEFAULT_PROMPT, encode_prompt
from models.vlm import VLM, autocast
from tools.bench import pop_flag, prepare
from training import checkpoint
from training.distributed import pick_device

RECORDS = {"tiny": 400, "base": 20_000}  # the bench's data set sizes (tools/bench.py)


def transformers_generate(model, prompts, pixel_values, max_new_tokens, stop_ids):
    """Greedy decoding by transformers' generate (a dynamic cache, its own masks and positions), from the same
    embeddings: the new tokens [B, n]. The oracle of tests/test_decode.py."""
    ids, mask = (t.to(pixel_values.device) for t in left_pad(prompts, model.tokenizer.pad_token_id))
    model.lm.set_attn_implementation("sdpa")
    with torch.no_grad(), autocast(ids.device), torch.compiler.set_stance("force_eager"):
        return model.lm.generate(inputs_embeds=model.embed(ids, pixel_values), attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                 pad_token_id=model.tokenizer.pad_token_id)


def timed(fn, device):
    """(seconds, result) of fn(), the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def ban_stops(model):
    """Every row decodes max_new_tokens: the LM head never picks a stop token."""
    stops = torch.tensor([model.end_of_turn_id, model.tokenizer.eos_token_id], device=model.lm.device)
    return model.lm.get_output_embeddings().register_forward_hook(lambda m, a, out: out.index_fill(-1, stops, -1e4))


def generation_speed(model, batch, new_tokens, device):
    pixels = torch.randint(0, 256, (batch, *model.vision.pixel_shape), dtype=torch.uint8, device=device)
    cold, _ = timed(lambda: model.generate(pixels, max_new_tokens=new_tokens), device)
    warm = [timed(lambda: model.generate(pixels, max_new_tokens=new_tokens), device)[0] for _ in range(5)]
    prompts = [encode_prompt(model.tokenizer, DEFAULT_PROMPT, model.n_image_tokens)] * batch
    ids = left_pad(prompts, model.tokenizer.pad_token_id)[0].to(device)
    with torch.no_grad(), autocast(device):
        embed = statistics.median(timed(lambda: model.embed(ids, pixels), device)[0] for _ in range(3))
    model.generate(pixels, max_new_tokens=1)  # its own decoder: recorded before timing
    prefill = statistics.median(timed(lambda: model.generate(pixels, max_new_tokens=1), device)[0] for _ in range(3))
    ours = model.generate(pixels, max_new_tokens=new_tokens)
    theirs = partial(transformers_generate, model, prompts, pixels, new_tokens, [model.end_of_turn_id])
    theirs()  # warm-up
    hf_s, tokens = min((timed(theirs, device) for _ in range(3)), key=lambda r: r[0])
    hf = [t.strip() for t in model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
    return {"batch": batch, "new_tokens": new_tokens, "cold_s": round(cold, 3),
            "captions_per_s": round(batch / statistics.median(warm), 1), "prefill_ms": round(prefill * 1000, 2),
            "embed_ms": round(embed * 1000, 2),
            "token_ms": round((statistics.median(warm) - prefill) * 1000 / (new_tokens - 1), 3),
            "transformers_captions_per_s": round(batch / hf_s, 1),
            "identical": sum(a == b for a, b in zip(ours, hf)) / batch}


def profile_step(model, batch, new_tokens, device):
    """What one decoded token costs the GPU: the step run eagerly on the same decoder (its graph set aside) under
    the profiler, per token: kernels launched, the GPU's busy time, the wall time; and the busiest kernels."""
    pixels = torch.randint(0, 256, (batch, *model.vision.pixel_shape), dtype=torch.uint8, device=device)
    model.generate(pixels, max_new_tokens=new_tokens)
    graph, model.decoder.graph = model.decoder.graph, None
    eager, _ = timed(lambda: model.generate(pixels, max_new_tokens=new_tokens), device)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        model.generate(pixels, max_new_tokens=new_tokens)
        torch.cuda.synchronize()
    model.decoder.graph = graph
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))
    return {"eager_captions_per_s": round(batch / eager, 1),
            "profiled_kernels_per_token": round(sum(e.count for e in kernels) / new_tokens),
            "profiled_gpu_ms_per_token": round(sum(e.self_device_time_total for e in kernels) / 1000 / new_tokens, 3)}


def eval_speed(model, data_dir, records, batch, root):
    """eval.py as a user runs it, on a checkpoint of `model`: its whole run, loading and scoring included."""
    path = root / "eval-checkpoint"
    checkpoint.save_model(model, path)
    for old in path.glob("eval_*.json"):  # the last bench's result: eval.py never overwrites one
        old.unlink()
    seconds, _ = timed(lambda: evaluation.main(["--checkpoint", str(path), "--data_dir", data_dir, "--split", "all",
                                                "--limit", str(records), "--batch_size", str(batch)]),
                       model.lm.device)
    return {"eval_records": records, "eval_s": round(seconds, 1), "eval_captions_per_s": round(records / seconds, 1)}


def main(argv):
    argv, size = pop_flag(argv, "--size", "base")
    argv, lm = pop_flag(argv, "--lm", "")
    argv, batch = pop_flag(argv, "--batch", "256")
    argv, new_tokens = pop_flag(argv, "--new_tokens", "32")
    argv, eval_records = pop_flag(argv, "--eval_records", "5000")
    argv, profile = pop_flag(argv, "--profile", "false")
    root = Path("checkpoints/bench") / size
    data_dir, vision, random_lm = prepare(root, size, RECORDS.get(size, 2_000))
    device = pick_device("auto")
    torch.manual_seed(0)
    cfg = parse_overrides(argv, VLMConfig(vision_model=vision, lm_model=lm or random_lm, device=device.type))
    model = VLM.from_config(cfg)
    torch.nn.init.normal_(model.projector.down.weight, std=0.02)  # a random projector: captions depend on the image
    model.place(device)
    ban = ban_stops(model)
    result = generation_speed(model, int(batch), int(new_tokens), device)
    if profile == "true" and device.type == "cuda":
        result.update(profile_step(model, int(batch), int(new_tokens), device))
    ban.remove()
    if int(eval_records):
        result.update(eval_speed(model, data_dir, int(eval_records), int(batch), root))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print("GENERATE " + json.dumps({"device": gpu, "lm": lm or f"random {size}", "phase": cfg.phase,
                                    "image_tokens": model.n_image_tokens, **result, "torch": torch.__version__,
                                    "transformers": __import__("transformers").__version__}))


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(__doc__)
    else:
        main(sys.argv[1:])
