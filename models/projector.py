"""SwiGLU modality projector: vision features -> LM embeddings."""
import torch.nn as nn
import torch.nn.functional as F


def pixel_unshuffle(x, factor):
    """Merge factor x factor neighbouring patches into one token: [B, N, D] -> [B, N/f^2, D*f^2]."""
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
