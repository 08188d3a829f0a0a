"""The vision tower: which one, how many patches it makes, cutting it at a feature layer, and its pixels.

Images leave the data workers as uint8 [3, H, W], resized as the tower's processor does; rescaling and
normalising happen on the device (`pixel_normalization`): workers ship a quarter of the bytes and skip the
float work, and training and generation cannot disagree about it.
"""
import torch
import torch.nn as nn
from transformers import AutoConfig, AutoImageProcessor, SiglipVisionModel

from models.config import ConfigError
from models.hub import from_hub


def vision_config(vision_model):
    c = from_hub(AutoConfig, vision_model)
    return getattr(c, "vision_config", c)  # a full SigLIP checkpoint nests the vision tower's config


def n_image_tokens(cfg):
    """Image tokens per sample: the patch grid (read from the cheap config), merged by pixel_unshuffle."""
    c = vision_config(cfg.vision_model)
    grid = c.image_size // c.patch_size
    if grid % cfg.pixel_unshuffle:
        raise ConfigError(f"config field 'pixel_unshuffle' = {cfg.pixel_unshuffle}: must divide the "
                          f"{grid}x{grid} patch grid of {cfg.vision_model} (valid: "
                          f"{[f for f in range(1, grid + 1) if grid % f == 0]})")
    return (grid // cfg.pixel_unshuffle) ** 2


def load_vision(cfg):
    """The tower, cut at cfg.vision_feature_layer, and its image processor."""
    tower = from_hub(SiglipVisionModel, cfg.vision_model)
    return truncate(tower, cfg.vision_feature_layer), from_hub(AutoImageProcessor, cfg.vision_model)


def truncate(vision, layer):
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
    """PIL images -> uint8 [B, 3, H, W], resized as the checkpoint's processor does (no rescale/normalise)."""
    pixels = processor(images=images, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
    return pixels.to(torch.uint8)


def pixel_normalization(processor):
    """(scale, shift) with scale * pixel - shift == the processor's (pixel * rescale_factor - mean) / std."""
    rescale = processor.rescale_factor if processor.do_rescale else 1.0
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else (0.0, 1.0)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))  # [3, 1, 1]
    return rescale / std, mean / std
