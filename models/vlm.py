"""The joined model: SigLIP (frozen) -> SwiGLU projector -> causal LM (frozen, or LoRA in phase 2)."""
import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

from models.config import ConfigError, VLMConfig, resolve_checkpoint
from models.lora import apply_lora, linear_names
from models.projector import Projector
from models.prompt import DEFAULT_PROMPT, IGNORE, add_image_token, encode_prompt

WEIGHTS = "trainable.safetensors"


class HubError(OSError):
    """A backbone could not be loaded (offline, wrong id or path); the message names the way out."""


def _from_hub(loader, name, **kw):
    try:
        return loader.from_pretrained(name, **kw)
    except OSError as e:
        raise HubError(f"could not load '{name}' ({type(e).__name__}). Without access to the Hugging Face "
                      "Hub, point the config at a local copy, or try the offline demo: "
                      "`uv run python main.py --demo`") from e


def vision_config(vision_model):
    c = _from_hub(AutoConfig, vision_model)
    return getattr(c, "vision_config", c)  # a full SigLIP checkpoint nests the vision tower's config


def vision_grid(vision_model):
    """Patches per side of the vision encoder, read from its (cheap) config."""
    c = vision_config(vision_model)
    return c.image_size // c.patch_size


def n_image_tokens(cfg: VLMConfig):
    grid = vision_grid(cfg.vision_model)
    if grid % cfg.pixel_unshuffle:
        raise ConfigError(f"config field 'pixel_unshuffle' = {cfg.pixel_unshuffle}: must divide the "
                          f"{grid}x{grid} patch grid of {cfg.vision_model} (valid: "
                          f"{[f for f in range(1, grid + 1) if grid % f == 0]})")
    return (grid // cfg.pixel_unshuffle) ** 2


def _check_targets(field, targets, model):
    missing = sorted(set(targets) - set(linear_names(model)))
    if missing:
        raise ConfigError(f"config field '{field}': {missing} match no linear layer of "
                          f"{type(model).__name__}; valid names: {linear_names(model)}")


def preflight(cfg: VLMConfig):
    """Checks that need the backbones' shapes but not their weights, so they fail before anything loads:
    the unshuffle factor against the patch grid, and the LoRA targets against weightless (meta) models."""
    n_image_tokens(cfg)
    if cfg.phase != "lora":
        return
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(_from_hub(AutoConfig, cfg.lm_model))
        _check_targets("lora_targets", cfg.lora_targets, lm)
        if cfg.lora_vision:
            _check_targets("lora_vision_targets", cfg.lora_vision_targets,
                           SiglipVisionModel(vision_config(cfg.vision_model)))


def load_backbones(cfg: VLMConfig):
    vision = _from_hub(SiglipVisionModel, cfg.vision_model)
    processor = _from_hub(AutoImageProcessor, cfg.vision_model)
    lm = _from_hub(AutoModelForCausalLM, cfg.lm_model)
    tokenizer = _from_hub(AutoTokenizer, cfg.lm_model)
    return vision, processor, lm, tokenizer


def truncate_vision(vision, layer):
    """Keep only the encoder layers up to `layer` (LLaVA-style feature layer) and drop the pooling head."""
    tower = getattr(vision, "vision_model", vision)  # transformers 4.x wraps the tower, 5.x does not
    tower.use_head = False
    if hasattr(tower, "head"):
        del tower.head
    if layer != -1:  # -1 = final output after post_layernorm; else the raw output of that layer
        n = len(tower.encoder.layers)
        tower.encoder.layers = tower.encoder.layers[: layer % (n + 1)]
        tower.post_layernorm = nn.Identity()
    return vision


def image_pixels(processor, images):
    """PIL images -> uint8 [B, 3, H, W], resized as the checkpoint's processor does. Rescaling and normalising
    happen on the device (VLM.encode_images): data workers then ship a quarter of the bytes and skip the
    float work, and training and generation cannot disagree about it."""
    pixels = processor(images=images, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
    return pixels.to(torch.uint8)


def pixel_normalization(processor):
    """(scale, shift) with scale * pixel - shift == the processor's (pixel * rescale_factor - mean) / std."""
    rescale = processor.rescale_factor if processor.do_rescale else 1.0
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else (0.0, 1.0)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))  # [3, 1, 1]
    return rescale / std, mean / std


@dataclass
class VLMOutput:
    loss: torch.Tensor = None      # mean over label tokens
    loss_sum: torch.Tensor = None  # sum over label tokens (exact gradient accumulation divides it later)
    n_tokens: torch.Tensor = None
    logits: torch.Tensor = None


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig, vision, processor, lm, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.vision = truncate_vision(vision, cfg.vision_feature_layer)
        self.lm = lm
        self.processor, self.tokenizer = processor, tokenizer
        self.image_token_id = add_image_token(tokenizer)  # never embedded: its positions get image features
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
        return cls(cfg, *load_backbones(cfg))

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

    # --- forward ---
    def normalize(self, pixel_values):                         # [B, 3, H, W] uint8 -> float32
        """Rescale and normalise on the device, as the checkpoint's image processor would."""
        if pixel_values.dtype != torch.uint8:
            raise TypeError(f"pixel_values must be uint8 images from models.vlm.image_pixels, got {pixel_values.dtype}")
        return pixel_values.float() * self.pixel_scale - self.pixel_shift

    def encode_images(self, pixel_values):                      # [B, 3, H, W] uint8
        pixels = self.normalize(pixel_values).to(self.vision.dtype)
        with torch.set_grad_enabled(self.cfg.lora_vision and torch.is_grad_enabled()):
            feats = self.vision(pixel_values=pixels).last_hidden_state  # [B, N, Dv]
        return self.projector(feats)                            # [B, n_image_tokens, D]

    def embed(self, input_ids, pixel_values):
        is_image = input_ids == self.image_token_id             # [B, T]
        if not torch.compiler.is_compiling():  # the data path guarantees this; check it where it is cheap
            counts = is_image.sum(1)
            if not bool((counts == self.n_image_tokens).all()):
                raise ValueError(f"each sample must hold exactly {self.n_image_tokens} image positions "
                                 f"(what the projector emits); got {counts.tolist()}. Build inputs with "
                                 "models.prompt.encode")
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(is_image, 0))  # [B, T, D]
        image = self.encode_images(pixel_values).to(embeds.dtype)  # [B, n_image_tokens, D]
        return embeds.masked_scatter(is_image.unsqueeze(-1), image)

    def forward(self, input_ids, pixel_values, attention_mask=None, labels=None):
        embeds = self.embed(input_ids, pixel_values)
        hidden = self.lm.base_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                    use_cache=False).last_hidden_state  # [B, T, D]
        head = self.lm.get_output_embeddings()
        if labels is None:
            return VLMOutput(logits=head(hidden))
        # Only positions that predict a label go through the LM head (the vocab is the costly part).
        targets = labels[:, 1:]                                  # [B, T-1]
        keep = targets != IGNORE
        logits = head(hidden[:, :-1][keep])                      # [n, V]
        loss_sum = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        n = keep.sum()
        return VLMOutput(loss=loss_sum / n.clamp(min=1), loss_sum=loss_sum, n_tokens=n)

    @torch.no_grad()
    def generate(self, pixel_values, prompt=DEFAULT_PROMPT, max_new_tokens=32, temperature=0.0, top_p=1.0,
                 use_cache=True):
        """Caption a batch of uint8 images [B, 3, H, W] (image_pixels): the vision tower runs once per image,
        then the LM decodes with its KV cache; each sequence stops at its own end-of-turn token."""
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
                    top_p=top_p if temperature > 0 else None, use_cache=use_cache,
                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        finally:
            self.train(was_training)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # --- checkpoints: the config plus the trainable weights only ---
    def trainable_state_dict(self):
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().float().cpu().contiguous() for n, t in self.state_dict().items() if n in names}

    def save(self, path):
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.cfg.save(path / "config.json")
        save_file(self.trainable_state_dict(), str(path / WEIGHTS))

    def load_trainable(self, path, only=None):
        """Load weights from a checkpoint dir; `only` restricts to names with that prefix (e.g. 'projector.')."""
        state = load_file(str(Path(path) / WEIGHTS))
        if only:
            state = {k: v for k, v in state.items() if k.startswith(only)}
        expected = {n: p.shape for n, p in self.named_parameters()
                    if p.requires_grad and (not only or n.startswith(only))}
        missing, unexpected = set(expected) - set(state), set(state) - set(expected)
        misshaped = [n for n in set(expected) & set(state) if state[n].shape != expected[n]]
        if missing or unexpected or misshaped:  # checked before anything is copied
            raise ValueError(f"checkpoint {path} does not fit this model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}, other shape {sorted(misshaped)[:5]}")
        for name, p in self.named_parameters():
            if name in state:
                p.data.copy_(state[name].to(p.dtype))
        return self

    @classmethod
    def from_checkpoint(cls, path):
        path = resolve_checkpoint(path)
        cfg = VLMConfig.load(path / "config.json")
        for name in ("vision_model", "lm_model"):  # an exported checkpoint names its backbones relative to itself
            if (path / getattr(cfg, name)).is_dir():
                setattr(cfg, name, str(path / getattr(cfg, name)))
        return cls.from_config(cfg).load_trainable(path)
