"""Modality projectors: vision features -> LM embeddings. The config field `projector` picks one: swiglu
(tinyvlm's own), mlp (LLaVA-1.5's) or linear (SmolVLM's connector); the last two are exactly transformers'
Llava and Idefics3 projectors, so a model trained with them leaves as those classes (models/native.py)."""
import torch.nn as nn
import torch.nn.functional as F


def pixel_unshuffle(x, factor):
    """Merge factor x factor neighbouring patches into one token: [B, N, D] -> [B, N/f^2, D*f^2]. Tokens and
    channels come in the order of transformers' Idefics3Connector.pixel_shuffle (tests/test_native.py)."""
    B, N, D = x.shape
    side = int(round(N ** 0.5))
    if side * side != N:
        raise ValueError(f"pixel_unshuffle={factor} needs a square grid of patch tokens, got {N} tokens "
                         "(a vision encoder with a CLS token? drop it first)")
    if side % factor:
        raise ValueError(f"pixel_unshuffle={factor} must divide the {side}x{side} patch grid")
    g = side // factor
    x = x.reshape(B, g, factor, g, factor, D)          # [B, gy, fy, gx, fx, D]
    x = x.permute(0, 1, 3, 2, 4, 5)                    # [B, gy, gx, fy, fx, D]
    return x.reshape(B, g * g, factor * factor * D)    # [B, N/f^2, D*f^2]


class Projector(nn.Module):
    """SwiGLU over (optionally) merged patches."""

    def __init__(self, vision_dim, lm_dim, hidden_dim, unshuffle=1):
        super().__init__()
        self.unshuffle = unshuffle
        in_dim = vision_dim * unshuffle * unshuffle
        self.gate = nn.Linear(in_dim, hidden_dim, bias=False)
        self.up = nn.Linear(in_dim, hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, lm_dim, bias=False)

    def forward(self, x):                              # [B, N, Dv]
        if self.unshuffle > 1:
            x = pixel_unshuffle(x, self.unshuffle)     # [B, N/f^2, Dv*f^2]
        return self.down(F.silu(self.gate(x)) * self.up(x))  # [B, N/f^2, Dlm]

    def input_layers(self):  # the layers that read the vision features (training/throughput.py counts them apart)
        return [self.gate, self.up]


class MLPProjector(nn.Module):
    """LLaVA-1.5's: linear, GELU, linear, both as wide as the LM and with biases; every patch is a token."""

    def __init__(self, vision_dim, lm_dim):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        self.linear_2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, x):                              # [B, N, Dv]
        return self.linear_2(F.gelu(self.linear_1(x)))  # [B, N, Dlm]

    def input_layers(self):
        return [self.linear_1]


class LinearProjector(nn.Module):
    """SmolVLM's (Idefics3's) connector: merged patches, then one bias-free linear layer."""

    def __init__(self, vision_dim, lm_dim, unshuffle):
        super().__init__()
        self.unshuffle = unshuffle
        self.proj = nn.Linear(vision_dim * unshuffle * unshuffle, lm_dim, bias=False)

    def forward(self, x):                              # [B, N, Dv]
        if self.unshuffle > 1:
            x = pixel_unshuffle(x, self.unshuffle)     # [B, N/f^2, Dv*f^2]
        return self.proj(x)                            # [B, N/f^2, Dlm]

    def input_layers(self):
        return [self.proj]


def build_projector(cfg, vision_dim, lm_dim):
    """The projector cfg.projector names (VLMConfig.validate has checked the name and its pixel_unshuffle)."""
    if cfg.projector == "mlp":
        return MLPProjector(vision_dim, lm_dim)
    if cfg.projector == "linear":
        return LinearProjector(vision_dim, lm_dim, cfg.pixel_unshuffle)
    return Projector(vision_dim, lm_dim, cfg.projector_hidden_dim, cfg.pixel_unshuffle)
