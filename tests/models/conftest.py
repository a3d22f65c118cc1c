"""Shared fixtures of the model tests: a small synthetic dataset as model batches (tensors)."""

from __future__ import annotations

import pytest
import torch

from medfusion.config import SynthConfig
from medfusion.data import synth
from medfusion.data.batches import collate
from medfusion.data.tokenizer import Tokenizer
from medfusion.models import to_tensors

IMAGE_SIZE = 64


class SynthData:
    """Synthetic samples with their tokenizer, and a way to turn any subset into a tensor batch."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        cfg = SynthConfig(num_samples=num_samples, image_size=IMAGE_SIZE, seed=seed)
        self.samples = list(synth.generate(cfg))
        self.classes = synth.class_names(cfg)
        self.tokenizer = Tokenizer.build(s.report + " " + s.findings for s in self.samples)

    def batch(self, start: int = 0, stop: int | None = None, drop_notes: bool = False) -> dict[str, torch.Tensor]:
        chosen = self.samples[start:stop]
        rows = {key: [getattr(s, key) for s in chosen] for key in ("image", "report", "findings", "labels", "box")}
        if drop_notes:
            rows["report"] = [""] * len(chosen)
        batch = collate(
            rows,
            tokenizer=self.tokenizer,
            num_classes=len(self.classes),
            image_size=IMAGE_SIZE,
            max_report_tokens=48,
            max_findings_tokens=40,
        )
        return to_tensors(batch)


@pytest.fixture(scope="session")
def synth_data() -> SynthData:
    return SynthData(num_samples=64)


@pytest.fixture(scope="session")
def make_synth_data():
    """SynthData itself, for tests that need a dataset of their own size."""
    return SynthData
