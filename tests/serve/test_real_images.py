"""Real radiographs end to end (issue 17): 40 NIH ChestX-ray14 films (tests/data/nih40, 512 px, NIH's
own box list) go through ingest -> 1-epoch training -> evaluation -> a served model answering
/v1/predict over HTTP for a real 512-px PNG. The same films in the IU X-Ray layout, with report text
as radiologists write it, train the note-reading model and score its generated findings.

These data have no text (NIH) or real-looking text (IU): what the synthetic generator never exercises.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import httpx
import pytest

from medfusion import storage
from medfusion.config import EvaluateConfig, PrepareConfig, SplitConfig
from medfusion.data.dataset import open_dataset
from medfusion.data.prepare import run_prepare
from medfusion.evaluate import run_evaluate
from medfusion.train import load_train_config, run_train

NIH40 = Path(__file__).resolve().parents[1] / "data" / "nih40"
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltrate", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
# Hold out enough patients of 33 that val and test both have films (a split is chosen by patient hash).
SPLIT = SplitConfig(val=0.2, test=0.2)
TRAIN = [
    "epochs=1",
    "num_workers=1",
    "cpus_per_worker=1",
    "strategy=ddp",
    "data.image_size=128",
    "data.batch_size=8",
    "lr=1e-3",
    "warmup_steps=1",
    "seed=0",
    "shuffle_buffer=0",
]


def _ingest_train_evaluate(source: str, source_uri: Path, root: Path, fusion: str):
    """The README's path on a small source: ingest, train an epoch, evaluate the test split."""
    data = run_prepare(
        PrepareConfig(source=source, source_uri=str(source_uri), output_uri=str(root / "data"), split=SPLIT)
    )
    overrides = [f"dataset_uri={data.dataset_uri}", f"storage_uri={root / 'runs'}", f"name={source}"]
    cfg = load_train_config(preset="tiny", overrides=[*overrides, *TRAIN, f"model.fusion={fusion}"])
    run = run_train(cfg)
    evaluation = run_evaluate(EvaluateConfig(model_uri=run.model_uri, data_uri=data.dataset_uri, split="test"))
    return data, run, evaluation


@pytest.fixture(scope="module")
def nih(tmp_path_factory, ray_local):
    """The NIH slice ingested, trained image-only for an epoch and evaluated on its test split."""
    return _ingest_train_evaluate("nih", NIH40, tmp_path_factory.mktemp("nih40"), "image_only")


def test_nih_box_list_ingests_every_film_with_a_box_per_finding(nih):
    data, _, _ = nih
    info = open_dataset(data.dataset_uri)
    assert data.classes == FINDINGS and info.multi_label and data.rejected == 0
    assert sum(data.rows.values()) == 40 and all(data.rows[s] > 0 for s in ("train", "val", "test"))
    with (NIH40 / "bbox.csv").open() as f:
        boxes = sum(1 for _ in csv.reader(f)) - 1
    assert sum(s["boxes"] for s in info.manifest["splits"].values()) == boxes
    assert info.manifest["source"]["type"] == "nih" and info.manifest["text_words"]["report"]["count"] == 0


def test_an_image_and_labels_only_dataset_trains_without_text(nih):
    _, run, _ = nih
    metrics = json.loads(storage.read_text(run.metrics_uri))
    config = json.loads(storage.read_text(storage.join(run.model_uri, "config.json")))
    assert config["model"]["describes"] is False and config["model"]["fusion"] == "image_only"
    assert config["vocab_size"] == 4, "no vocabulary beyond the special tokens"
    last = metrics["history"][-1]
    assert last["val_bleu4"] is None, "no findings to score: undefined, not 0.0"
    assert last["val_text_loss"] is None, "no decoder loss: undefined, not 0.0"
    assert last["val_mean_iou"] > 0 and last["val_auroc_macro"] is not None


def test_evaluation_reports_text_metrics_as_null_with_the_reason_and_boxes_per_class(nih):
    _, _, evaluation = nih
    record = json.loads(storage.read_text(evaluation.metrics_uri))
    metrics = record["metrics"]
    for name in ("bleu4", "rouge_l"):
        assert metrics[name] is None, f"{name} must be null (not 0.0) without findings"
        assert "no findings text" in record["undefined"][name]
    assert set(record["per_class_iou"]) == set(FINDINGS) and record["num_boxes"] > 0
    assert set(record["iou_share"]) == {"0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7"}
    assert record["baselines"]["class_mean_box"]["box_mean_iou"] is not None
    lo, hi = record["ci"]["auroc_macro"]
    assert lo <= metrics["auroc_macro"] <= hi


def test_the_served_nih_model_answers_a_real_512_px_film(nih, deploy):
    _, run, _ = nih
    url = deploy("nih40", model=run.model_uri, num_cpus=0.25)
    film = sorted((NIH40 / "images").glob("*.png"))[0]
    with httpx.Client(timeout=60) as client:
        response = client.post(
            f"{url}/v1/predict",
            files={"image": (film.name, film.read_bytes(), "image/png")},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image_size"] == {"width": 512, "height": 512}
    assert {label["name"] for label in body["labels"]} == set(FINDINGS)
    assert body["findings"] is None, "a model trained without findings says nothing, not an untrained decoder's words"
    x0, y0, x1, y1 = body["box"]["xyxy"]
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512
    assert all(box["label"] in FINDINGS and box["score"] >= 0.5 for box in body["boxes"])


# ----------------------------------------------------------------------------- IU X-Ray layout

# What radiologists write for each finding (indication = the note before the read; findings and
# impression = the description the decoder learns).
IU_TEXT = {
    "Atelectasis": ("Shortness of breath.", "Linear opacity at the left base, likely subsegmental atelectasis."),
    "Cardiomegaly": ("Chest pain, hypertension.", "The heart is enlarged. Mediastinal contours are otherwise normal."),
    "Effusion": ("Dyspnea.", "Blunting of the right costophrenic angle consistent with a small pleural effusion."),
    "Infiltrate": ("Fever and cough.", "Patchy airspace opacity in the right lower lobe."),
    "Mass": ("Weight loss, smoker.", "A 4 cm mass projects over the left upper lobe. CT is recommended."),
    "Nodule": ("Follow-up of a lung nodule.", "A 9 mm nodule in the right midlung is unchanged."),
    "Pneumonia": ("Productive cough and fever for 3 days.", "Consolidation of the left lower lobe, pneumonia."),
    "Pneumothorax": ("Sudden pleuritic chest pain.", "A small right apical pneumothorax. No mediastinal shift."),
}


@pytest.fixture(scope="module")
def iu(tmp_path_factory, ray_local):
    """The same films in the IU X-Ray layout (indiana_reports.csv, indiana_projections.csv, images/)."""
    root = tmp_path_factory.mktemp("iu40")
    (root / "images").mkdir()
    first_finding: dict[str, str] = {}
    with (NIH40 / "bbox.csv").open() as f:
        for row in list(csv.reader(f))[1:]:
            first_finding.setdefault(row[0], row[1])
    with (root / "indiana_reports.csv").open("w", newline="") as f:
        reports = csv.writer(f)
        reports.writerow(["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"])
        for uid, (_name, finding) in enumerate(sorted(first_finding.items()), start=1):
            indication, described = IU_TEXT[finding]
            reports.writerow(
                [uid, finding, finding, "Xray Chest PA", indication, "None.", described, "No acute change."]
            )
    with (root / "indiana_projections.csv").open("w", newline="") as f:
        projections = csv.writer(f)
        projections.writerow(["uid", "filename", "projection"])
        for uid, name in enumerate(sorted(first_finding), start=1):
            (root / "images" / f"{uid}_IM-{uid:04d}-1001.dcm.png").write_bytes((NIH40 / "images" / name).read_bytes())
            projections.writerow([uid, f"{uid}_IM-{uid:04d}-1001.dcm.png", "Frontal"])
    return _ingest_train_evaluate("iu_xray", root, root, "gated")


def test_iu_xray_reports_train_the_note_reader_and_the_decoder(iu):
    data, run, evaluation = iu
    info = open_dataset(data.dataset_uri)
    words = info.manifest["text_words"]
    assert words["report"]["count"] == words["findings"]["count"] == 40
    config = json.loads(storage.read_text(storage.join(run.model_uri, "config.json")))
    assert config["model"]["describes"] is True and config["vocab_size"] > 40
    record = json.loads(storage.read_text(evaluation.metrics_uri))
    assert isinstance(record["metrics"]["bleu4"], float) and "bleu4" not in record.get("undefined", {})
    assert record["num_boxes"] == 0 and record["metrics"]["mean_iou"] is None, "IU X-Ray has no boxes"
