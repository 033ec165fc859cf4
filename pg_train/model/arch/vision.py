"""InternViT (InternVL2.5 vision tower) with the released parameter names, and pixel shuffle v2.

Written here rather than taken from transformers' `InternVLVisionModel` because the released
Sa2VA checkpoints use the original InternViT names (`attn.qkv`, `ls1`, `mlp.fc1`, ...): keeping
those names makes checkpoint loading a prefix mapping instead of a tensor-splitting exercise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .presets import VisionDims


class InternVisionEmbeddings(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(1, 1, dims.hidden_size))
        self.patch_embedding = nn.Conv2d(3, dims.hidden_size, kernel_size=dims.patch_size, stride=dims.patch_size)
        num_patches = (dims.image_size // dims.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dims.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, N, D], row-major over the patch grid
        if patches.shape[1] + 1 != self.position_embedding.shape[1]:
            raise ValueError(
                f"vision input gives {patches.shape[1]} patches, position table has "
                f"{self.position_embedding.shape[1] - 1}: images must be resized to the preset's image_size"
            )
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.to(patches.dtype)


class InternAttention(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.num_heads = dims.num_heads
        self.qkv = nn.Linear(dims.hidden_size, 3 * dims.hidden_size, bias=dims.qkv_bias)
        self.proj = nn.Linear(dims.hidden_size, dims.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class InternMLP(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.fc1 = nn.Linear(dims.hidden_size, dims.mlp_size)
        self.fc2 = nn.Linear(dims.mlp_size, dims.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.attn = InternAttention(dims)
        self.mlp = InternMLP(dims)
        self.norm1 = nn.LayerNorm(dims.hidden_size, eps=dims.layer_norm_eps)
        self.norm2 = nn.LayerNorm(dims.hidden_size, eps=dims.layer_norm_eps)
        self.ls1 = nn.Parameter(0.1 * torch.ones(dims.hidden_size))
        self.ls2 = nn.Parameter(0.1 * torch.ones(dims.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, dims: VisionDims):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(dims) for _ in range(dims.num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """Returns the last layer's hidden states [B, 1 + N, D] (CLS first); no final norm."""

    def __init__(self, dims: VisionDims):
        super().__init__()
        self.dims = dims
        self.embeddings = InternVisionEmbeddings(dims)
        self.encoder = InternVisionEncoder(dims)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(pixel_values))


def pixel_shuffle_v2(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL pixel shuffle, "v2" layout.

    [B, H, W, C] -> [B, H*s, W*s, C/s^2]. For s=0.5, output token (i, j) holds the channels
    [x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)] — the same view/permute sequence as InternVL,
    so checkpoints trained with it see the layout they expect.
    """
    n, h, w, c = x.shape
    x = x.reshape(n, h, int(w * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(w * scale_factor), int(h * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def build_mlp1(vision: VisionDims, llm_hidden: int) -> nn.Sequential:
    """The trainable projector: LayerNorm -> Linear -> GELU -> Linear (keys mlp1.0/.1/.3)."""
    width = vision.shuffled_size
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, llm_hidden),
        nn.GELU(),
        nn.Linear(llm_hidden, llm_hidden),
    )
