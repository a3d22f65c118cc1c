"""MedFusionModel: image CNN + clinical-note BiLSTM + fusion + three task heads.

Reimplements the architecture of "Integrating Medical Imaging and Clinical Reports Using Multimodal
Deep Learning for Advanced Disease Analysis" (arXiv 2405.17459): a residual CNN encodes the image, a
bidirectional LSTM with attention encodes the clinical note, a fusion layer joins them, and three
heads are trained jointly - disease classification, lesion localization (a box and an objectness per
class) and findings generation (an LSTM decoder attending over image regions).

The model is composed, not configured: `MedFusionModel` takes its parts as modules and plain
numbers; `build_model(cfg, vocab_size, num_classes)` is the one place that reads a ModelConfig.
Batches are the dicts of medfusion.data.batches as `to_tensors` gives them (the image normalized float):

    image (B, 1, S, S)  report_ids (B, Tr)  findings_ids (B, Tf)  labels (B, C)  box (B, 4)  has_box (B,)
    class_boxes (B, C, 4)  class_has_box (B, C)  findings_present (B,)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from medfusion.config import ModelConfig
from medfusion.data.batches import BATCH_KEYS
from medfusion.data.images import normalize_levels
from medfusion.models.backbones import build_image_encoder
from medfusion.models.decoder import FindingsDecoder
from medfusion.models.fusion import build_fusion
from medfusion.models.heads import BoxHead, BoxRefiner, ClassificationHead, box_losses, classification_loss, text_loss
from medfusion.models.image_encoder import ImageFeatures, with_coordinates
from medfusion.models.text_encoder import PAD_ID, NoteEncoder, NoteFeatures

TENSOR_KEYS = BATCH_KEYS  # the model reads every key of a collated batch
PLACE_FREQUENCIES = 3
"""sin/cos of each box coordinate at pi * 2^k, k < 3: periods from twice the image down to half of it."""
PLACE_DIM = 4 * 2 * PLACE_FREQUENCIES + 1
"""Width of `place_features`: the box's sin/cos features and its box score."""


class MedFusionModel(nn.Module):
    """Args:
    image_encoder: image -> ImageFeatures (regions (B, R, D), pooled (B, D), attention (B, R)).
    note_encoder: note ids -> NoteFeatures; None for the image_only ablation.
    fusion: (ImageFeatures, NoteFeatures | None) -> fused (B, D).
    classifier, box_head, decoder: the task heads.
    box_refiner: moves the box head's box onto the lesion's edges in the pixels; None: no refiner.
    multi_label: sigmoid/BCE classification instead of softmax/CE.
    modality_dropout: training only, probability of hiding a sample's note.
    loss_weights: weights of the "cls", "box" and "text" losses.
    beam_size, max_decode_len: generation defaults.
    describes: the decoder is trained and used; False where the dataset has no findings text (no
        decoder loss, and predictions carry no findings).
    pos_weight: multi-label BCE weights of each class's positives (class imbalance); None: all 1.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        note_encoder: NoteEncoder | None,
        fusion: nn.Module,
        classifier: ClassificationHead,
        box_head: BoxHead,
        decoder: FindingsDecoder,
        box_refiner: BoxRefiner | None = None,
        *,
        multi_label: bool = False,
        modality_dropout: float = 0.0,
        loss_weights: Mapping[str, float] | None = None,
        beam_size: int = 1,
        max_decode_len: int = 48,
        describes: bool = True,
        pos_weight: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.note_encoder = note_encoder
        self.fusion = fusion
        self.classifier = classifier
        self.box_head = box_head
        self.decoder = decoder
        self.box_refiner = box_refiner
        self.multi_label = multi_label
        self.modality_dropout = modality_dropout
        self.loss_weights = {"cls": 1.0, "box": 1.0, "text": 1.0, **(loss_weights or {})}
        self.beam_size = beam_size
        self.max_decode_len = max_decode_len
        self.describes = describes
        # Not a buffer: exports and checkpoints keep their keys; the config records the weights.
        self.pos_weight = torch.tensor(pos_weight, dtype=torch.float32) if pos_weight else None
        self.config: ModelConfig | None = None  # set by build_model; export needs it

    @property
    def vocab_size(self) -> int:
        return self.decoder.embed.num_embeddings

    @property
    def num_classes(self) -> int:
        return self.classifier.linear.out_features

    def encode(self, image: Tensor, report_ids: Tensor | None) -> tuple[ImageFeatures, NoteFeatures | None, Tensor]:
        """Both encoders and the fusion: (image features, note features, fused (B, D))."""
        image_features = self.image_encoder(image)
        note_features = None
        if self.note_encoder is not None:
            if report_ids is None:  # no note column at all: every note absent
                report_ids = torch.zeros((image.shape[0], 1), dtype=torch.long, device=image.device)
            note_features = self.note_encoder(report_ids)
        return image_features, note_features, self.fusion(image_features, note_features)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Outputs: logits (B, C); per class class_boxes (B, C, 4) normalized cxcywh and class_objectness
        (B, C) logits; box (B, 4) and objectness (B,) of the most probable class; region_boxes (B, C, R, 4)
        normalized xyxy and box_logits (B, C, R) (the box head's, for its dense losses); with a refiner
        coarse_boxes (B, C, 4) (the box head's) and refined_boxes (B, C, steps, 4) (class_boxes is the
        last step); image_attention / box_attention (B, h, w) (the box's: the most probable class's),
        note_attention (B, Tr), fused (B, D), regions (B, R, D + 2) (the decoder's: `decoder_regions`),
        context (B, D + PLACE_DIM) (the decoder's: fused with `place_features` of the box), and when
        the model describes and `findings_ids` is in the batch: decoder_logits (B, Tf-1, V),
        decoder_attention (B, Tf-1, R)."""
        image = batch["image"].to(self.input_dtype)
        report_ids = batch.get("report_ids")
        if self.training and self.modality_dropout > 0 and report_ids is not None:
            # A new study has no note yet: hide it for some samples so the model learns without it.
            keep = torch.rand(report_ids.shape[0], device=report_ids.device) >= self.modality_dropout
            report_ids = report_ids * keep.unsqueeze(1)
        image_features, note_features, fused = self.encode(image, report_ids)
        batch_size, (height, width) = image.shape[0], image_features.grid
        box = self.box_head(fused, image_features)
        logits = self.classifier(fused)
        class_boxes = box.box
        out = {
            "logits": logits,
            "class_objectness": box.objectness,
            "region_boxes": box.region_boxes,
            "box_logits": box.attention_logits,
            "image_attention": image_features.attention.reshape(batch_size, height, width),
            "fused": fused,
            "regions": decoder_regions(image_features),
        }
        if self.box_refiner is not None:
            classes = class_boxes.shape[1]
            # Every class's box is refined on the same image: (B, C) pairs as one batch.
            pairs = image.unsqueeze(1).expand(-1, classes, -1, -1, -1).flatten(0, 1)  # (B*C, 1, S, S)
            refined = self.box_refiner(pairs, class_boxes.flatten(0, 1))  # (B*C, steps, 4)
            out["coarse_boxes"] = class_boxes
            out["refined_boxes"] = refined.unflatten(0, (batch_size, classes))
            class_boxes = out["refined_boxes"][:, :, -1]
        rows = torch.arange(batch_size, device=logits.device)
        primary = logits.detach().argmax(dim=-1)  # (B,)
        out["class_boxes"] = class_boxes
        out["box"] = class_boxes[rows, primary]
        out["objectness"] = box.objectness[rows, primary]
        out["context"] = torch.cat([fused, place_features(out["box"], out["objectness"]).to(fused.dtype)], dim=-1)
        out["box_attention"] = box.attention[rows, primary].reshape(batch_size, height, width)
        if note_features is not None:
            out["note_attention"] = note_features.weights
        elif report_ids is not None:
            out["note_attention"] = torch.zeros(report_ids.shape, dtype=fused.dtype, device=fused.device)
        if self.describes and batch.get("findings_ids") is not None:
            out["decoder_logits"], out["decoder_attention"] = self.decoder(
                batch["findings_ids"], out["regions"], out["context"]
            )
        return out

    @property
    def input_dtype(self) -> torch.dtype:
        """The weights' dtype (bf16 under DeepSpeed bf16, while batches arrive as float32)."""
        return next(self.image_encoder.parameters()).dtype

    def loss(self, batch: Mapping[str, Tensor], out: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of classification, box (L1 + GIoU + objectness + dense terms, over every
        (image, class) pair: a class's box is supervised where that finding has one) and findings losses.

        Returns the total (with grad) and every part, detached, including "total".
        """
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(out["logits"].device)
        parts = {"cls": classification_loss(out["logits"], batch["labels"], self.multi_label, pos_weight)}
        target, has_box = finding_boxes(batch)
        refined = out.get("refined_boxes")
        parts.update(
            box_losses(
                out.get("coarse_boxes", out["class_boxes"]).flatten(0, 1),
                out["class_objectness"].flatten(0, 1),
                target.flatten(0, 1),
                has_box.flatten(0, 1),
                out["region_boxes"].flatten(0, 1),
                out["box_logits"].flatten(0, 1),
                None if refined is None else refined.flatten(0, 1),
            )
        )
        total = self.loss_weights["cls"] * parts["cls"] + self.loss_weights["box"] * parts["box"]
        if "decoder_logits" in out:
            present = batch.get("findings_present")
            parts["text"] = text_loss(out["decoder_logits"], batch["findings_ids"], PAD_ID, present)
            total = total + self.loss_weights["text"] * parts["text"]
        parts["total"] = total
        return total, {name: value.detach() for name, value in parts.items()}

    @torch.no_grad()
    def generate(
        self,
        batch: Mapping[str, Tensor],
        beam_size: int | None = None,
        max_len: int | None = None,
        outputs: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Findings token ids (B, max_len) without <bos>: <eos> then <pad>, or cut at max_len.

        Pass `outputs` of a forward pass on the same batch to skip re-encoding it.
        """
        if outputs is None:
            outputs = self.forward({key: value for key, value in batch.items() if key != "findings_ids"})
        return self.decoder.beam_search(
            outputs["regions"], outputs["context"], beam_size or self.beam_size, max_len or self.max_decode_len
        )


def decoder_regions(features: ImageFeatures) -> Tensor:
    """The regions the findings decoder attends over: (B, R, D + 2), each with its cell's (x, y)
    (medfusion.models.decoder says why)."""
    return with_coordinates(features.regions, features.grid)


def place_features(box: Tensor, objectness: Tensor) -> Tensor:
    """Where the model found the lesion, as the findings decoder is told it: (B, PLACE_DIM).

    The most probable class's box (normalized cxcywh, (B, 4)) as sin/cos features and its box score
    (sigmoid of `objectness`, (B,)), detached: the decoder reads the boxes and does not train them.
    The regions' (x, y) (`decoder_regions`) place a lesion only to the grid's cell (16 px of 128 at
    8 x 8), while the synthetic zones are a third of a lung high: a mid-zone lesion was written as
    lower zone in half of the test films. The box head's box is accurate to a few pixels.
    """
    box = box.detach().float()
    frequencies = math.pi * 2.0 ** torch.arange(PLACE_FREQUENCIES, device=box.device, dtype=box.dtype)
    angles = (box.unsqueeze(-1) * frequencies).flatten(1)  # (B, 4 * F)
    score = torch.sigmoid(objectness.detach().float()).unsqueeze(-1)  # (B, 1)
    return torch.cat([angles.sin(), angles.cos(), score], dim=-1)


def finding_boxes(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(B, C, 4) normalized xyxy boxes per finding and their (B, C) mask, as `collate` made them
    (medfusion.data.batches.finding_box_arrays holds the rule for shards with one box per image)."""
    missing = [key for key in ("class_boxes", "class_has_box") if key not in batch]
    if missing:
        raise KeyError(f"batch has no {' or '.join(missing)}: build batches with medfusion.data.batches.collate")
    return batch["class_boxes"], batch["class_has_box"]


def to_tensors(batch: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The model keys of a numpy (or tensor) batch as tensors on `device`; other keys are dropped.

    A uint8 `image` (a collated batch's grey levels) is moved as bytes and normalized on `device`
    (medfusion.data.images.normalize_levels, the formula of images.normalize); a floating one is taken as
    normalized already.
    """
    out: dict[str, Tensor] = {}
    for key in TENSOR_KEYS:
        if key in batch and batch[key] is not None:
            value = batch[key]
            tensor = value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))
            out[key] = tensor.to(device, non_blocking=True)
    image = out.get("image")
    if image is not None and image.dtype == torch.uint8:
        out["image"] = normalize_levels(image.float())
    return out


def build_model(cfg: ModelConfig, vocab_size: int, num_classes: int) -> MedFusionModel:
    """Assemble a MedFusionModel from a ModelConfig, a vocabulary size and a class count."""
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4 (the special tokens), got {vocab_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    dim = cfg.hidden_dim
    note_encoder = None
    if cfg.fusion != "image_only":
        note_encoder = NoteEncoder(vocab_size, cfg.embed_dim, cfg.hidden_dim, dim, cfg.dropout)
    model = MedFusionModel(
        image_encoder=build_image_encoder(cfg),
        note_encoder=note_encoder,
        fusion=build_fusion(cfg.fusion, dim, rank=cfg.bilinear_rank, heads=cfg.attention_heads, dropout=cfg.dropout),
        classifier=ClassificationHead(dim, num_classes, cfg.dropout),
        box_head=BoxHead(dim, num_classes, cfg.dropout),
        decoder=FindingsDecoder(
            vocab_size, cfg.embed_dim, cfg.decoder_dim, dim + PLACE_DIM, cfg.dropout, region_dim=dim + 2
        ),
        box_refiner=BoxRefiner(cfg.box_refine_steps) if cfg.box_refine_steps else None,
        multi_label=cfg.multi_label,
        modality_dropout=cfg.modality_dropout,
        loss_weights={"cls": cfg.loss_cls, "box": cfg.loss_box, "text": cfg.loss_text},
        beam_size=cfg.beam_size,
        max_decode_len=cfg.max_decode_len,
        describes=cfg.describes,
        pos_weight=list(cfg.pos_weight) or None,
    )
    model.config = cfg
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
