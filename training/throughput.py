"""Throughput accounting: samples/s, tokens/s (the samples' own, not padding), fill (their share of the packed
rows), data wait, and MFU from FLOPs written out per step."""
import time

import torch

from models.lora import LoRALinear
from models.vision import encoder_layers

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per GPU


def matmul_params(module):
    """Weights that multiply activations (linear and conv layers), LoRA adapters counted apart."""
    dense = sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in module.modules() if isinstance(m, LoRALinear))
    return dense, lora


def flop_counter(model):
    """Returns flops(lengths, n_label_tokens, n_images): model FLOPs of one training step (a multiply-add is 2 FLOPs),
    written out so it can be checked. The parameter counts are taken once, here.

    vision (frozen, forward only):      2 * P_v * N  + 4 * L_v * N^2 * D_v          per image and tower
    projector (trained; its input       4 * P_in * n_img + 6 * P_rest * n_img         per image
        needs no gradient):               (P_in: the layers reading the features, e.g. SwiGLU's gate and up)
    LM (frozen: forward, plus backward  4 * P_lm * T + 12 * L * T^2 * D            per sample of T tokens
        to the activations only):       + 6 * P_lora * T  (adapters get weight gradients too)
    LM head (label positions only):     4 * V * D                                   per label token
    The full phase trains the LM and its head: their weight gradients add 2 * P_lm * T and 2 * V * D.
    """
    lm, n_patches = model.lm.config, model.vision.n_patches  # class/register tokens left out: a rounding error
    p_vision, _ = matmul_params(model.vision)
    attention = sum(len(encoder_layers(t)) * t.config.hidden_size for t in model.vision.towers)  # layers as cut
    p_in = sum(matmul_params(layer)[0] for layer in model.projector.input_layers())
    p_rest = matmul_params(model.projector)[0] - p_in
    p_lm, p_lora = matmul_params(model.lm.base_model)
    per_image = 2 * p_vision * n_patches + 4 * attention * n_patches ** 2 \
        + (4 * p_in + 6 * p_rest) * model.n_image_tokens
    passes = 6 if model.cfg.phase == "full" else 4  # forward, gradient to the activations, (to the weights)
    per_token, per_token_pair = passes * p_lm + 6 * p_lora, 12 * lm.num_hidden_layers * lm.hidden_size
    per_label = passes * lm.vocab_size * lm.hidden_size

    def flops(lengths, n_label_tokens, n_images):  # text-only samples have no image
        return sum(per_token * T + per_token_pair * T * T for T in lengths) + per_image * n_images \
            + per_label * n_label_tokens
    return flops


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Meter:
    """Work done between two log lines, on host clocks and CPU-side counts: it never waits for the GPU."""

    def __init__(self, model, device, world):
        self.device, self.world, self.peak = device, world, peak_flops(device)
        self.flops_of = flop_counter(model)
        self.reset()

    def reset(self):
        self.t0, self.steps, self.samples, self.tokens, self.flops, self.data_wait = time.perf_counter(), 0, 0, 0, 0, 0.0
        self.room = 0  # the packed rows' tokens, padding included

    def add(self, batches, data_wait):
        """One optimizer step over `batches` (its micro-batches, as the collator made them)."""
        lengths = [n for b in batches for n in b["lengths"]]  # the samples', not the padding's: the useful work
        self.steps, self.samples, self.tokens = self.steps + 1, self.samples + len(lengths), self.tokens + sum(lengths)
        self.room += sum(b["input_ids"].numel() for b in batches)
        n_images = sum(b["n_images"] for b in batches)
        self.flops += self.flops_of(lengths, sum(b["n_label_tokens"] for b in batches), n_images)
        self.data_wait += data_wait

    def read(self):
        """Rates since the last read (the caller has just synced the device, so the clock is honest)."""
        dt, w = time.perf_counter() - self.t0, self.world  # every rank did the same amount of work
        stats = {"dt_ms": 1000 * dt / self.steps, "samples_per_s": w * self.samples / dt,
                 "tokens_per_s": w * self.tokens / dt, "fill": self.tokens / max(self.room, 1),
                 "data_wait": self.data_wait / dt,
                 "mfu": self.flops / dt / self.peak if self.peak else None,
                 "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None}
        self.reset()
        return stats
