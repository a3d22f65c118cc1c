"""Image encoder of MedFusion: a small ResNet over the radiograph.

Follows the image branch of "Integrating Medical Imaging and Clinical Reports Using Multimodal Deep
Learning for Advanced Disease Analysis" (arXiv 2405.17459): a residual CNN whose final feature grid
is kept as *regions* (what the findings decoder and the box head attend over) and pooled into one
vector by additive spatial attention (whose weights are drawn over the image as a heatmap).

GroupNorm instead of BatchNorm: training batches are small per worker and inference runs one image
at a time, and GroupNorm behaves the same in both (no running statistics to drift).

Standard backbones (DenseNet-121, ResNet-18/50) are in medfusion.models.backbones; they turn their
feature map into ImageFeatures with the same `grid_features`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def grid_coordinates(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Centres of the cells of a (height, width) grid as normalized (x, y), row-major: (H*W, 2)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection (ResNet "basic block")."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class AdditiveAttentionPool(nn.Module):
    """score_i = v . tanh(W x_i); weights = softmax over the unmasked items; out = sum_i w_i x_i."""

    def __init__(self, dim: int, attn_dim: int | None = None) -> None:
        super().__init__()
        attn_dim = attn_dim or dim
        self.proj = nn.Linear(dim, attn_dim)
        self.score = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # x: (B, N, D), mask: (B, N) bool, True = keep. A row with nothing kept gets all-zero weights
        # (never NaN): callers replace its output.
        scores = self.score(torch.tanh(self.proj(x))).squeeze(-1)  # (B, N)
        if mask is None:
            weights = scores.softmax(dim=-1)
        else:
            any_kept = mask.any(dim=-1, keepdim=True)  # (B, 1)
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = scores.softmax(dim=-1) * mask * any_kept  # (B, N)
        pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)  # (B, D)
        return pooled, weights


@dataclass
class ImageFeatures:
    regions: Tensor
    """(B, R, D) features of the final grid cells, row-major, position-aware."""
    pooled: Tensor
    """(B, D) attention-pooled image vector."""
    attention: Tensor
    """(B, R) spatial attention weights of the pooling (sum to 1 per image)."""
    grid: tuple[int, int]
    """(h, w) of the final grid; R = h * w."""


class ImageEncoder(nn.Module):
    """ResNet-style CNN: (B, C, S, S) -> ImageFeatures with R = (S / (stem_stride * 2**len(widths)))**2 regions.

    Args:
        in_channels: 1 (grayscale) or 3 (RGB).
        widths: channels of each stage; every stage halves the resolution.
        blocks: residual blocks per stage.
        out_dim: width D of the region features and the pooled vector.
        dropout: dropout on the region features.
        stem_stride: 2 halves the resolution in the stem, before the first stage.
    """

    def __init__(
        self, in_channels: int, widths: list[int], blocks: int, out_dim: int, dropout: float = 0.0, stem_stride: int = 1
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stride=stem_stride, padding=1, bias=False),
            _norm(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        channels = widths[0]
        for width in widths:
            layers = [ResidualBlock(channels, width, stride=2)]
            layers += [ResidualBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            channels = width
        self.stages = nn.Sequential(*stages)
        # +2 input channels: the cell's (x, y), so attention (and the box head) know where a region is.
        self.region_proj = nn.Linear(channels + 2, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.pool = AdditiveAttentionPool(out_dim)

    def forward(self, image: Tensor) -> ImageFeatures:
        expected = self.stem[0].in_channels
        if image.shape[1] == 1 and expected == 3:  # the data pipeline is grayscale; an RGB stem sees grey
            image = image.expand(-1, 3, -1, -1)
        fmap = self.stages(self.stem(image))  # (B, C, h, w)
        return grid_features(fmap, self.region_proj, self.dropout, self.pool)


def with_coordinates(cells: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, R, C) row-major cells of a (h, w) grid -> (B, R, C + 2), each with its centre's (x, y)."""
    coords = grid_coordinates(*grid, device=cells.device).to(cells.dtype)  # (R, 2)
    return torch.cat([cells, coords.expand(cells.shape[0], -1, -1)], dim=-1)


def grid_features(
    fmap: Tensor, region_proj: nn.Linear, dropout: nn.Module, pool: AdditiveAttentionPool
) -> ImageFeatures:
    """A CNN's final feature map (B, C, h, w) -> ImageFeatures: each cell with its (x, y) appended,
    projected to D (a 1x1 convolution as a Linear over C + 2 inputs), then attention-pooled."""
    _, _, height, width = fmap.shape
    cells = with_coordinates(fmap.flatten(2).transpose(1, 2), (height, width))  # (B, R, C+2)
    regions = dropout(F.relu(region_proj(cells)))  # (B, R, D)
    pooled, attention = pool(regions)  # (B, D), (B, R)
    return ImageFeatures(regions=regions, pooled=pooled, attention=attention, grid=(height, width))
