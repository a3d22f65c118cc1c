"""Task heads of MedFusion and their losses: disease classification and lesion localization.

arXiv 2405.17459 trains classification, localization (scored by IoU) and description generation
jointly from the fused representation. The box head regresses densely, as FCOS does (Tian et al.
2019): every image region predicts the lesion's four edges as distances from its own centre, and the
fused vector's attention over the regions ("where is the lesion?") weights those region boxes into
one. Training supervises both densely (`box_losses`): every region inside the true box regresses it,
and the attention is pulled onto those regions. Against one box regressed from pooled vectors, this
raised test IoU from 0.63 to 0.77 and accuracy from 0.955 to 0.998 (`tiny`, 64 px, 3.1k images,
8 epochs): localizing the lesion also tells the classifier where to look.

Features on a grid of 8x8 cells cannot place the edges of an 11-pixel nodule to the pixel, so a
`BoxRefiner` looks again at the pixels, as the second stage of a two-stage detector does (Cascade
R-CNN, Cai & Vasconcelos 2018): it samples a window twice the box's size from the image, and a small
CNN moves the box's centre and scales its size; two steps, each on the previous box. With it, IoU
rose from 0.77 to 0.86 on the same run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion.models.boxes import cxcywh_to_xyxy, paired_giou, xyxy_to_cxcywh
from medfusion.models.image_encoder import ImageFeatures, grid_coordinates

# DETR's weighting: L1 on normalized coordinates is small next to a (1 - GIoU) in [0, 2].
BOX_L1_WEIGHT = 5.0
BOX_GIOU_WEIGHT = 2.0
OBJECTNESS_WEIGHT = 1.0
DENSE_WEIGHT = 1.0  # the per-region box and attention terms, next to the final box's


class ClassificationHead(nn.Module):
    """fused (B, D) -> class logits (B, C)."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, fused: Tensor) -> Tensor:
        return self.linear(self.dropout(fused))


@dataclass
class BoxOutput:
    """One box per class: a finding's box is where its own query attends (NIH boxes up to 3 findings
    per image, each somewhere else)."""

    box: Tensor
    """(B, C, 4) normalized cxcywh: per class, the attention-weighted mean of the region boxes."""
    objectness: Tensor
    """(B, C) logits: is there a boxed lesion of this class?"""
    attention: Tensor
    """(B, C, R) softmax of `attention_logits`: how much each region's box counts, per class."""
    attention_logits: Tensor
    """(B, C, R)."""
    region_boxes: Tensor
    """(B, C, R, 4) normalized xyxy: the box each region predicts around its own centre, per class."""


class BoxHead(nn.Module):
    """(fused (B, D), image) -> BoxOutput; see the module docstring.

    Each class asks its own question of the regions: a query from the fused vector plus a learned
    per-class offset, so the classes share what they learn about lesions and differ in where to look.
    """

    def __init__(self, dim: int, num_classes: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.query = nn.Linear(2 * dim, dim)
        # A module, not a bare Parameter: ZeRO-3 gathers a module's weights around its own call only.
        self.class_query = nn.Embedding(num_classes, dim)
        nn.init.zeros_(self.class_query.weight)
        self.key = nn.Linear(dim, dim)
        # The region and query halves of one Linear over their concatenation, applied apart so that
        # the (B, C, R, D) hidden layer is one sum, not a concatenated (B, C, R, 2D) input.
        self.edges_region = nn.Linear(dim, dim)
        self.edges_query = nn.Linear(dim, dim, bias=False)
        self.edges_out = nn.Linear(dim, 4)
        self.objectness = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Dropout(dropout))
        # Each class reads the shared features with its own weights, as a classifier's output layer
        # does: one shared output unit could not tell the classes apart and stayed at their prior.
        self.objectness_out = nn.Embedding(num_classes, dim + 1)  # (weights, bias) per class
        nn.init.normal_(self.objectness_out.weight, std=dim**-0.5)
        self.scale = dim**-0.5

    def forward(self, fused: Tensor, image: ImageFeatures) -> BoxOutput:
        context = torch.cat([fused, image.pooled], dim=-1)  # (B, 2D)
        classes = torch.arange(self.class_query.num_embeddings, device=fused.device)
        query = self.query(context).unsqueeze(1) + self.class_query(classes)  # (B, C, D)
        logits = torch.einsum("bcd,brd->bcr", query, self.key(image.regions)) * self.scale  # (B, C, R)
        attention = logits.softmax(dim=-1)
        attended = torch.einsum("bcr,brd->bcd", attention, image.regions)  # (B, C, D)
        height, width = image.grid
        centres = grid_coordinates(height, width, device=fused.device).to(attention.dtype)  # (R, 2) as (x, y)
        hidden = F.relu(self.edges_region(image.regions).unsqueeze(1) + self.edges_query(query).unsqueeze(2))
        # Distances to the left, top, right and bottom edges, in cells (softplus: never negative).
        edges = F.softplus(self.edges_out(hidden)) / max(height, width)  # (B, C, R, 4)
        region_boxes = torch.cat([centres - edges[..., :2], centres + edges[..., 2:]], dim=-1)  # (B, C, R, 4)
        box = xyxy_to_cxcywh(torch.einsum("bcr,bcrk->bck", attention, region_boxes))
        every_class = context.unsqueeze(1).expand(-1, query.shape[1], -1)  # (B, C, 2D)
        features = self.objectness(torch.cat([every_class, attended], dim=-1))  # (B, C, D)
        out = self.objectness_out(classes)  # (C, D + 1)
        objectness = (features * out[:, :-1]).sum(-1) + out[:, -1]  # (B, C)
        return BoxOutput(box, objectness, attention, logits, region_boxes)


class BoxRefiner(nn.Module):
    """(image (B, C, S, S), box (B, 4) normalized cxcywh) -> refined boxes (B, steps, 4), one per step.

    Each step samples a `window` x `window` grid of the grey image over twice the box's extent (at
    least `MIN_WINDOW` of the image, so a tiny box still shows its surroundings) and predicts a shift
    of the centre in window units and a log-scale of the size. Steps share weights and each starts
    from the previous box, detached: every step learns to correct a box, not to co-adapt with the
    one before.
    """

    MIN_WINDOW = 0.12

    def __init__(self, steps: int = 2, window: int = 24, channels: int = 32) -> None:
        super().__init__()
        self.steps, self.window = steps, window
        wide = 2 * channels
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.GroupNorm(8, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.GroupNorm(8, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, wide, 3, stride=2, padding=1),
            nn.GroupNorm(8, wide),
            nn.ReLU(inplace=True),
            nn.Conv2d(wide, wide, 3, stride=2, padding=1),
            nn.GroupNorm(8, wide),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(wide * math.ceil(window / 8) ** 2, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, 4),
        )
        last = self.net[-1]
        nn.init.normal_(last.weight, std=1e-3)  # start as the identity: the refiner first does no harm
        nn.init.zeros_(last.bias)

    def forward(self, image: Tensor, box: Tensor) -> Tensor:
        grey = image.mean(dim=1, keepdim=True)
        boxes = []
        for _ in range(self.steps):
            box = self._step(grey, box.detach())
            boxes.append(box)
        return torch.stack(boxes, dim=1)

    def _step(self, grey: Tensor, box: Tensor) -> Tensor:
        cx, cy, w, h = box.unbind(-1)
        span_x, span_y = (2 * w).clamp(min=self.MIN_WINDOW), (2 * h).clamp(min=self.MIN_WINDOW)
        theta = torch.zeros((len(box), 2, 3), dtype=grey.dtype, device=grey.device)  # window -> image, in [-1, 1]
        theta[:, 0, 0], theta[:, 0, 2] = span_x, 2 * cx - 1
        theta[:, 1, 1], theta[:, 1, 2] = span_y, 2 * cy - 1
        grid = F.affine_grid(theta, [len(box), 1, self.window, self.window], align_corners=False)
        crop = F.grid_sample(grey, grid, align_corners=False, padding_mode="border")
        shift_x, shift_y, scale_w, scale_h = self.net(crop).unbind(-1)
        return torch.stack(
            [
                (cx + shift_x * span_x).clamp(0.0, 1.0),
                (cy + shift_y * span_y).clamp(0.0, 1.0),
                (w * scale_w.clamp(-3.0, 3.0).exp()).clamp(1e-4, 1.0),
                (h * scale_h.clamp(-3.0, 3.0).exp()).clamp(1e-4, 1.0),
            ],
            dim=-1,
        )


def classification_loss(logits: Tensor, labels: Tensor, multi_label: bool, pos_weight: Tensor | None = None) -> Tensor:
    """Softmax cross-entropy on the argmax of multi-hot `labels`, or per-class sigmoid BCE (with the
    positives of class c weighted by pos_weight[c], when given)."""
    if multi_label:
        weight = None if pos_weight is None else pos_weight.to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weight)
    return F.cross_entropy(logits, labels.argmax(dim=-1))


def box_losses(
    box: Tensor,
    objectness: Tensor,
    target_xyxy: Tensor,
    has_box: Tensor,
    region_boxes: Tensor | None = None,
    attention_logits: Tensor | None = None,
    refined: Tensor | None = None,
) -> dict[str, Tensor]:
    """L1 and GIoU losses on images that have a lesion, BCE objectness on all images, and, given the
    head's region boxes and attention logits, the dense terms: every region whose centre lies inside
    the true box (and the one nearest its centre, for boxes smaller than a cell) regresses that box
    ("box_dense"), and the attention's divergence from those regions ("box_focus"). Given the
    refiner's boxes, their L1 and GIoU losses, summed over its steps ("box_refine").

    Args:
        box: (B, 4) predicted normalized cxcywh.
        objectness: (B,) logits.
        target_xyxy: (B, 4) normalized xyxy (ignored where has_box is 0).
        has_box: (B,) 1.0 where the image has a lesion box.
        region_boxes: (B, R, 4) normalized xyxy on a square grid of R = side**2 regions, row-major.
        attention_logits: (B, R).
        refined: (B, steps, 4) normalized cxcywh.
    """
    pred_xyxy = cxcywh_to_xyxy(box)  # (B, 4)
    target_xyxy, has_box = target_xyxy.to(box.dtype), has_box.to(box.dtype)
    count = has_box.sum().clamp(min=1.0)
    l1 = ((pred_xyxy - target_xyxy).abs().sum(-1) * has_box).sum() / count
    giou = ((1.0 - paired_giou(pred_xyxy, target_xyxy)) * has_box).sum() / count
    obj = F.binary_cross_entropy_with_logits(objectness, has_box)
    total = BOX_L1_WEIGHT * l1 + BOX_GIOU_WEIGHT * giou + OBJECTNESS_WEIGHT * obj
    out = {"box_l1": l1, "box_giou": giou, "objectness": obj}
    if refined is not None:
        errors = _box_error(cxcywh_to_xyxy(refined), target_xyxy.unsqueeze(1))  # (B, steps)
        out["box_refine"] = (errors * has_box.unsqueeze(1)).sum() / count
        total = total + out["box_refine"]
    if region_boxes is not None and attention_logits is not None:
        inside = _regions_inside(target_xyxy, has_box > 0.5, region_boxes.shape[1]).to(box.dtype)  # (B, R)
        per_region = _box_error(region_boxes, target_xyxy.unsqueeze(1))  # (B, R)
        out["box_dense"] = (per_region * inside).sum() / inside.sum().clamp(min=1.0)
        # KL(uniform over the inside regions || attention): 0 once the attention is exactly there.
        wanted = inside / inside.sum(-1, keepdim=True).clamp(min=1.0)
        log_ratio = torch.log(wanted.clamp(min=1e-12)) - attention_logits.log_softmax(-1)
        out["box_focus"] = (wanted * log_ratio).sum() / count
        total = total + DENSE_WEIGHT * (out["box_dense"] + out["box_focus"])
    out["box"] = total
    return out


def _box_error(pred_xyxy: Tensor, target_xyxy: Tensor) -> Tensor:
    """DETR's weighted L1 + (1 - GIoU) per box: (..., 4), (..., 4) broadcastable -> (...)."""
    target_xyxy = target_xyxy.expand_as(pred_xyxy)
    l1 = (pred_xyxy - target_xyxy).abs().sum(-1)
    return BOX_L1_WEIGHT * l1 + BOX_GIOU_WEIGHT * (1.0 - paired_giou(pred_xyxy, target_xyxy))


def _regions_inside(target_xyxy: Tensor, has_box: Tensor, regions: int) -> Tensor:
    """(B, R) bool: the regions of a square grid whose centre lies inside the box, plus the region
    nearest the box's centre; none where there is no box."""
    side = round(regions**0.5)
    centres = grid_coordinates(side, side, device=target_xyxy.device).to(target_xyxy.dtype)  # (R, 2)
    x, y = centres[:, 0], centres[:, 1]
    box = target_xyxy.unsqueeze(1)  # (B, 1, 4)
    inside = (x > box[..., 0]) & (x < box[..., 2]) & (y > box[..., 1]) & (y < box[..., 3])  # (B, R)
    middle = (target_xyxy[:, :2] + target_xyxy[:, 2:]) / 2  # (B, 2)
    nearest = ((centres.unsqueeze(0) - middle.unsqueeze(1)) ** 2).sum(-1).argmin(-1)  # (B,)
    inside[torch.arange(len(nearest), device=nearest.device), nearest] = True
    return inside & has_box.unsqueeze(1)


def text_loss(decoder_logits: Tensor, findings_ids: Tensor, pad_id: int = 0, present: Tensor | None = None) -> Tensor:
    """Token cross-entropy of teacher-forced logits (B, T-1, V) against findings_ids[:, 1:], over the
    rows whose findings are `present` (B,): a row without findings is no target, not "<eos> at once"."""
    target = findings_ids[:, 1:]  # (B, T-1)
    if present is not None:
        target = target.masked_fill(present.unsqueeze(1) < 0.5, pad_id)
    if not bool((target != pad_id).any()):
        return decoder_logits.sum() * 0.0  # no findings at all in this batch
    return F.cross_entropy(
        decoder_logits.reshape(-1, decoder_logits.shape[-1]), target.reshape(-1), ignore_index=pad_id
    )
