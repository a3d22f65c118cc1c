"""Box arithmetic for MedFusion's localization head (arXiv 2405.17459 scores boxes by IoU).

The head predicts normalized (cx, cy, w, h); datasets, metrics and the predictor speak normalized
(x0, y0, x1, y1). Element-wise (paired) versions only: there is one box per image.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-7


def cxcywh_to_xyxy(box: Tensor) -> Tensor:
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(box: Tensor) -> Tensor:
    x0, y0, x1, y1 = box.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _area(box: Tensor) -> Tensor:
    return (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)


def paired_iou(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union of matching xyxy boxes: (..., 4), (..., 4) -> (...), (...)."""
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = _area(a) + _area(b) - inter
    return inter / (union + _EPS), union


def paired_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalized IoU of matching xyxy boxes (Rezatofighi et al. 2019), in [-1, 1]."""
    iou, union = paired_iou(a, b)
    enclose = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return iou - (enclose - union) / (enclose + _EPS)
