"""The joined model: SigLIP (frozen) -> SwiGLU projector -> causal LM (frozen, or LoRA in phase 2)."""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

from models.config import ConfigError, VLMConfig
from models.hub import from_hub
from models.lora import apply_lora, linear_names
from models.projector import Projector
from models.prompt import DEFAULT_PROMPT, add_image_token, encode_prompt, label_positions
from models.vision import load_vision, n_image_tokens, pixel_normalization, vision_config


def _check_targets(field, targets, model):
    missing = sorted(set(targets) - set(linear_names(model)))
    if missing:
        raise ConfigError(f"config field '{field}': {missing} match no linear layer of "
                          f"{type(model).__name__}; valid names: {linear_names(model)}")


def check_shapes(cfg: VLMConfig):
    """The config checks that need the backbones' shapes but not their weights, so they fail before anything
    loads: the unshuffle factor against the patch grid, the feature layer against the tower's depth, and
    the LoRA targets against weightless (meta) models."""
    n_image_tokens(cfg)
    depth = vision_config(cfg.vision_model).num_hidden_layers
    if not -depth <= cfg.vision_feature_layer <= depth or cfg.vision_feature_layer == 0:
        raise ConfigError(f"config field 'vision_feature_layer' = {cfg.vision_feature_layer}: {cfg.vision_model} "
                          f"has {depth} layers; use -1 (final output), -2 (penultimate), ... down to {-depth}, "
                          f"or 1 to {depth} counted from the input")
    if cfg.phase != "lora":
        return
    with torch.device("meta"):
        _check_targets("lora_targets", cfg.lora_targets,
                       AutoModelForCausalLM.from_config(from_hub(AutoConfig, cfg.lm_model)))
        if cfg.lora_vision:
            _check_targets("lora_vision_targets", cfg.lora_vision_targets,
                           SiglipVisionModel(vision_config(cfg.vision_model)))


@dataclass
class VLMOutput:
    loss: torch.Tensor = None      # mean over label tokens
    loss_sum: torch.Tensor = None  # sum over label tokens (exact gradient accumulation divides it later)
    n_tokens: int = None
    logits: torch.Tensor = None


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, vision, processor, lm, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vision = vision  # cut at cfg.vision_feature_layer (models.vision.truncate)
        self.lm = lm
        self.processor, self.tokenizer = processor, tokenizer
        self.image_token_id = add_image_token(tokenizer)  # never embedded: its positions get image features
        if tokenizer.pad_token is None:  # e.g. a GGUF conversion; padded positions are masked out of attention
            tokenizer.pad_token = tokenizer.eos_token  # and labels anyway, so any id will do
        self.n_image_tokens = n_image_tokens(cfg)
        vcfg = getattr(vision.config, "vision_config", vision.config)
        self.projector = Projector(vcfg.hidden_size, lm.config.hidden_size, cfg.projector_hidden_dim,
                                   cfg.pixel_unshuffle)
        scale, shift = pixel_normalization(processor)
        self.register_buffer("pixel_scale", scale, persistent=False)  # [3, 1, 1]
        self.register_buffer("pixel_shift", shift, persistent=False)
        self.vision.requires_grad_(False)
        self.lm.requires_grad_(False)
        if cfg.phase == "lora":
            apply_lora(self.lm, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
            if cfg.lora_vision:
                apply_lora(self.vision, cfg.lora_vision_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        self.train()

    @classmethod
    def from_config(cls, cfg: VLMConfig):
        """Loads the backbones named by the config (hub ids or local dirs) and builds a fresh projector."""
        vision, processor = load_vision(cfg)
        return cls(cfg, vision, processor, from_hub(AutoModelForCausalLM, cfg.lm_model),
                   from_hub(AutoTokenizer, cfg.lm_model))

    def train(self, mode=True):
        super().train(mode)
        if not self.cfg.lora_vision:  # frozen backbones always run in eval mode (no dropout)
            self.vision.eval()
        if self.cfg.phase == "projector":
            self.lm.eval()
        return self

    def cast_frozen(self, dtype):
        """Store the frozen backbone weights in `dtype` (bf16 on GPU); trainable weights stay fp32."""
        for p in self.parameters():
            if not p.requires_grad:
                p.data = p.data.to(dtype)
        return self

    def compile_blocks(self):
        """torch.compile each transformer layer, not the whole model. The layers of a tower share one compiled
        graph, so a cold start compiles a handful of graphs instead of one huge one, and dynamic shapes mean a
        new padded length never recompiles. On one H100 (bench.py, 300 steps): whole model 3.5 min to the first
        step and 14-140 s stalls to recompile, 1,955 samples/s between them; per layer 58 s cold, 31 s warm,
        no stall, 1,686 samples/s."""
        tower = getattr(self.vision, "vision_model", self.vision)
        for block in [*self.lm.base_model.layers, *tower.encoder.layers, self.projector]:
            block.compile(dynamic=True)

    # --- forward ---
    def normalize(self, pixel_values):                         # [B, 3, H, W] uint8 -> float32
        """Rescale and normalise on the device, as the checkpoint's image processor would."""
        if pixel_values.dtype != torch.uint8:
            raise TypeError(f"pixel_values must be uint8 images from models.vision.image_pixels, got {pixel_values.dtype}")
        return pixel_values.float() * self.pixel_scale - self.pixel_shift

    def encode_images(self, pixel_values):                      # [B, 3, H, W] uint8
        pixels = self.normalize(pixel_values).to(self.vision.dtype)
        with torch.set_grad_enabled(self.cfg.lora_vision and torch.is_grad_enabled()):
            feats = self.vision(pixel_values=pixels).last_hidden_state  # [B, N, Dv]
        return self.projector(feats)                            # [B, n_image_tokens, D]

    def embed(self, input_ids, pixel_values):
        is_image = input_ids == self.image_token_id             # [B, T]
        if not torch.compiler.is_compiling():  # the data path guarantees it; a hand-built batch may not
            self.check_image_positions(is_image)
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, T, D]
        image = self.encode_images(pixel_values).to(embeds.dtype)  # [B, n_image_tokens, D]
        return embeds.masked_scatter(is_image.unsqueeze(-1), image)

    def check_image_positions(self, is_image):
        counts = is_image.sum(1)
        if is_image.is_cuda:  # checked on the device: reading the counts would make the host wait for the GPU
            torch._assert_async((counts == self.n_image_tokens).all(), "a sample lacks image positions")
        elif not bool((counts == self.n_image_tokens).all()):
            raise ValueError(f"each sample must hold exactly {self.n_image_tokens} image positions (what the "
                             f"projector emits); got {counts.tolist()}. Build inputs with models.prompt.encode")

    def forward(self, input_ids, pixel_values, labels=None, label_index=None):
        """input_ids [B, T] are right-padded: causal attention never looks at the padding after a sample, so no
        attention mask is passed (which keeps SDPA on its fastest, causal-only kernels). label_index: the flat
        positions in [B * T] whose next token is trained (models.prompt.label_positions), from the collator."""
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.lm.base_model(inputs_embeds=embeds, use_cache=False).last_hidden_state  # [B, T, D]
        head = self.lm.get_output_embeddings()
        if labels is None:
            return VLMOutput(logits=head(hidden))
        # Only positions that predict a label go through the LM head (the vocab is the costly part), picked by
        # indices made on the CPU: a boolean mask would make the host wait for the GPU to count them.
        if label_index is None:
            label_index = label_positions(labels)
        logits = head(hidden.flatten(0, 1)[label_index])        # [n, V]
        targets = labels.flatten()[label_index + 1]              # [n]: the next token of each picked position
        loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
        n = len(label_index)
        return VLMOutput(loss=loss_sum / max(n, 1), loss_sum=loss_sum, n_tokens=n)

    @torch.no_grad()
    def generate(self, pixel_values, prompt=DEFAULT_PROMPT, max_new_tokens=32, temperature=0.0, top_p=1.0,
                 streamer=None):
        """Caption a batch of uint8 images [B, 3, H, W] (image_pixels): the vision tower runs once per image,
        then the LM decodes with its KV cache; each sequence stops at its own end-of-turn token. A transformers
        streamer (one image only) receives the tokens as they come, e.g. TextIteratorStreamer for app.py."""
        ids = torch.tensor([encode_prompt(self.tokenizer, prompt, self.n_image_tokens)] * len(pixel_values),
                           device=pixel_values.device)  # one prompt for all: no padding needed
        autocast = torch.autocast("cuda", torch.bfloat16) if ids.is_cuda else contextlib.nullcontext()
        was_training = self.training
        self.eval()
        try:
            with autocast:
                out = self.lm.generate(
                    inputs_embeds=self.embed(ids, pixel_values), attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=temperature or None,
                    top_p=top_p if temperature > 0 else None,
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                    streamer=streamer)
        finally:
            self.train(was_training)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def trainable_state_dict(self):
        """What a checkpoint holds: the projector and the adapters, fp32 on the CPU."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().float().cpu().contiguous() for n, t in self.state_dict().items() if n in names}
