"""MedFusionModel: shapes over every registered variant x fusion, gradients, empty notes, decoding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from medfusion.config import FUSIONS, ConfigError, ModelConfig
from medfusion.data.images import normalize
from medfusion.data.tokenizer import EOS_ID, PAD_ID
from medfusion.models import (
    MODEL_REGISTRY,
    PLACE_DIM,
    build_model,
    count_parameters,
    create_model,
    cxcywh_to_xyxy,
    decoder_regions,
    list_models,
    paired_giou,
    paired_iou,
    preset_config,
    to_tensors,
    xyxy_to_cxcywh,
)
from medfusion.models.heads import _regions_inside, box_losses
from medfusion.models.image_encoder import grid_coordinates

# Grid side at 64 px: every ResNet stage halves the resolution.
GRID = {"medfusion_tiny": 8, "medfusion_small": 4, "medfusion_base": 4}


def test_registry_has_every_preset():
    assert {"medfusion_tiny", "medfusion_small", "medfusion_base"} <= set(list_models())
    with pytest.raises(KeyError, match="medfusion_huge"):
        create_model("medfusion_huge", 100, 3)


@pytest.mark.parametrize("name, fusion", list(itertools.product(sorted(MODEL_REGISTRY), FUSIONS)))
def test_forward_shapes(synth_data, name, fusion):
    torch.manual_seed(0)
    batch = synth_data.batch(0, 3)
    vocab, classes = len(synth_data.tokenizer), len(synth_data.classes)
    model = create_model(name, vocab, classes, fusion=fusion).eval()
    out = model(batch)
    grid = GRID[name]
    dim = model.config.hidden_dim
    tf = batch["findings_ids"].shape[1]
    expected = {
        "logits": (3, classes),
        "box": (3, 4),
        "objectness": (3,),
        "class_boxes": (3, classes, 4),
        "class_objectness": (3, classes),
        "region_boxes": (3, classes, grid * grid, 4),
        "box_logits": (3, classes, grid * grid),
        "coarse_boxes": (3, classes, 4),
        "refined_boxes": (3, classes, 2, 4),
        "image_attention": (3, grid, grid),
        "box_attention": (3, grid, grid),
        "note_attention": tuple(batch["report_ids"].shape),
        "fused": (3, dim),
        "regions": (3, grid * grid, dim + 2),
        "context": (3, dim + PLACE_DIM),
        "decoder_logits": (3, tf - 1, vocab),
        "decoder_attention": (3, tf - 1, grid * grid),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.allclose(out["image_attention"].sum(dim=(1, 2)), torch.ones(3), atol=1e-5)
    assert ((out["box"] >= 0) & (out["box"] <= 1)).all()
    # The decoder's regions end with their cell's (x, y), row-major.
    assert torch.equal(out["regions"][0, :, -2:], grid_coordinates(grid, grid))
    total, parts = model.loss(batch, out)
    assert torch.isfinite(total) and set(parts) == {
        "cls",
        "box_l1",
        "box_giou",
        "objectness",
        "box_dense",
        "box_focus",
        "box_refine",
        "box",
        "text",
        "total",
    }
    generated = model.generate(batch, beam_size=2, max_len=6)
    assert generated.shape == (3, 6) and generated.dtype == torch.long


@pytest.mark.parametrize("fusion", FUSIONS)
def test_gradients_reach_every_parameter(synth_data, fusion):
    """After one backward on a batch with notes, boxes and no-box images, every parameter has a
    non-zero gradient. The one that legitimately could not is `note_encoder.no_note`, which only
    learns from samples without a note: the batch includes one. image_only builds no note encoder."""
    torch.manual_seed(0)
    batch = synth_data.batch(0, 16)
    batch["report_ids"][0] = PAD_ID
    assert batch["has_box"].sum() > 0 and (batch["has_box"] == 0).any()
    model = create_model(
        "medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes), fusion=fusion, modality_dropout=0.0
    )
    model.train()
    total, _ = model.loss(batch, model(batch))
    total.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert missing == []
    assert (model.note_encoder is None) == (fusion == "image_only")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_all_empty_notes_give_no_nan(synth_data, fusion):
    torch.manual_seed(0)
    batch = synth_data.batch(0, 8, drop_notes=True)
    assert (batch["report_ids"] == PAD_ID).all()
    model = create_model("medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes), fusion=fusion)
    model.train()
    out = model(batch)
    total, _ = model.loss(batch, out)
    total.backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (out["note_attention"] == 0).all()
    # No note column at all behaves like all-empty notes.
    model.eval()
    no_column = {k: v for k, v in batch.items() if k != "report_ids"}
    assert torch.allclose(model(no_column)["logits"], model(batch)["logits"], atol=1e-6)


def test_modality_dropout_hides_the_note(synth_data):
    """With modality_dropout=1 a training forward pass sees every note as absent."""
    batch = synth_data.batch(0, 6)
    model = create_model(
        "medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes), dropout=0.0, modality_dropout=1.0
    )
    dropped = model.train()(batch)["logits"]
    empty = model.eval()({**batch, "report_ids": torch.zeros_like(batch["report_ids"])})["logits"]
    with_note = model.eval()(batch)["logits"]
    assert torch.allclose(dropped, empty, atol=1e-6)
    assert not torch.allclose(with_note, empty, atol=1e-6)


def test_beam_search_is_batched_and_consistent(synth_data):
    torch.manual_seed(0)
    batch = synth_data.batch(0, 4)
    model = create_model("medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes)).eval()
    greedy = model.decoder.greedy(*_decoder_inputs(model, batch), max_len=12)
    assert torch.equal(model.generate(batch, beam_size=1, max_len=12), greedy)
    beams = model.generate(batch, beam_size=3, max_len=12)
    one_by_one = torch.cat([model.generate({k: v[i : i + 1] for k, v in batch.items()}, 3, 12) for i in range(4)])
    assert torch.equal(beams, one_by_one)
    for row in beams.tolist():  # after <eos>, only <pad>
        if EOS_ID in row:
            assert set(row[row.index(EOS_ID) + 1 :]) <= {PAD_ID}


def _decoder_inputs(model, batch):
    out = model({key: value for key, value in batch.items() if key != "findings_ids"})
    return out["regions"], out["context"]


def _taught_word_accuracy(words: torch.Tensor, regions: torch.Tensor, context: torch.Tensor, steps: int) -> float:
    """A small decoder taught "<bos> word <eos>" for each row's word (ids 4 and up) over its regions and
    context: the share of rows whose word it then generates greedily."""
    from medfusion.models import FindingsDecoder

    n, vocab = len(words), int(words.max()) + 1
    findings = torch.stack([torch.full((n,), 2), words, torch.full((n,), 3)], dim=1)  # <bos> word <eos>
    torch.manual_seed(1)
    decoder = FindingsDecoder(vocab, 4, 16, context.shape[-1], region_dim=regions.shape[-1])
    optimizer = torch.optim.Adam(decoder.parameters(), lr=0.03)
    for _ in range(steps):
        logits, _ = decoder(findings, regions, context)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), findings[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float((decoder.greedy(regions, context, 1)[:, 0] == words).float().mean())


def test_the_decoder_names_a_place_from_its_regions_coordinates():
    """Regions that differ only in where the lesion's cell is: the word of place ("left" / "right")
    is learnt from the (x, y) that decoder_regions appends, and cannot be without it."""
    from medfusion.models import ImageFeatures

    torch.manual_seed(0)
    dim, side, n = 8, 4, 64
    regions = torch.zeros(n, side * side, dim)
    cells = torch.randint(0, side * side, (n,))
    regions[torch.arange(n), cells] = 1.0  # the lesion's cell: the same features wherever it is
    left = (cells % side) < side // 2
    words = torch.where(left, torch.tensor(4), torch.tensor(5))  # 4 "left", 5 "right"
    fused = torch.zeros(n, dim)
    located = decoder_regions(ImageFeatures(regions=regions, pooled=fused, attention=fused, grid=(side, side)))

    assert _taught_word_accuracy(words, located, fused, steps=150) == 1.0
    assert _taught_word_accuracy(words, regions, fused, steps=150) < 0.8


def test_the_decoder_names_a_zone_within_one_cell_from_the_box():
    """Lesions whose boxes all lie in one cell row of the grid (y in [0.375, 0.5) at 8 x 8), a third
    of them written "upper", "mid" or "lower" by where in that row the box is: the regions' (x, y)
    are the same for all of them, so only `place_features` of the box can tell the words apart."""
    from medfusion.models import place_features

    torch.manual_seed(0)
    dim, n = 8, 96
    regions = torch.ones(n, 4, dim + 2)  # the same regions for every film
    level = torch.arange(n) % 3
    cy = 0.375 + (level.float() + torch.rand(n) * 0.8 + 0.1) * (0.125 / 3)
    box = torch.stack([torch.full((n,), 0.3), cy, torch.full((n,), 0.1), torch.full((n,), 0.02)], dim=1)
    words = level + 4  # 4 "upper", 5 "mid", 6 "lower"
    fused = torch.zeros(n, dim)
    told = torch.cat([fused, place_features(box, torch.full((n,), 5.0))], dim=-1)
    untold = torch.cat([fused, torch.zeros(n, PLACE_DIM)], dim=-1)

    assert _taught_word_accuracy(words, regions, told, steps=200) >= 0.95
    assert _taught_word_accuracy(words, regions, untold, steps=200) < 0.5


def test_beam_search_prefers_the_likelier_sequence():
    """A 2-step toy where greedy's first choice leads to a worse sequence: beam search finds the best."""
    from medfusion.models import FindingsDecoder

    decoder = FindingsDecoder(vocab_size=6, embed_dim=4, hidden_dim=4, context_dim=4)
    # first step: token 4 (p=.4) vs 5 (p=.35); after 4 everything is flat, after 5 <eos> is certain
    table = {2: [-9, -9, -9, -9, 0.4, 0.35], 4: [0.1, 0.1, 0.1, 0.2, 0.2, 0.2], 5: [0, 0, 0, 1, 0, 0]}

    def step(tokens, state, regions, fused):
        probs = torch.tensor([table.get(int(t), table[4]) for t in tokens[:, -1]]).clamp(min=1e-9)
        return probs.log().unsqueeze(1), None, state

    decoder.step = step  # type: ignore[method-assign]
    regions, fused = torch.zeros(1, 2, 4), torch.zeros(1, 4)
    assert decoder.greedy(regions, fused, 2).tolist() == [[4, 3]]
    assert decoder.beam_search(regions, fused, 2, 2).tolist() == [[5, 3]]


def test_to_tensors_normalizes_uint8_pixels_as_images_normalize_does():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tensors = to_tensors({"image": grey[None, None], "labels": np.zeros((1, 2), np.float32)})
    assert tensors["image"].dtype == torch.float32
    np.testing.assert_array_equal(tensors["image"][0].numpy(), normalize(grey))
    as_is = torch.randn(1, 1, 16, 16)
    assert torch.equal(to_tensors({"image": as_is})["image"], as_is)  # floats are normalized already


@pytest.mark.parametrize("multi_label", [False, True])
def test_bf16_weights_take_float32_batches(synth_data, multi_label):
    """DeepSpeed bf16 casts the weights, not the batches: forward, loss and generate still work."""
    batch = synth_data.batch(0, 4)
    model = create_model(
        "medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes), multi_label=multi_label
    ).to(torch.bfloat16)
    total, _ = model.loss(batch, model(batch))
    total.backward()
    assert torch.isfinite(total.float())
    assert model.eval().generate(batch, beam_size=2, max_len=5).shape == (4, 5)


def test_multi_label_uses_sigmoid_bce(synth_data):
    batch = synth_data.batch(0, 4)
    batch["labels"][:, 0] = 1.0  # two labels on some rows
    model = create_model("medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes), multi_label=True)
    out = model(batch)
    _, parts = model.loss(batch, out)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], batch["labels"])
    assert torch.allclose(parts["cls"], expected.detach())


def test_balanced_classes_weigh_the_positives_of_rare_classes(synth_data):
    batch = synth_data.batch(0, 4)
    classes = len(synth_data.classes)
    weights = [1.0 + c for c in range(classes)]
    model = create_model("medfusion_tiny", len(synth_data.tokenizer), classes, multi_label=True, pos_weight=weights)
    out = model(batch)
    _, parts = model.loss(batch, out)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], batch["labels"])
    weighted = torch.nn.functional.binary_cross_entropy_with_logits(
        out["logits"], batch["labels"], pos_weight=torch.tensor(weights)
    )
    assert torch.allclose(parts["cls"], weighted.detach()) and not torch.allclose(parts["cls"], plain.detach())


def test_class_pos_weight_is_negatives_over_positives_within_bounds():
    from medfusion.config import MAX_POS_WEIGHT
    from medfusion.data.dataset import DatasetInfo
    from medfusion.training.run import class_pos_weight

    manifest = {
        "classes": ["common", "rare", "absent", "majority"],
        "splits": {"train": {"rows": 100, "class_counts": {"common": 20, "rare": 2, "majority": 80}}},
    }
    info = DatasetInfo(uri="mem://", version="v", manifest=manifest, tokenizer=None)
    assert class_pos_weight(info) == [4.0, MAX_POS_WEIGHT, MAX_POS_WEIGHT, 1.0]


@pytest.mark.parametrize(
    "a, b, iou, giou",
    [
        ([0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.5], 1.0, 1.0),
        ([0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], 1 / 3, 1 / 3),
        ([0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 1.0, 1.0], 0.0, 0.08 / 1.0 - 1.0),
    ],
)
def test_box_iou_and_giou(a, b, iou, giou):
    a_t, b_t = torch.tensor(a), torch.tensor(b)
    assert paired_iou(a_t, b_t)[0].item() == pytest.approx(iou, abs=1e-5)
    assert paired_giou(a_t, b_t).item() == pytest.approx(giou, abs=1e-5)
    assert torch.allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(a_t)), a_t)


def test_box_losses_supervise_the_regions_inside_the_box():
    """On a 4x4 grid, the regions whose centre lies inside the true box (and, for a box smaller than
    a cell, only the one nearest its centre) regress it and draw the attention; images without a
    lesion add nothing to the dense terms."""
    target = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.60, 0.60, 0.65, 0.65], [0.0, 0.0, 0.0, 0.0]])
    has_box = torch.tensor([1.0, 1.0, 0.0])
    inside = _regions_inside(target, has_box > 0.5, 16)
    assert inside[0].nonzero().flatten().tolist() == [0, 1, 4, 5]  # the top-left quarter
    assert inside[1].nonzero().flatten().tolist() == [10]  # centre (0.625, 0.625): row 2, column 2
    assert not inside[2].any()

    perfect = target.unsqueeze(1).expand(-1, 16, -1).clone()
    focused = torch.where(inside, 20.0, -20.0)
    box = xyxy_to_cxcywh(target)
    exact = box_losses(box, torch.tensor([9.0, 9.0, -9.0]), target, has_box, perfect, focused)
    assert exact["box_dense"].item() == pytest.approx(0.0, abs=1e-4)
    assert exact["box_focus"].item() == pytest.approx(0.0, abs=1e-3)
    wrong = perfect.clone()
    wrong[2] = 0.5  # no lesion in image 2: its region boxes do not count
    no_objectness = torch.zeros(3)
    dense = box_losses(box, no_objectness, target, has_box, wrong, focused)["box_dense"]
    assert dense.item() == pytest.approx(0.0, abs=1e-4)
    wrong[0, 0] = torch.tensor([0.5, 0.5, 1.0, 1.0])  # an inside region off the box does
    assert box_losses(box, no_objectness, target, has_box, wrong, focused)["box_dense"].item() > 0.5
    assert box_losses(box, no_objectness, target, has_box, perfect, -focused)["box_focus"].item() > 10


def test_stem_stride_halves_the_grid(synth_data):
    batch = synth_data.batch(0, 2)
    vocab, classes = len(synth_data.tokenizer), len(synth_data.classes)
    for stride, grid in ((1, 8), (2, 4)):
        out = create_model("medfusion_tiny", vocab, classes, stem_stride=stride).eval()(batch)
        assert out["box_attention"].shape == (2, grid, grid)
    with pytest.raises(ConfigError, match="model.stem_stride"):
        ModelConfig(stem_stride=4)


@pytest.mark.parametrize("channels", [1, 3])
def test_rgb_stem_takes_grayscale_and_rgb_images(synth_data, channels):
    batch = synth_data.batch(0, 2)
    batch["image"] = batch["image"].expand(-1, channels, -1, -1)
    model = create_model("medfusion_tiny", len(synth_data.tokenizer), len(synth_data.classes), in_channels=3)
    assert model(batch)["logits"].shape == (2, len(synth_data.classes))


def test_tiny_preset_is_about_one_megabyte():
    model = create_model("medfusion_tiny", vocab_size=300, num_classes=7)
    assert count_parameters(model) * 4 < 2_000_000


def test_build_model_records_its_config():
    cfg = preset_config("tiny", fusion="bilinear")
    model = build_model(cfg, 50, 3)
    assert model.config is cfg and model.vocab_size == 50 and model.num_classes == 3


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"fusion": "cross_attention", "hidden_dim": 60, "attention_heads": 8}, "model.attention_heads"),
        ({"fusion": "late"}, "model.fusion"),
        ({"bilinear_rank": 0}, "model.bilinear_rank"),
    ],
)
def test_model_config_validation_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**overrides)
