"""The one predictor: loads an export and answers for online serving and batch evaluation alike.

Three ways in, one model call underneath (`predict_batch`):

- ``predict(items)``: a list of ``{"image": bytes, "report": str | None}`` -> one JSON-ready dict per
  item (what the Serve deployment returns). Bad input raises `PredictError` naming the item index
  (or, with ``errors="return"``, yields ``{"error": ..., "index": i}`` for that item only, so one bad
  image in a dynamic batch does not fail its neighbours).
- ``predict_batch(batch)``: a **collated model batch** (medfusion.data.batches.collate output, numpy)
  -> prediction columns plus the batch's other columns (targets, sample ids) passed through. This is
  what evaluation runs over `iter_local_batches`; `concat_batches` + `metrics_from_predictions` finish it.
- ``__call__(batch)``: Ray Data ``map_batches(Predictor, fn_constructor_kwargs={"uri": ...})`` on
  **raw-row batches** (an ``image`` column of encoded bytes, an optional ``report`` column; e.g. shard
  rows). Every column but ``image`` is passed through; prediction columns are added, including
  ``pred_box_pixels`` in the input image's pixels. A row that cannot be decoded raises PredictError.

Prediction columns: probs (B, C), pred_label (B,), pred_box (B, 4) normalized xyxy, objectness (B,)
probability (both of the most probable class), pred_class_boxes (B, C, 4) normalized xyxy and
class_objectness (B, C) probability (a box per class), generated_ids (B, L), generated (B,) text (empty,
L = 0, for a model trained without findings), image_attention (B, h, w) (the image encoder's
pooling attention), box_attention (B, h, w) (where the box head looked), note_attention (B, Tr).

Notes: an absent, empty or whitespace note means "no note". A long note is cut to the export's
``max_report_tokens`` words (text past ``max_report_tokens * NOTE_CHARS_PER_TOKEN`` characters is not
even tokenized), exactly as training truncated it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from medfusion.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize
from medfusion.data.tokenizer import Tokenizer, split_words
from medfusion.export import LoadedExport, load_export
from medfusion.models import MedFusionModel, cxcywh_to_xyxy, to_tensors

NOTE_CHARS_PER_TOKEN = 32
MODEL_INPUT_KEYS = ("image", "report_ids", "findings_ids", "report_present")


class PredictError(ValueError):
    """An input item cannot be predicted; `index` is its position in the request or batch."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"item {index}: {reason}")
        self.index = index
        self.reason = reason


def concat_batches(batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate the columns of several batches (e.g. predict_batch outputs) along rows."""
    batches = list(batches)
    if not batches:
        return {}
    return {key: np.concatenate([np.asarray(b[key]) for b in batches]) for key in batches[0]}


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Loads an export folder (local path or s3://) and predicts.

    Args:
        uri: the export folder (see medfusion.export).
        device: "cpu", "cuda", "cuda:1"... or "auto".
        beam_size, max_decode_len: generation settings (default: the exported model's).
        batch_size: largest number of items `predict` sends to the model at once.
        max_pixels: images with more pixels are refused (decompression-bomb guard).
    """

    def __init__(
        self,
        uri: str,
        *,
        device: str | torch.device = "cpu",
        beam_size: int | None = None,
        max_decode_len: int | None = None,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        loaded = load_export(uri, _resolve_device(device))
        self._setup(loaded, beam_size, max_decode_len, batch_size, max_pixels)

    @classmethod
    def from_export(cls, uri: str, **kwargs: Any) -> Predictor:
        return cls(uri, **kwargs)

    @classmethod
    def from_model(
        cls,
        model: MedFusionModel,
        *,
        tokenizer: Tokenizer,
        classes: Sequence[str],
        data_settings: Mapping[str, int],
        **kwargs: Any,
    ) -> Predictor:
        """A predictor over an in-memory model (put in eval mode), e.g. to evaluate during training."""
        loaded = LoadedExport(
            uri="",
            model=model.eval(),
            tokenizer=tokenizer,
            classes=list(classes),
            config={"model_name": "in-memory", "data": dict(data_settings), "multi_label": model.multi_label},
            metrics={},
            lineage={},
            checksums={"model.safetensors": "in-memory"},
        )
        self = cls.__new__(cls)
        self._setup(loaded, **kwargs)
        return self

    def _setup(
        self,
        loaded: LoadedExport,
        beam_size: int | None = None,
        max_decode_len: int | None = None,
        batch_size: int = 32,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.export = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.classes = loaded.classes
        self.image_size = int(loaded.data["image_size"])
        self.max_report_tokens = int(loaded.data["max_report_tokens"])
        self.multi_label = bool(self.model.multi_label)
        self.beam_size = beam_size or self.model.beam_size
        self.max_decode_len = max_decode_len or self.model.max_decode_len
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.device = next(self.model.parameters()).device

    @property
    def info(self) -> dict[str, Any]:
        """What `GET /v1/model` shows: name, version (weights hash), classes, settings, metrics, lineage."""
        return {
            "model_name": self.export.config.get("model_name", "medfusion"),
            "version": self.export.version,
            "classes": list(self.classes),
            "multi_label": self.multi_label,
            "image_size": self.image_size,
            "max_report_tokens": self.max_report_tokens,
            "beam_size": self.beam_size,
            "metrics": self.export.metrics,
            "lineage": self.export.lineage,
        }

    # ---------------------------------------------------------------- inputs

    def _image(self, index: int, data: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """Encoded bytes -> the batch's uint8 (1, S, S) pixels and the original (height, width)."""
        if isinstance(data, (bytearray, memoryview, np.bytes_)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise PredictError(index, f"image must be encoded bytes (PNG, JPEG or DICOM), got {type(data).__name__}")
        try:
            gray = decode_image(data, self.max_pixels)
        except ImageDecodeError as err:
            raise PredictError(index, f"image: {err}") from err
        return resize(gray, self.image_size)[None], (int(gray.shape[0]), int(gray.shape[1]))

    def _note_words(self, index: int, report: Any) -> list[str]:
        if report is None:
            return []
        if not isinstance(report, str):
            raise PredictError(index, f"report must be a string or null, got {type(report).__name__}")
        return split_words(report[: self.max_report_tokens * NOTE_CHARS_PER_TOKEN])[: self.max_report_tokens]

    def _note_ids(self, notes: Sequence[list[str]]) -> np.ndarray:
        ids = np.zeros((len(notes), self.max_report_tokens), dtype=np.int64)
        for row, words in enumerate(notes):
            encoded = self.tokenizer.encode(" ".join(words), self.max_report_tokens)
            ids[row, : len(encoded)] = encoded
        return ids

    # ---------------------------------------------------------------- the model call

    @torch.inference_mode()
    def predict_batch(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Predictions for a collated model batch (`image` (B, 1, S, S), optional `report_ids` (B, Tr)).

        Returns the prediction columns (module docstring) and every non-input column of `batch`.
        """
        inputs = to_tensors({k: batch[k] for k in ("image", "report_ids") if k in batch}, self.device)
        out = self.model(inputs)
        if self.model.describes:
            generated = self.model.generate(inputs, self.beam_size, self.max_decode_len, outputs=out)
        else:  # trained without findings text: nothing to say, rather than an untrained decoder's words
            generated = torch.zeros((len(out["logits"]), 0), dtype=torch.long)
        probs = torch.sigmoid(out["logits"]) if self.multi_label else out["logits"].softmax(dim=-1)
        note_attention = out.get("note_attention")
        if note_attention is None:
            note_attention = torch.zeros((len(probs), 0))
        generated_np = generated.cpu().numpy()
        result = {
            "probs": probs.float().cpu().numpy(),
            "pred_label": probs.argmax(dim=-1).cpu().numpy(),
            "pred_box": cxcywh_to_xyxy(out["box"]).clamp(0.0, 1.0).float().cpu().numpy(),
            "objectness": torch.sigmoid(out["objectness"]).float().cpu().numpy(),
            "pred_class_boxes": cxcywh_to_xyxy(out["class_boxes"]).clamp(0.0, 1.0).float().cpu().numpy(),
            "class_objectness": torch.sigmoid(out["class_objectness"]).float().cpu().numpy(),
            "generated_ids": generated_np,
            "generated": np.array([self.tokenizer.decode(row) for row in generated_np], dtype=object),
            "image_attention": out["image_attention"].float().cpu().numpy(),
            "box_attention": out["box_attention"].float().cpu().numpy(),
            "note_attention": note_attention.float().cpu().numpy(),
        }
        passthrough = {k: np.asarray(v) for k, v in batch.items() if k not in MODEL_INPUT_KEYS and k not in result}
        return {**passthrough, **result}

    # ---------------------------------------------------------------- raw rows (Ray Data)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Ray Data map_batches on raw rows: `image` bytes (+ optional `report`) -> predictions."""
        images = list(batch["image"])
        reports = list(batch["report"]) if "report" in batch else [None] * len(images)
        pixels, sizes, notes = [], [], []
        for i, (data, report) in enumerate(zip(images, reports)):
            try:
                image, size = self._image(i, data)
                words = self._note_words(i, None if report is None else str(report))
            except PredictError as err:
                sample = batch["sample_id"][i] if "sample_id" in batch else None
                raise PredictError(i, err.reason + (f" (sample_id {sample})" if sample is not None else "")) from err
            pixels.append(image)
            sizes.append(size)
            notes.append(words)
        model_batch = {"image": np.stack(pixels), "report_ids": self._note_ids(notes)}
        result = self.predict_batch(model_batch)
        heights_widths = np.asarray(sizes, dtype=np.float32).reshape(-1, 2)
        scale = np.stack([heights_widths[:, 1], heights_widths[:, 0]] * 2, axis=1)  # (B, 4): w, h, w, h
        result["pred_box_pixels"] = result["pred_box"] * scale
        passthrough = {k: np.asarray(v) for k, v in batch.items() if k != "image" and k not in result}
        return {**passthrough, **result}

    # ---------------------------------------------------------------- online

    def predict(self, items: Sequence[Mapping[str, Any]], errors: str = "raise") -> list[dict[str, Any]]:
        """One JSON-ready prediction per item ``{"image": bytes, "report": str | None}``.

        Args:
            errors: "raise" (PredictError naming the first bad item) or "return" (that item's result is
                ``{"error": reason, "index": i}``; the others are predicted).

        Each result: labels [{"name", "probability"}] sorted by probability, top_label, top_probability,
        predicted (top label; multi-label: every label with probability >= 0.5), box {"xyxy" in input
        pixels, "normalized_xyxy", "score"} of the top label, boxes [{"label", "xyxy", "normalized_xyxy",
        "score"}] of every class whose box score is >= 0.5 (best first), findings (generated text; None
        for a model trained without findings), note_attention [(word, weight)],
        image_attention (h x w grid of weights summing to 1), image_size {"width", "height"}.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        results: list[dict[str, Any] | None] = [None] * len(items)
        prepared: list[tuple[int, np.ndarray, tuple[int, int], list[str]]] = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, Mapping) or "image" not in item:
                    raise PredictError(i, "expected a mapping with an 'image' field")
                image, size = self._image(i, item["image"])
                prepared.append((i, image, size, self._note_words(i, item.get("report"))))
            except PredictError as err:
                if errors == "raise":
                    raise
                results[i] = {"error": err.reason, "index": i}
        for start in range(0, len(prepared), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            model_batch = {
                "image": np.stack([c[1] for c in chunk]),
                "report_ids": self._note_ids([c[3] for c in chunk]),
            }
            out = self.predict_batch(model_batch)
            for row, (i, _, size, words) in enumerate(chunk):
                results[i] = self._item_result(out, row, size, words)
        return results  # type: ignore[return-value]

    def _item_result(self, out: Mapping[str, np.ndarray], row: int, size: tuple[int, int], words: list[str]) -> dict:
        height, width = size
        probs = out["probs"][row]
        order = np.argsort(-probs, kind="stable")
        top = int(order[0])
        predicted = [self.classes[c] for c in order if probs[c] >= 0.5] if self.multi_label else [self.classes[top]]
        box = out["pred_box"][row]
        weights = out["note_attention"][row] if out["note_attention"].shape[1] else np.zeros(0)
        scores = out["class_objectness"][row]
        claimed = [int(c) for c in np.argsort(-scores, kind="stable") if scores[c] >= 0.5]
        return {
            "labels": [{"name": self.classes[c], "probability": float(probs[c])} for c in order],
            "top_label": self.classes[top],
            "top_probability": float(probs[top]),
            "predicted": predicted,
            "box": _box_fields(box, float(out["objectness"][row]), width, height),
            "boxes": [
                {
                    "label": self.classes[c],
                    **_box_fields(out["pred_class_boxes"][row, c], float(scores[c]), width, height),
                }
                for c in claimed
            ],
            "findings": str(out["generated"][row]) if self.model.describes else None,
            "note_attention": [(word, float(weights[j])) for j, word in enumerate(words) if j < len(weights)],
            "image_attention": out["image_attention"][row].astype(float).tolist(),
            "image_size": {"width": width, "height": height},
        }


def _box_fields(box: np.ndarray, score: float, width: int, height: int) -> dict[str, Any]:
    """A normalized xyxy box as the API gives it: in input pixels, normalized, and its score."""
    return {
        "xyxy": [float(box[0] * width), float(box[1] * height), float(box[2] * width), float(box[3] * height)],
        "normalized_xyxy": [float(v) for v in box],
        "score": score,
    }
