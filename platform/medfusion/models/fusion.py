"""Fusion of the image and note representations, selected by name.

arXiv 2405.17459 fuses the CNN and BiLSTM features before the task heads; the strategies here are
the usual candidates a sweep compares (Ray Tune searches over `model.fusion`):

    concat           MLP over [image; note]
    gated            gated multimodal unit: a learned per-feature gate mixes the two modalities
    bilinear         low-rank bilinear pooling (Hadamard product of projections, Kim et al. 2017)
    cross_attention  note tokens attend over image regions and regions over note tokens
    image_only       ablation: the note is ignored
    text_only        ablation: the image vector is ignored (the box head and the findings decoder
                     still look at the image regions - localization needs pixels)

Every module maps (image: ImageFeatures, note: NoteFeatures | None) -> fused (B, D).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medfusion.models.image_encoder import ImageFeatures
from medfusion.models.text_encoder import NoteFeatures


def _mlp(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(out_dim, out_dim))


class ConcatFusion(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = _mlp(2 * dim, dim, dropout)

    def forward(self, image: ImageFeatures, note: NoteFeatures | None) -> Tensor:
        assert note is not None
        return self.mlp(torch.cat([image.pooled, note.vector], dim=-1))  # (B, D)


class GatedFusion(nn.Module):
    """fused = z * tanh(W_i img) + (1 - z) * tanh(W_t note), z = sigmoid(W_z [img; note])."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_proj = nn.Linear(dim, dim)
        self.note_proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: ImageFeatures, note: NoteFeatures | None) -> Tensor:
        assert note is not None
        gate = torch.sigmoid(self.gate(torch.cat([image.pooled, note.vector], dim=-1)))  # (B, D)
        image_part = torch.tanh(self.image_proj(image.pooled))  # (B, D)
        note_part = torch.tanh(self.note_proj(note.vector))  # (B, D)
        return self.dropout(gate * image_part + (1.0 - gate) * note_part)


class BilinearFusion(nn.Module):
    """Low-rank bilinear pooling: fused = P (tanh(U img) * tanh(V note)) + skip(img)."""

    def __init__(self, dim: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_proj = nn.Linear(dim, rank)
        self.note_proj = nn.Linear(dim, rank)
        self.out = nn.Linear(rank, dim)
        # The product alone passes image evidence only through the note's factor; the skip keeps a
        # direct image path so the no-note case does not depend on one learned vector.
        self.skip = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, image: ImageFeatures, note: NoteFeatures | None) -> Tensor:
        assert note is not None
        joint = torch.tanh(self.image_proj(image.pooled)) * torch.tanh(self.note_proj(note.vector))  # (B, rank)
        return self.out(self.dropout(joint)) + self.skip(image.pooled)  # (B, D)


class CrossAttentionFusion(nn.Module):
    """Bidirectional cross-attention between note tokens and image regions.

    The note side is prefixed with its pooled vector (the learned no-note vector when absent), so
    every attention has at least one key and an empty note never produces NaN.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.note_to_image = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.image_to_note = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm_note = nn.LayerNorm(dim)
        self.norm_image = nn.LayerNorm(dim)
        self.mlp = _mlp(2 * dim, dim, dropout)

    def forward(self, image: ImageFeatures, note: NoteFeatures | None) -> Tensor:
        assert note is not None
        tokens = torch.cat([note.vector.unsqueeze(1), note.states], dim=1)  # (B, 1+T, D)
        keep = torch.cat([torch.ones_like(note.mask[:, :1]), note.mask], dim=1)  # (B, 1+T)
        # Note tokens read the image...
        attended, _ = self.note_to_image(tokens, image.regions, image.regions, need_weights=False)
        tokens = self.norm_note(tokens + attended)  # (B, 1+T, D)
        # ...and image regions read the (image-aware) note.
        attended, _ = self.image_to_note(image.regions, tokens, tokens, key_padding_mask=~keep, need_weights=False)
        regions = self.norm_image(image.regions + attended)  # (B, R, D)
        keep_f = keep.unsqueeze(-1).to(tokens.dtype)
        note_vec = (tokens * keep_f).sum(1) / keep_f.sum(1)  # (B, D)
        image_vec = regions.mean(dim=1) + image.pooled  # (B, D)
        return self.mlp(torch.cat([image_vec, note_vec], dim=-1))  # (B, D)


class ImageOnlyFusion(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = _mlp(dim, dim, dropout)

    def forward(self, image: ImageFeatures, note: NoteFeatures | None) -> Tensor:
        return self.mlp(image.pooled)  # (B, D)


class TextOnlyFusion(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = _mlp(dim, dim, dropout)

    def forward(self, image: ImageFeatures, note: NoteFeatures | None) -> Tensor:
        assert note is not None
        return self.mlp(note.vector)  # (B, D)


def build_fusion(name: str, dim: int, *, rank: int, heads: int, dropout: float) -> nn.Module:
    """The fusion module called `name` (one of medfusion.config.FUSIONS) over D = `dim` features."""
    if name == "concat":
        return ConcatFusion(dim, dropout)
    if name == "gated":
        return GatedFusion(dim, dropout)
    if name == "bilinear":
        return BilinearFusion(dim, rank, dropout)
    if name == "cross_attention":
        return CrossAttentionFusion(dim, heads, dropout)
    if name == "image_only":
        return ImageOnlyFusion(dim, dropout)
    if name == "text_only":
        return TextOnlyFusion(dim, dropout)
    raise ValueError(f"model.fusion: unknown fusion {name!r}")
