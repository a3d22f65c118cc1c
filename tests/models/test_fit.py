"""A quick in-process fit of `medfusion_tiny` on synthetic data: the model learns all three tasks."""

from __future__ import annotations

import torch

from medfusion.data.tokenizer import EOS_ID
from medfusion.models import create_model, cxcywh_to_xyxy, paired_iou
from medfusion.models.fitting import train_epochs

TRAIN, TEST = 300, 60
EPOCHS, BATCH, LR = 18, 32, 3e-3


def test_tiny_fits_synthetic_data(make_synth_data):
    torch.manual_seed(0)
    data = make_synth_data(TRAIN + TEST)
    train, test = data.batch(0, TRAIN), data.batch(TRAIN)
    num_classes = len(data.classes)
    model = create_model("medfusion_tiny", len(data.tokenizer), num_classes, fusion="gated")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = EPOCHS * -(-TRAIN // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=steps, pct_start=0.15)

    epoch_losses = train_epochs(model, train, epochs=EPOCHS, batch_size=BATCH, optimizer=optimizer, schedule=schedule)

    model.eval()
    with torch.no_grad():
        out = model(test)
        accuracy = (out["logits"].argmax(1) == test["labels"].argmax(1)).float().mean().item()
        has_box = test["has_box"] > 0
        iou = paired_iou(cxcywh_to_xyxy(out["box"])[has_box], test["box"][has_box])[0].mean().item()
        # Chance level for boxes: always answer the mean training box.
        mean_box = train["box"][train["has_box"] > 0].mean(0, keepdim=True)
        chance_iou = paired_iou(mean_box.expand(int(has_box.sum()), -1), test["box"][has_box])[0].mean().item()
        generated = model.generate(test, beam_size=2, max_len=40)
    texts = [data.tokenizer.decode(row) for row in generated.tolist()]
    ends_in_eos = (generated == EOS_ID).any(dim=1).float().mean().item()
    print(
        f"\nfit: loss {epoch_losses[0]:.3f} -> {epoch_losses[-1]:.3f}, accuracy {accuracy:.3f} "
        f"(chance {1 / num_classes:.3f}), IoU {iou:.3f} (mean-box {chance_iou:.3f}), eos {ends_in_eos:.2f}\n"
        f"  e.g. {texts[0]!r}"
    )

    assert epoch_losses[-1] < 0.6 * epoch_losses[0]
    assert accuracy > 2.5 / num_classes
    assert iou > chance_iou + 0.05
    assert ends_in_eos >= 0.9
    assert all(text and len(text.split()) < 40 for text in texts)
