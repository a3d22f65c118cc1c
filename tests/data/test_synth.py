"""The synthetic source: determinism, boxes on the lesions, balance, texts, complementarity."""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from medfusion.config import SynthConfig
from medfusion.data import synth
from medfusion.data.tokenizer import split_words

CLASSES = SynthConfig().classes


def _cfg(**overrides) -> SynthConfig:
    return SynthConfig(**{"num_samples": 40, "image_size": 32, **overrides})


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def test_same_config_gives_identical_samples():
    assert list(synth.generate(_cfg(seed=3))) == list(synth.generate(_cfg(seed=3)))


def test_different_seed_gives_different_samples():
    a, b = list(synth.generate(_cfg(seed=3))), list(synth.generate(_cfg(seed=4)))
    assert sum(x.image != y.image for x, y in zip(a, b)) == len(a)
    assert sum(x.report != y.report for x, y in zip(a, b)) > len(a) // 2


def test_a_shorter_run_is_a_prefix_of_a_longer_one():
    short = list(synth.generate(_cfg(num_samples=13)))
    long = list(synth.generate(_cfg(num_samples=40)))
    assert long[:13] == short


def test_image_size_changes_pixels_only():
    small, large = synth.generate(_cfg(image_size=32)), synth.generate(_cfg(image_size=48))
    for a, b in zip(small, large):
        assert (a.sample_id, a.patient_id, a.report, a.findings, a.labels) == (
            b.sample_id,
            b.patient_id,
            b.report,
            b.findings,
            b.labels,
        )
        assert (a.box is None) == (b.box is None)


def test_ids_and_patients():
    samples = list(synth.studies(_cfg(num_samples=600, images_per_patient=3)))
    assert len({s.sample_id for s in samples}) == 600
    assert samples[0].sample_id == "syn-000000"
    per_patient = Counter(s.patient_id for s in samples)
    assert all(pid.startswith("P") and len(pid) == 7 for pid in per_patient)
    assert 2.4 <= 600 / len(per_patient) <= 3.6
    ages: dict[str, set[str]] = {}
    for s in samples:  # demographics are the patient's, on every study (the note's first number)
        ages.setdefault(s.patient_id, set()).add(re.search(r"\d+", s.report).group())
    assert all(len(v) == 1 for v in ages.values())


# --------------------------------------------------------------------------------------------
# Images and boxes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 64, 128])
def test_images_decode_to_grayscale_of_the_configured_size(size):
    for sample in synth.generate(_cfg(num_samples=8, image_size=size)):
        with Image.open(io.BytesIO(sample.image)) as img:
            assert (img.format, img.mode, img.size) == ("PNG", "L", (size, size))
        assert (sample.height, sample.width) == (size, size)
        if sample.box is not None:
            x0, y0, x1, y1 = sample.box
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0


def test_boxes_enclose_the_lesion_tightly():
    """The lesion is what changes when it is removed from the same study (same patient, pose, noise)."""
    size = 64
    cfg = _cfg(num_samples=210, image_size=size, seed=5)
    kinds = Counter()
    for study, sample in zip(synth.studies(cfg), synth.generate(cfg)):
        label = CLASSES[study.class_index]
        if study.lesion is None:
            assert label == "normal" and sample.box is None
            continue
        film, mask = synth.render(study, size)
        plain, _ = synth.render(replace(study, lesion=None), size)
        assert sample.box == synth.box_from_mask(mask)
        x0, y0, x1, y1 = (round(c * size) for c in sample.box)
        diff = film.astype(int) - plain.astype(int)
        grown = np.zeros((size, size), dtype=bool)
        grown[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
        # the lesion is in the box ...
        assert np.abs(diff)[grown].sum() >= 0.8 * np.abs(diff).sum(), (study.sample_id, label)
        assert diff[y0:y1, x0:x1].mean() >= 5, (study.sample_id, label)  # lesions are dense: brighter
        # ... and touches each of its edges (the box is no larger than the lesion)
        edges = [diff[y0, x0:x1], diff[y1 - 1, x0:x1], diff[y0:y1, x0], diff[y0:y1, x1 - 1]]
        assert all(np.abs(edge).max() >= 2 for edge in edges), (study.sample_id, label)
        kinds[study.lesion.kind] += 1
    assert set(kinds) == {"consolidation", "nodule", "effusion", "cardiomegaly"}


@pytest.mark.parametrize(
    "label, kind, zones",
    [
        ("pneumonia", "consolidation", synth.LUNG_ZONES),
        ("tuberculosis", "consolidation", synth.LUNG_ZONES),
        ("benign_nodule", "nodule", synth.LUNG_ZONES),
        ("malignant_nodule", "nodule", synth.LUNG_ZONES),
        ("pleural_effusion", "effusion", synth.BASE_ZONES),
        ("cardiomegaly", "cardiomegaly", (synth.CARDIAC,)),
    ],
)
def test_lesion_kind_and_zone_per_class(label, kind, zones):
    for study in synth.studies(_cfg(num_samples=300)):
        if CLASSES[study.class_index] == label:
            assert study.lesion.kind == kind and study.lesion.zone in zones


def test_lesion_side_matches_zone():
    """PA view: the patient's right is the image's left."""
    size = 64
    cfg = _cfg(num_samples=150, image_size=size)
    for study, sample in zip(synth.studies(cfg), synth.generate(cfg)):
        if study.lesion is None or study.lesion.kind == "cardiomegaly":
            continue
        centre_x = (sample.box[0] + sample.box[2]) / 2
        assert (centre_x < 0.5) == study.lesion.zone.startswith("right"), study.sample_id


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, n",
    [
        ([], 1000),
        ([3, 1, 1, 1, 1, 1, 1], 1800),
        ([1, 0, 2, 1, 1, 1, 1], 1400),
    ],
)
def test_class_frequencies_follow_the_weights(weights, n):
    counts = Counter(s.label for s in synth.studies(_cfg(num_samples=n, class_weights=weights)))
    w = np.asarray(weights or [1] * len(CLASSES), dtype=float)
    expected = w / w.sum() * n
    for index, exp in enumerate(expected):
        assert abs(counts[index] - exp) <= max(8, 0.03 * exp), (CLASSES[index], counts[index], exp)


def test_class_subset_and_order():
    cfg = _cfg(num_samples=60, classes=["cardiomegaly", "normal"])
    assert synth.class_names(cfg) == ["cardiomegaly", "normal"]
    for study in synth.studies(cfg):
        assert (study.lesion is None) == (study.label == 1)


def test_label_noise_changes_only_that_fraction_of_labels():
    clean = list(synth.studies(_cfg(num_samples=2000, label_noise=0.0)))
    noisy = list(synth.studies(_cfg(num_samples=2000, label_noise=0.2)))
    changed = [a.label != b.label for a, b in zip(clean, noisy)]
    assert 0.17 <= np.mean(changed) <= 0.23
    assert all(a.label == a.class_index for a in clean)
    for a, b in zip(clean, noisy):  # the image and the texts stay as generated
        assert (a.report, a.findings, a.lesion, a.class_index) == (b.report, b.findings, b.lesion, b.class_index)


@pytest.mark.parametrize(
    "classes, match",
    [
        (["normal", "pneumothorax_x"], "'pneumothorax_x'"),
        (["covid", "normal", "flu"], "'covid', 'flu'"),
        (["normal", "bogus"], "known: normal, pneumonia, tuberculosis"),
    ],
)
def test_unknown_class_names_are_refused(classes, match):
    cfg = _cfg(classes=classes)
    with pytest.raises(ValueError, match=match):
        synth.class_names(cfg)
    with pytest.raises(ValueError, match=match):
        synth.generate(cfg)  # at the call, before any iteration


def test_all_zero_weights_are_refused():
    with pytest.raises(ValueError, match="class_weights"):
        synth.generate(_cfg(classes=["normal", "pneumonia"], class_weights=[0, 0]))


# --------------------------------------------------------------------------------------------
# Texts
# --------------------------------------------------------------------------------------------


def test_parse_findings_recovers_every_generated_finding():
    for study in synth.studies(_cfg(num_samples=4000, seed=9)):
        assert synth.parse_findings(study.findings) == set(study.intended), study.findings


def test_texts_fit_the_tiny_preset_untruncated():
    for study in synth.studies(_cfg(num_samples=2000)):
        assert len(split_words(study.report)) <= 48, study.report
        assert len(split_words(study.findings)) <= 38, study.findings


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the lungs are clear. no pleural effusion or pneumothorax.", {("normal", "")}),
        ("no focal consolidation. the heart is not enlarged.", {("normal", "")}),
        (
            "there is a 2.1 cm smooth nodule in the left upper zone. no focal consolidation.",
            {("nodule", "left upper zone")},
        ),
        (
            "a rounded opacity measuring 1.4 cm is seen in the middle zone of the right lung.",
            {("nodule", "right mid zone")},
        ),
        ("small right pleural effusion with a meniscus. heart size is normal.", {("effusion", "right base")}),
        ("blunting of the left costophrenic angle. no consolidation.", {("effusion", "left base")}),
        ("cardiomegaly with a cardiothoracic ratio of 0.61. no effusion.", {("cardiomegaly", "cardiac")}),
        (
            "patchy airspace opacification in the right lower lung zone, no pleural effusion.",
            {("consolidation", "right lower zone")},
        ),
        (
            "Dense consolidation in the LEFT MID ZONE.\nEnlarged cardiac silhouette.",
            {("consolidation", "left mid zone"), ("cardiomegaly", "cardiac")},
        ),
        ("consolidation. no nodule.", {("consolidation", "")}),
        ("without pneumothorax, but there is a right pneumothorax.", {("pneumothorax", "right")}),
        ("negative for effusion; the heart is enlarged.", {("cardiomegaly", "cardiac")}),
        ("", set()),
        ("the patient is a 60-year-old man.", set()),
    ],
)
def test_parse_findings_table(text, expected):
    assert synth.parse_findings(text) == expected


def test_findings_describe_the_image_not_the_class():
    """Look-alikes share one description vocabulary, and no findings text names a diagnosis."""
    words: dict[str, set[str]] = {}
    for study in synth.studies(_cfg(num_samples=2800)):
        words.setdefault(CLASSES[study.class_index], set()).update(
            w for w in split_words(study.findings) if not w[0].isdigit()
        )
    assert words["pneumonia"] == words["tuberculosis"]
    assert words["benign_nodule"] == words["malignant_nodule"]
    diagnoses = {"pneumonia", "tuberculosis", "benign", "malignant", "malignancy", "infection", "granuloma"}
    assert not diagnoses & set().union(*words.values())


# --------------------------------------------------------------------------------------------
# Complementarity: neither modality alone is enough
# --------------------------------------------------------------------------------------------


def test_image_and_note_are_complementary():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    size, grid, n_train = 64, 8, 700
    samples = list(synth.generate(SynthConfig(num_samples=1000, image_size=size, seed=11)))
    y = np.array([s.labels[0] for s in samples])
    films = np.stack([np.asarray(Image.open(io.BytesIO(s.image)), dtype=np.float32) / 255 for s in samples])
    pooled = films.reshape(len(films), grid, size // grid, grid, size // grid).mean(axis=(2, 4)).reshape(len(films), -1)
    x_image = StandardScaler().fit(pooled[:n_train]).transform(pooled)
    vectorizer = CountVectorizer(binary=True).fit([s.report for s in samples[:n_train]])
    x_text = vectorizer.transform([s.report for s in samples]).toarray().astype(np.float64)

    def fit(x):
        model = LogisticRegression(C=0.1, max_iter=500).fit(x[:n_train], y[:n_train])
        return model, float((model.predict(x[n_train:]) == y[n_train:]).mean())

    image_model, image_acc = fit(x_image)
    text_model, text_acc = fit(x_text)
    _, both_acc = fit(np.hstack([x_image, x_text]))
    print(f"complementarity: image {image_acc:.3f}, note {text_acc:.3f}, both {both_acc:.3f}")
    assert both_acc >= 0.85
    assert image_acc <= both_acc - 0.10 and text_acc <= both_acc - 0.10

    # The image alone cannot tell pneumonia from tuberculosis (chance is 0.5) ...
    test_y, proba = y[n_train:], image_model.predict_proba(x_image[n_train:])
    pair = [CLASSES.index("pneumonia"), CLASSES.index("tuberculosis")]
    rows = np.isin(test_y, pair)
    assert np.mean(np.array(pair)[proba[rows][:, pair].argmax(1)] == test_y[rows]) <= 0.7
    # ... and the note alone cannot tell normal, effusion and cardiomegaly apart (chance is 1/3).
    triple = [CLASSES.index(c) for c in ("normal", "pleural_effusion", "cardiomegaly")]
    proba = text_model.predict_proba(x_text[n_train:])
    rows = np.isin(test_y, triple)
    assert np.mean(np.array(triple)[proba[rows][:, triple].argmax(1)] == test_y[rows]) <= 0.55
