"""Built-in backbones: a pre-LN ViT with tokens [CLS, time, patches] (``vit``) and a
time-conditioned ResNet of diffusers' ``ResnetBlock2D`` with FiLM conditioning (``resnet``)."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .hookspecs import hookimpl


class _BlockLayers:
    """Layer ids for layer-wise lr decay of a backbone with ``blocks`` (a ModuleList), a final
    ``norm`` and ``depth = len(blocks)``: everything before the blocks 0, block i -> i+1, norm depth+1."""

    depth: int

    def get_layer_id(self, name: str) -> int:
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        if name.startswith("norm."):
            return self.depth + 1
        return 0


class ViTBackbone(_BlockLayers, nn.Module):
    """Noise-conditioned ViT; returns LN(CLS) of shape (B, hidden_size).

    The time token is the sinusoidal embedding of c_noise (diffusers' ``Timesteps``), as in the
    spec and the authors' code (``mlp_time_embed=False`` there); ``time_mlp=True`` passes it
    through diffusers' ``TimestepEmbedding`` MLP first (the authors' option, off in their configs).
    """

    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        patch_size: int = 4,
        hidden_size: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        time_mlp: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.out_dim = hidden_size
        self.depth = depth
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(hidden_size, hidden_size) if time_mlp else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 2, hidden_size))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden_size,
                num_heads,
                int(hidden_size * mlp_ratio),
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden_size)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, P, D)
        time_tok = self.time_embed(self.time_proj(t).to(patches.dtype)).unsqueeze(1)  # (B, 1, D)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), time_tok, patches], dim=1)  # (B, P+2, D)
        tokens = tokens + self.pos_embed
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])  # (B, D)


class ResNetBackbone(_BlockLayers, nn.Module):
    """Noise-conditioned ResNet; returns LN(global average pool) of shape (B, widths[-1]).

    A 3x3 stem, then ``blocks_per_stage`` diffusers ``ResnetBlock2D`` per width, the first of every
    stage after the first halving the resolution. The time condition c_noise goes through
    ``Timesteps`` + ``TimestepEmbedding`` and scales and shifts every block's features (FiLM,
    ``time_embedding_norm="scale_shift"``). GroupNorm, not BatchNorm: a base classifier that is
    certified must give each image the same logits whatever else is in its batch.

    Use through `RRCMModel`: ``RRCMModel(backbone_type="resnet", backbone_kwargs={"widths": [32, 64, 128]})``.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        widths: tuple[int, ...] | list[int] = (32, 64, 128),
        blocks_per_stage: int = 1,
        groups: int = 8,
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths or any(w % groups for w in widths):
            raise ValueError(
                f"widths must be a non-empty list of multiples of groups ({groups}), got {widths}"
            )
        if image_size % 2 ** (len(widths) - 1):
            raise ValueError(f"image_size ({image_size}) must be divisible by 2^(len(widths) - 1)")
        temb = 4 * widths[0]
        self.out_dim = widths[-1]
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(widths[0], temb)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            ResnetBlock2D(
                in_channels=widths[max(i - 1, 0)] if j == 0 else w,
                out_channels=w,
                temb_channels=temb,
                groups=groups,
                time_embedding_norm="scale_shift",
                down=i > 0 and j == 0,
            )
            for i, w in enumerate(widths)
            for j in range(blocks_per_stage)
        )
        self.depth = len(self.blocks)
        self.norm = nn.LayerNorm(widths[-1])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_embed(self.time_proj(t).to(x.dtype))  # (B, 4·widths[0])
        h = self.stem(x)  # (B, widths[0], H, W)
        for block in self.blocks:
            h = block(h, temb)  # (B, w, H / 2^stage, W / 2^stage)
        return self.norm(h.mean(dim=(2, 3)))  # (B, widths[-1])


@hookimpl
def rrcm_register_backbones():
    return {"vit": ViTBackbone, "resnet": ResNetBackbone}
