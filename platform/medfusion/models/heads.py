"""Task heads of MedFusion and their losses: disease classification and lesion localization.

arXiv 2405.17459 trains classification, localization (scored by IoU) and description generation
jointly from the fused representation. The box head here is attention-based: the fused vector asks
"where is the lesion?" over the image regions, the attention's centre of mass is a reference point
that a small MLP refines (the inverse-sigmoid refinement of Deformable DETR), and the same MLP
gives the box size and an objectness logit (is there a lesion at all?).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.models.boxes import cxcywh_to_xyxy, paired_giou
from medfusion.models.image_encoder import ImageFeatures, grid_coordinates

# DETR's weighting: L1 on normalized coordinates is small next to a (1 - GIoU) in [0, 2].
BOX_L1_WEIGHT = 5.0
BOX_GIOU_WEIGHT = 2.0
OBJECTNESS_WEIGHT = 1.0


class ClassificationHead(nn.Module):
    """fused (B, D) -> class logits (B, C)."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, fused: Tensor) -> Tensor:
        return self.linear(self.dropout(fused))


class BoxHead(nn.Module):
    """(fused (B, D), image) -> box (B, 4) normalized cxcywh, objectness logit (B,), attention (B, R)."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.query = nn.Linear(2 * dim, dim)
        self.key = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, 5))
        self.scale = dim**-0.5

    def forward(self, fused: Tensor, image: ImageFeatures) -> tuple[Tensor, Tensor, Tensor]:
        context = torch.cat([fused, image.pooled], dim=-1)  # (B, 2D)
        query = self.query(context)  # (B, D)
        keys = self.key(image.regions)  # (B, R, D)
        attention = (torch.einsum("bd,brd->br", query, keys) * self.scale).softmax(dim=-1)  # (B, R)
        attended = torch.einsum("br,brd->bd", attention, image.regions)  # (B, D)
        coords = grid_coordinates(*image.grid, device=fused.device).to(attention.dtype)  # (R, 2)
        reference = (attention @ coords).clamp(1e-4, 1 - 1e-4)  # (B, 2) centre of mass, (x, y)
        out = self.mlp(torch.cat([context, attended], dim=-1))  # (B, 5)
        centre = torch.sigmoid(torch.logit(reference) + out[:, :2])  # (B, 2)
        size = torch.sigmoid(out[:, 2:4])  # (B, 2)
        return torch.cat([centre, size], dim=-1), out[:, 4], attention


def classification_loss(logits: Tensor, labels: Tensor, multi_label: bool) -> Tensor:
    """Softmax cross-entropy on the argmax of multi-hot `labels`, or per-class sigmoid BCE."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.argmax(dim=-1))


def box_losses(box: Tensor, objectness: Tensor, target_xyxy: Tensor, has_box: Tensor) -> dict[str, Tensor]:
    """L1 and GIoU losses on images that have a lesion, BCE objectness on all images.

    Args:
        box: (B, 4) predicted normalized cxcywh.
        objectness: (B,) logits.
        target_xyxy: (B, 4) normalized xyxy (ignored where has_box is 0).
        has_box: (B,) 1.0 where the image has a lesion box.
    """
    pred_xyxy = cxcywh_to_xyxy(box)  # (B, 4)
    target_xyxy, has_box = target_xyxy.to(box.dtype), has_box.to(box.dtype)
    count = has_box.sum().clamp(min=1.0)
    l1 = ((pred_xyxy - target_xyxy).abs().sum(-1) * has_box).sum() / count
    giou = ((1.0 - paired_giou(pred_xyxy, target_xyxy)) * has_box).sum() / count
    obj = F.binary_cross_entropy_with_logits(objectness, has_box)
    total = BOX_L1_WEIGHT * l1 + BOX_GIOU_WEIGHT * giou + OBJECTNESS_WEIGHT * obj
    return {"box_l1": l1, "box_giou": giou, "objectness": obj, "box": total}


def text_loss(decoder_logits: Tensor, findings_ids: Tensor, pad_id: int = 0) -> Tensor:
    """Token cross-entropy of teacher-forced logits (B, T-1, V) against findings_ids[:, 1:]."""
    target = findings_ids[:, 1:]  # (B, T-1)
    if not bool((target != pad_id).any()):
        return decoder_logits.sum() * 0.0  # no findings at all in this batch
    return F.cross_entropy(
        decoder_logits.reshape(-1, decoder_logits.shape[-1]), target.reshape(-1), ignore_index=pad_id
    )
