"""The vision tower(s): which, how many patches they make, cutting them at a feature layer, and their pixels.

Any `transformers` vision tower loads by hub id or local dir: SigLIP, CLIP, DINOv2 (with or without registers),
a full checkpoint (which nests `vision_config`) or a vision-only one. `fused_vision_model` adds a second tower
whose patch features are joined channel-wise to the first's, as Prismatic fuses DINOv2 and SigLIP.

Images leave the data workers as uint8 [3, H, W], resized as the first tower's processor does; rescaling and
normalising happen on the device (`pixel_normalization`), each tower its own way: workers ship a quarter of the
bytes and skip the float work, and training and generation cannot disagree about it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers import AutoConfig, AutoImageProcessor
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from .config import ConfigError
from .hub import from_hub


def tower_names(cfg):
    return [name for name in (cfg.vision_model, cfg.fused_vision_model) if name]


def vision_config(vision_model):
    c = from_hub(AutoConfig, vision_model)
    return getattr(c, "vision_config", c)  # a full SigLIP/CLIP checkpoint nests the vision tower's config


def tower_class(config):
    """The transformers class a vision config builds: SiglipVisionModel, CLIPVisionModel, Dinov2Model, ..."""
    return MODEL_MAPPING[type(config)]


def encoder_layers(tower):
    return tower.encoder.layers if hasattr(tower.encoder, "layers") else tower.encoder.layer  # DINOv2: .layer


# ----------------------------------------------------------------------------- patch grid and image tokens
def processed_side(processor, name):
    """The side of the images `processor` really makes (CLIP's and DINOv2's resize, then crop to crop_size;
    SigLIP's resize to size), found by running it on a non-square image."""
    h, w = image_pixels(processor, [Image.new("RGB", (48, 64))]).shape[-2:]
    if h != w:
        raise ConfigError(f"the image processor of {name} makes {h}x{w} images from a 48x64 one: tinyvlm needs "
                          "towers whose processors make one square size (resize to a square, or resize and crop)")
    return h


def patch_grid(cfg):
    """The side of the patch grid every tower makes (fused towers must agree: their features join per patch)."""
    grids = {name: processed_side(from_hub(AutoImageProcessor, name), name) // vision_config(name).patch_size
             for name in tower_names(cfg)}
    if len(set(grids.values())) > 1:
        raise ConfigError(f"config fields 'vision_model' and 'fused_vision_model': their patch grids differ "
                          f"({', '.join(f'{n}: {g}x{g}' for n, g in grids.items())}); fused towers join their "
                          "features patch by patch, so pick towers with the same grid (e.g. patch 14 at 224 px)")
    return next(iter(grids.values()))


def n_image_tokens(cfg):
    """Image tokens per sample: the patch grid (from the cheap config and processor), merged by pixel_unshuffle."""
    grid = patch_grid(cfg)
    if grid % cfg.pixel_unshuffle:
        raise ConfigError(f"config field 'pixel_unshuffle' = {cfg.pixel_unshuffle}: must divide the "
                          f"{grid}x{grid} patch grid of {cfg.vision_model} (valid: "
                          f"{[f for f in range(1, grid + 1) if grid % f == 0]})")
    return (grid // cfg.pixel_unshuffle) ** 2


# ----------------------------------------------------------------------------- loading and cutting
def load_vision(cfg):
    """The tower(s), each cut at cfg.vision_feature_layer, and the image processor that makes the pixels."""
    names = tower_names(cfg)
    towers = [truncate(from_hub(tower_class(vision_config(n)), n), cfg.vision_feature_layer) for n in names]
    processors = [from_hub(AutoImageProcessor, n) for n in names]
    return VisionTowers(towers, processors, names), processors[0]


def truncate(tower, layer):
    """Keep only the encoder layers up to `layer` (LLaVA-style feature layer) and drop SigLIP's pooling head."""
    if hasattr(tower, "head"):
        tower.use_head = False
        del tower.head
    if layer != -1:  # -1 = final output (after SigLIP's/DINOv2's final norm); else the raw output of that layer
        layers = encoder_layers(tower)
        kept = layers[: layer % (len(layers) + 1)]
        setattr(tower.encoder, "layers" if hasattr(tower.encoder, "layers") else "layer", kept)
        for norm in ("post_layernorm", "layernorm"):  # SigLIP's / DINOv2's norm over the last layer's output
            if hasattr(tower, norm):
                setattr(tower, norm, nn.Identity())
    return tower


class VisionTowers(nn.Module):
    """uint8 images [B, 3, H, W] -> patch features [B, N, D1 (+ D2)]: each tower normalises the pixels its own
    way and sees them at its own processor's size; class and register tokens are dropped, fused towers join
    their features channel-wise."""

    def __init__(self, towers, processors, names):
        super().__init__()
        self.towers = nn.ModuleList(towers)
        self.sides = [processed_side(p, n) for p, n in zip(processors, names)]
        self.image_side = self.sides[0]  # the pixels' side: the first tower's processor makes them
        self.pixel_shape = (3, self.image_side, self.image_side)  # of each uint8 image it takes
        self.n_patches = (self.sides[0] // towers[0].config.patch_size) ** 2
        self.hidden_size = sum(t.config.hidden_size for t in towers)
        scales, shifts = zip(*(pixel_normalization(p) for p in processors))
        self.register_buffer("pixel_scale", torch.stack(scales), persistent=False)  # [n_towers, 3, 1, 1]
        self.register_buffer("pixel_shift", torch.stack(shifts), persistent=False)

    def forward(self, pixel_values):                                 # [B, 3, H, W] uint8
        if pixel_values.dtype != torch.uint8:
            raise TypeError(f"pixel_values must be uint8 images from models.vision.image_pixels, "
                            f"got {pixel_values.dtype}")
        feats = []
        for i, tower in enumerate(self.towers):
            pixels = pixel_values.float()
            if pixels.shape[-1] != self.sides[i]:  # a fused tower whose processor makes another size
                pixels = F.interpolate(pixels, size=self.sides[i], mode="bicubic", antialias=True)
            # channels_last: the patch convolution's output then flattens into contiguous patch rows. From NCHW they
            # are a transposed view (SigLIP's embeddings), which every later op of an eager tower strode through or
            # copied: 44 instead of 32 ms for 256 images on an H100 (generation's tower), the same features
            pixels = pixels * self.pixel_scale[i] - self.pixel_shift[i]
            pixels = pixels.to(tower.dtype, memory_format=torch.channels_last)
            hidden = tower(pixel_values=pixels).last_hidden_state  # [B, prefix + N, Di]
            feats.append(hidden[:, -self.n_patches:])  # CLIP's class token, DINOv2's class and registers lead
        return torch.cat(feats, dim=-1)                               # [B, N, sum Di]


# ----------------------------------------------------------------------------- pixels
def image_pixels(processor, images, fit="resize"):
    """PIL images -> uint8 [B, 3, H, W], resized as the checkpoint's processor does (no rescale/normalise).
    fit="letterbox" first pads each image to a square with the processor's mean colour (LLaVA's expand2square,
    Prismatic's letterbox), so the processor neither squashes nor crops it."""
    if fit == "letterbox":
        images = [letterbox(image, processor.image_mean) for image in images]
    pixels = processor(images=images, return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
    return pixels.to(torch.uint8)


def letterbox(image, mean):
    """Pad to a square, centred, with the colour that normalises to zero."""
    side = max(image.size)
    return ImageOps.pad(image, (side, side), color=tuple(round(255 * m) for m in mean))


def pixel_normalization(processor):
    """(scale, shift) with scale * pixel - shift == the processor's (pixel * rescale_factor - mean) / std."""
    rescale = processor.rescale_factor if processor.do_rescale else 1.0
    mean, std = (processor.image_mean, processor.image_std) if processor.do_normalize else ([0.0] * 3, [1.0] * 3)
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1) for v in (mean, std))  # [3, 1, 1]
    return rescale / std, mean / std
