"""Ingestion of real sources: the generic manifest (CSV and JSONL) and the IU X-Ray layout.

Every test builds its source in tmp_path: a handful of good rows in each image format and one
broken row of every kind, so a test reads as "this row comes out like this, that one is rejected
for that reason".
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_files import deflate_bomb, dicom_file
from medfusion.config import ConfigError, PrepareConfig, SplitConfig
from medfusion.data.images import decode_image, sniff_format
from medfusion.data.ingest import MANIFEST_COLUMNS, IngestError, Rejection, open_source

W, H = 64, 48  # every test image is 64 wide, 48 high
PIXELS = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (H, 1))


def png(pixels: np.ndarray = PIXELS) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(pixels: np.ndarray = PIXELS) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_images(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(png())
    (root / "img" / "b.jpg").write_bytes(jpeg())
    (root / "img" / "c.dcm").write_bytes(dicom_file(PIXELS.astype(np.uint16) * 16))
    (root / "img" / "garbage.png").write_bytes(b"definitely not a picture" * 4)


CLASSES = ["effusion", "normal", "pneumonia"]

# [image, labels, report, findings, box, patient_id, split]; row numbers are 1-based, header excluded
MANIFEST_ROWS = [
    ("img/a.png", "pneumonia", "cough for 3 days", "patchy opacity right lower lobe", "8 6 40 30", "p1", "train"),
    ("img/b.jpg", "pneumonia|effusion", "fever", "", "", "p2", ""),
    ("img/c.dcm", "normal", "", "clear lungs", "", "p3", "Test"),
    ("img/missing.png", "normal", "", "", "", "p4", ""),
    ("img/garbage.png", "normal", "", "", "", "p5", ""),
    ("img/a.png", "pneumonia", "", "", "10 5 900 40", "p6", ""),
    ("img/a.png", "cancer", "", "", "", "p7", ""),
    ("img/a.png", "normal", "", "", "", "p8", "holdout"),
    ("img/a.png", " | ", "", "", "", "p9", ""),
    ("img/a.png", "normal", "", "", "1 2 3", "p10", ""),
    ("img/a.png", "normal", "", "", "30 5 10 25", "p11", ""),
    ("", "normal", "", "", "", "p12", ""),
]
GOOD_ROWS = (1, 2, 3)
# row -> words its rejection reason must contain
REJECTED = {
    4: "image 'img/missing.png': no such file",
    5: "image 'img/garbage.png' cannot be decoded: not a PNG, JPEG or DICOM",
    6: "box [10, 5, 900, 40] outside the 64x48 image",
    7: "unknown label 'cancer' (known: effusion, normal, pneumonia)",
    8: "split 'holdout' is not one of train, val, test",
    9: "no labels",
    10: "malformed box '1 2 3'",
    11: "degenerate box [30, 5, 10, 25]",
    12: "no image",
}


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def as_jsonl_record(row: tuple) -> dict:
    """The same row in JSONL form: box as a list, labels as a list when there are several."""
    image, labels, report, findings, box, patient_id, split = row
    record: dict = {"image": image, "labels": labels.split("|") if "|" in labels and labels.strip(" |") else labels}
    if report:
        record["report"] = report
    if findings:
        record["findings"] = findings
    if box:
        parts = box.split()
        record["box"] = [float(p) for p in parts] if len(parts) == 4 else box
    if patient_id:
        record["patient_id"] = patient_id
    if split:
        record["split"] = split
    return record


@pytest.fixture(params=["csv", "jsonl"])
def manifest(request, tmp_path) -> Path:
    write_images(tmp_path)
    if request.param == "csv":
        path = tmp_path / "cohort.csv"
        write_csv(path, list(MANIFEST_COLUMNS), MANIFEST_ROWS)
    else:
        path = tmp_path / "cohort.jsonl"
        path.write_text("".join(json.dumps(as_jsonl_record(r)) + "\n" for r in MANIFEST_ROWS))
    return path


def manifest_cfg(path: Path | str, **kwargs) -> PrepareConfig:
    """Most tables here leave patient_id out, so they split per image unless a test says otherwise."""
    kwargs.setdefault("split", SplitConfig(unit="image"))
    return PrepareConfig(source="manifest", source_uri=str(path), **kwargs)


def test_manifest_good_rows_become_samples(manifest):
    source = open_source(manifest_cfg(manifest, classes=CLASSES))
    samples = {s.sample_id: s for s in source}

    assert source.classes == CLASSES
    assert source.multi_label
    assert source.total_rows == len(MANIFEST_ROWS)
    assert sorted(samples) == [f"cohort-{row}" for row in GOOD_ROWS]

    a, b, c = samples["cohort-1"], samples["cohort-2"], samples["cohort-3"]
    assert a.labels == [2] and a.patient_id == "p1" and a.split == "train"
    assert a.report == "cough for 3 days" and a.findings == "patchy opacity right lower lobe"
    assert a.box == pytest.approx((8 / W, 6 / H, 40 / W, 30 / H))
    assert b.labels == [0, 2] and b.box is None and b.split is None
    assert b.report == "fever" and b.findings == "", "no findings is no target, never the note copied"
    assert c.labels == [1] and c.split == "test" and c.report == "" and c.findings == "clear lungs"

    for sample in (a, b, c):
        assert (sample.height, sample.width) == (H, W)
        assert sniff_format(sample.image) in ("png", "jpeg")
        assert decode_image(sample.image).shape == (H, W)
    assert a.image == (manifest.parent / "img" / "a.png").read_bytes(), "an 8-bit grey PNG is stored as is"
    assert sniff_format(c.image) == "png", "DICOM is stored as PNG"
    assert np.array_equal(decode_image(a.image), PIXELS)


def test_manifest_bad_rows_are_rejected_with_row_and_reason(manifest):
    source = open_source(manifest_cfg(manifest, classes=CLASSES))
    list(source)

    rejected = {r.row: r for r in source.rejected}
    assert sorted(rejected) == sorted(REJECTED)
    for row, words in REJECTED.items():
        assert words in rejected[row].reason, f"row {row}: {rejected[row].reason!r}"
        assert rejected[row].source == str(manifest)
    assert rejected[4].image == "img/missing.png"
    assert rejected[4].to_json() == {
        "row": 4,
        "source": str(manifest),
        "reason": rejected[4].reason,
        "image": "img/missing.png",
    }


def test_manifest_classes_inferred_sorted_from_the_table(manifest):
    source = open_source(manifest_cfg(manifest))
    samples = list(source)

    assert source.classes == ["cancer", "effusion", "normal", "pneumonia"]
    assert {s.sample_id: s.labels for s in samples}["cohort-2"] == [1, 3]
    assert 7 not in {r.row for r in source.rejected}, "with inferred classes no label is unknown"


def test_manifest_resize_keeps_box_relative_to_the_original(manifest):
    source = open_source(manifest_cfg(manifest, classes=CLASSES, image_size=32))
    samples = {s.sample_id: s for s in source}

    a = samples["cohort-1"]
    assert (a.height, a.width) == (32, 32)
    assert decode_image(a.image).shape == (32, 32)
    assert a.box == pytest.approx((8 / W, 6 / H, 40 / W, 30 / H))
    assert all(sniff_format(s.image) == "png" for s in samples.values())


def test_iterating_twice_gives_the_same_result(manifest):
    source = open_source(manifest_cfg(manifest, classes=CLASSES))
    first = [s.sample_id for s in source]
    first_rejected = list(source.rejected)
    assert [s.sample_id for s in source] == first
    assert source.rejected == first_rejected, "rejections are recounted, not appended, on each pass"


def test_single_reader_thread_gives_the_same_samples(manifest):
    threaded = list(open_source(manifest_cfg(manifest, classes=CLASSES), workers=4))
    serial_source = open_source(manifest_cfg(manifest, classes=CLASSES), workers=1)
    serial = list(serial_source)
    assert [s.row() for s in serial] == [s.row() for s in threaded]
    assert len(serial_source.rejected) == len(REJECTED)


def test_long_texts_are_truncated_and_counted(tmp_path):
    write_images(tmp_path)
    path = tmp_path / "long.csv"
    write_csv(
        path,
        ["image", "labels", "report", "findings"],
        [
            ("img/a.png", "normal", "x" * 50, "y" * 50),
            ("img/a.png", "normal", "z" * 50, ""),
            ("img/a.png", "normal", "ok", ""),
        ],
    )
    source = open_source(manifest_cfg(path, max_report_chars=20))
    samples = list(source)

    assert [len(s.report) for s in samples] == [20, 20, 2]
    assert [len(s.findings) for s in samples] == [20, 0, 0], "no findings stays empty, never the note"
    assert source.truncated_texts == 3
    assert not source.multi_label


def test_csv_details_bom_case_blank_lines_and_extra_fields(tmp_path):
    write_images(tmp_path)
    path = tmp_path / "excel.csv"
    text = "Image,Labels,Patient_ID\r\nimg/a.png,normal,\r\n\r\nimg/b.jpg,normal,p9,surplus\r\nimg/c.dcm,normal\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    source = open_source(manifest_cfg(path))
    samples = list(source)

    assert [s.sample_id for s in samples] == ["excel-1", "excel-4"]
    assert source.total_rows == 3, "blank lines are not rows"
    assert [(r.row, r.reason) for r in source.rejected] == [(3, "row has 4 fields, the header has 3")]


def test_jsonl_details_line_numbers_and_broken_lines(tmp_path):
    write_images(tmp_path)
    path = tmp_path / "notes.jsonl"
    lines = [
        json.dumps({"image": "img/a.png", "labels": ["normal"], "box": [1, 2, 30, 40], "patient_id": 17}),
        "",
        "{not json",
        json.dumps(["img/a.png", "normal"]),
        json.dumps({"image": "img/a.png", "labels": "normal", "box": None, "report": None}),
        json.dumps({"image": "img/a.png", "labels": "normal", "box": [1, 2, "x", 4]}),
        json.dumps({"image": "img/a.png", "labels": "normal", "report": {"text": "no"}}),
        json.dumps({"labels": "normal"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    source = open_source(manifest_cfg(path))
    samples = list(source)

    assert [s.sample_id for s in samples] == ["notes-1", "notes-5"]
    assert samples[0].patient_id == "17" and samples[0].box == pytest.approx((1 / W, 2 / H, 30 / W, 40 / H))
    assert samples[1].box is None and samples[1].report == ""
    reasons = {r.row: r.reason for r in source.rejected}
    assert sorted(reasons) == [3, 4, 6, 7, 8]
    assert reasons[3].startswith("not valid JSON")
    assert reasons[4] == "expected a JSON object, got list"
    assert "malformed box" in reasons[6]
    assert "column 'report' must be text" in reasons[7]
    assert "no image" in reasons[8]


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("no-labels.csv", "image,report\nimg/a.png,hi\n", ["missing required column 'labels'", "'image', 'report'"]),
        ("no-image.csv", "path,labels\nimg/a.png,normal\n", ["missing required column 'image'", "'path', 'labels'"]),
        (
            "no-image.jsonl",
            '{"path": "img/a.png", "labels": "normal"}\n',
            ["missing required column 'image'", "'labels', 'path'"],
        ),
        ("empty.csv", "", ["empty file"]),
        ("blank.jsonl", "\n\n", ["empty file"]),
        ("header-only.csv", "image,labels\n", ["no data rows"]),
        ("twice.csv", "image,labels,Labels\nimg/a.png,a,b\n", ["'labels' appear more than once"]),
        ("table.txt", "image,labels\n", ["unsupported extension '.txt'"]),
    ],
)
def test_whole_manifest_problems_raise_ingest_error(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(IngestError) as info:
        open_source(manifest_cfg(path))
    for word in words:
        assert word in str(info.value)


def test_missing_manifest_raises_ingest_error(tmp_path):
    with pytest.raises(IngestError, match="no such file"):
        open_source(manifest_cfg(tmp_path / "nowhere.csv"))


def test_image_paths_absolute_and_unsupported_schemes(tmp_path):
    write_images(tmp_path)
    path = tmp_path / "sub" / "m.csv"
    path.parent.mkdir()
    write_csv(
        path,
        ["image", "labels"],
        [
            (str(tmp_path / "img" / "a.png"), "normal"),
            ("../img/b.jpg", "normal"),
            ("http://x/y.png", "normal"),
            ("../img", "normal"),
        ],
    )
    source = open_source(manifest_cfg(path))
    assert [s.sample_id for s in source] == ["m-1", "m-2"]
    assert [(r.row, r.reason) for r in source.rejected] == [
        (3, "image 'http://x/y.png': only local paths and s3:// URIs are supported"),
        (4, "image '../img': not a file"),
    ]


@pytest.mark.parametrize(
    "manifest_uri, reference, expected",
    [
        ("s3://bucket/cohort/m.csv", "img/a.png", "s3://bucket/cohort/img/a.png"),
        ("s3://bucket/cohort/m.csv", "./img/../img/a.png", "s3://bucket/cohort/img/a.png"),
        ("s3://bucket/cohort/m.csv", "../shared/a.png", "s3://bucket/shared/a.png"),
        ("s3://bucket/cohort/m.csv", "s3://other/a.dcm", "s3://other/a.dcm"),
        ("/data/cohort/m.csv", "img/a.png", "/data/cohort/img/a.png"),
        ("/data/cohort/m.csv", "s3://other/a.dcm", "s3://other/a.dcm"),
        ("/data/cohort/m.csv", "/elsewhere/a.png", "/elsewhere/a.png"),
    ],
)
def test_image_references_resolve_against_the_manifest_folder(manifest_uri, reference, expected):
    from medfusion import storage
    from medfusion.data.ingest import _resolve

    assert _resolve(storage.parent(manifest_uri), reference) == expected


def test_open_source_refuses_synthetic():
    with pytest.raises(IngestError, match="not a file source"):
        open_source(PrepareConfig(source="synthetic"))


def test_rejection_to_json_is_plain_data():
    r = Rejection(row=3, source="m.csv", reason="no labels (column 'labels' is empty)")
    assert json.loads(json.dumps(r.to_json())) == {"row": 3, "source": "m.csv", "reason": r.reason, "image": ""}


# --------------------------------------------------------------------------------------------
# IU X-Ray / OpenI
# --------------------------------------------------------------------------------------------

IU_REPORTS = [
    # uid, MeSH, Problems, image, indication, comparison, findings, impression
    (
        "1",
        "normal",
        "normal",
        "Xray Chest PA and Lateral",
        "Positive TB test",
        "None.",
        "The heart is normal in size.",
        "Normal chest x-XXXX.",
    ),
    (
        "2",
        "Cardiomegaly/mild",
        "Cardiomegaly;Pulmonary Atelectasis; Cardiomegaly",
        "Chest 2 views",
        "XXXX-year-old with dyspnea",
        "",
        "Heart size is enlarged.",
        "",
    ),
    ("3", "Opacity/lung", "Opacity", "PA and lateral", "", "", "NaN", "Right basilar opacity."),
    ("5", "normal", "", "PA", "chest pain", "", "", "No acute disease."),
]
IU_PROJECTIONS = [
    # uid, filename, projection
    ("1", "1_IM-0001-4001.dcm.png", "Frontal"),
    ("1", "1_IM-0001-3001.dcm.png", "Lateral"),
    ("2", "2_IM-0652-1001.dcm.png", "Frontal"),  # missing on disk
    ("3", "3_IM-1384-1001.dcm.png", "Frontal"),  # in images/ instead of images/images_normalized/
    ("3", "3_IM-1384-2001.dcm.png", "Lateral"),
    ("4", "4_IM-2050-1001.dcm.png", "Frontal"),  # no report
    ("5", "5_IM-2117-1001.dcm.png", "Frontal"),  # empty Problems
]


@pytest.fixture
def iu_folder(tmp_path) -> Path:
    root = tmp_path / "iu"
    normalized = root / "images" / "images_normalized"
    normalized.mkdir(parents=True)
    write_csv(
        root / "indiana_reports.csv",
        ["uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression"],
        IU_REPORTS,
    )
    write_csv(root / "indiana_projections.csv", ["uid", "filename", "projection"], IU_PROJECTIONS)
    for uid, filename, _ in IU_PROJECTIONS:
        if uid in ("1", "4", "5"):
            (normalized / filename).write_bytes(png())
    (root / "images" / "3_IM-1384-1001.dcm.png").write_bytes(png(PIXELS[:, ::-1].copy()))
    (root / "images" / "3_IM-1384-2001.dcm.png").write_bytes(png())
    return root


def iu_cfg(root: Path | str, **kwargs) -> PrepareConfig:
    return PrepareConfig(source="iu_xray", source_uri=str(root), **kwargs)


def test_iu_xray_frontal_only_mapping(iu_folder):
    source = open_source(iu_cfg(iu_folder))
    samples = {s.sample_id: s for s in source}

    assert sorted(samples) == ["iu-1-1", "iu-3-1"]
    assert source.total_rows == 5, "the frontal projections"
    # uid 2 (the only multi-label study) has no image and uid 4 no report: their labels are no classes
    assert source.classes == ["Opacity", "normal"]
    assert not source.multi_label

    one = samples["iu-1-1"]
    assert one.patient_id == "1" and one.labels == [1] and one.box is None and one.split is None
    assert one.report == "Positive TB test"
    assert one.findings == "The heart is normal in size. Normal chest x-XXXX."
    assert (one.height, one.width) == (H, W)

    three = samples["iu-3-1"]
    assert three.report == "" and three.findings == "Right basilar opacity.", "NaN parts are skipped"
    assert np.array_equal(decode_image(three.image), PIXELS[:, ::-1]), "found in images/, the flat layout"

    rejected = {r.row: r for r in source.rejected}
    assert sorted(rejected) == [3, 6, 7]
    assert rejected[3].reason.startswith("image '2_IM-0652-1001.dcm.png': no such file")
    assert rejected[3].image == "2_IM-0652-1001.dcm.png"
    assert rejected[3].source.endswith("indiana_projections.csv")
    assert rejected[6].reason == "no report with uid 4 in indiana_reports.csv"
    assert rejected[7].reason == "no labels (Problems of uid 5 is empty)"


def test_iu_xray_all_projections(iu_folder):
    source = open_source(iu_cfg(iu_folder, iu_frontal_only=False))
    samples = {s.sample_id: s for s in source}

    assert sorted(samples) == ["iu-1-1", "iu-1-2", "iu-3-1", "iu-3-2"]
    assert source.total_rows == len(IU_PROJECTIONS)
    assert samples["iu-1-2"].patient_id == samples["iu-1-1"].patient_id == "1"


def test_iu_xray_labels_deduplicated_and_checked_against_given_classes(iu_folder):
    (iu_folder / "images" / "images_normalized" / "2_IM-0652-1001.dcm.png").write_bytes(png())
    source = open_source(iu_cfg(iu_folder, classes=["normal", "Cardiomegaly", "Pulmonary Atelectasis"]))
    samples = {s.sample_id: s for s in source}

    assert source.multi_label
    assert samples["iu-2-1"].labels == [1, 2], "'Cardiomegaly' twice in Problems is one label"
    assert samples["iu-2-1"].report == "XXXX-year-old with dyspnea"
    assert samples["iu-2-1"].findings == "Heart size is enlarged."
    assert {r.row: r.reason for r in source.rejected}[4].startswith("unknown label 'Opacity' (known: normal, ")


@pytest.mark.parametrize(
    "remove, rewrite, words",
    [
        ("indiana_reports.csv", None, "indiana_reports.csv not found"),
        ("indiana_projections.csv", None, "indiana_projections.csv not found"),
        (None, ("indiana_projections.csv", "uid,file,projection\n1,a.png,Frontal\n"), "missing required column 'filen"),
        (None, ("indiana_reports.csv", "uid,findings\n1,x\n"), "missing required column 'problems'"),
        (None, ("indiana_projections.csv", "uid,filename,projection\n1,a.png,Lateral\n"), "no images"),
    ],
)
def test_iu_xray_whole_source_problems(iu_folder, remove, rewrite, words):
    if remove:
        (iu_folder / remove).unlink()
    if rewrite:
        (iu_folder / rewrite[0]).write_text(rewrite[1])
    with pytest.raises(IngestError, match=words):
        open_source(iu_cfg(iu_folder))


def test_iu_xray_missing_folder(tmp_path):
    with pytest.raises(IngestError, match="no such folder"):
        open_source(iu_cfg(tmp_path / "absent"))


# --------------------------------------------------------------------------------------------
# The same sources on the S3 store: relative references resolve against the manifest's prefix
# --------------------------------------------------------------------------------------------


def upload_folder(folder: Path, prefix: str) -> None:
    from medfusion import storage

    storage.ensure_bucket(prefix)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(prefix, *path.relative_to(folder).parts), path.read_bytes())


@pytest.mark.integration
def test_manifest_and_iu_xray_on_s3(tmp_path, iu_folder, s3_prefix):
    cohort = tmp_path / "cohort"
    write_images(cohort)
    rows = [("img/a.png", "normal", "8 6 40 30"), ("img/missing.png", "normal", "")]
    write_csv(cohort / "m.csv", ["image", "labels", "box"], rows)
    upload_folder(cohort, f"{s3_prefix}/cohort")
    upload_folder(iu_folder, f"{s3_prefix}/iu")

    manifest = open_source(manifest_cfg(f"{s3_prefix}/cohort/m.csv"))
    samples = list(manifest)
    assert [s.sample_id for s in samples] == ["m-1"]
    assert samples[0].box == pytest.approx((8 / W, 6 / H, 40 / W, 30 / H))
    assert [(r.row, r.reason) for r in manifest.rejected] == [(2, "image 'img/missing.png': no such file")]

    iu = open_source(iu_cfg(f"{s3_prefix}/iu"))
    assert sorted(s.sample_id for s in iu) == ["iu-1-1", "iu-3-1"]
    assert sorted(r.row for r in iu.rejected) == [3, 6, 7]


def test_a_deflate_bomb_in_a_manifest_is_read_without_inflating_it(tmp_path):
    import tracemalloc

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png())
    # 64 frames of 64x64 declared, but a pixel element that inflates to 256 MiB: only the first frame,
    # the one ingest keeps, is inflated.
    (tmp_path / "img" / "bomb.dcm").write_bytes(deflate_bomb(frames=64, pixel_bytes=256 * 2**20))
    path = tmp_path / "m.csv"
    write_csv(path, ["image", "labels"], [("img/a.png", "normal"), ("img/bomb.dcm", "pneumonia")])
    tracemalloc.start()
    try:
        source = open_source(manifest_cfg(path, classes=CLASSES, image_size=32))
        samples = list(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [s.sample_id for s in samples] == ["m-1", "m-2"] and not source.rejected
    assert decode_image(samples[1].image).ndim == 2
    assert peak < 64 * 2**20, f"ingest held {peak / 2**20:.0f} MiB for a 256 MiB bomb"


def _patients_manifest(tmp_path: Path, splits: tuple[str, str, str]) -> PrepareConfig:
    """img/a.png and img/b.jpg of patient p1 and img/c.dcm of p2, with these splits."""
    write_images(tmp_path)
    images = [("img/a.png", "p1"), ("img/b.jpg", "p1"), ("img/c.dcm", "p2")]
    rows = [(image, "normal", patient, split) for (image, patient), split in zip(images, splits)]
    write_csv(tmp_path / "m.csv", ["image", "labels", "patient_id", "split"], rows)
    return manifest_cfg(tmp_path / "m.csv")


def test_a_patient_given_two_splits_is_refused_naming_the_patient_and_rows(tmp_path):
    with pytest.raises(IngestError) as info:
        open_source(_patients_manifest(tmp_path, ("train", "test", "val")))
    assert "1 patient(s) appear in more than one split" in str(info.value)
    assert "patient 'p1': train (rows 1); test (rows 2)" in str(info.value)


def test_rows_without_a_split_follow_their_patients_given_split(tmp_path):
    samples = list(open_source(_patients_manifest(tmp_path, ("test", "", ""))))
    assert [(s.patient_id, s.split) for s in samples] == [("p1", "test"), ("p1", "test"), ("p2", None)]


def test_box_format_xywh_reads_nih_style_boxes_as_corners(tmp_path):
    write_images(tmp_path)
    header = ["image", "labels", "box"]
    write_csv(tmp_path / "corners.csv", header, [("img/a.png", "normal", "8 6 40 30")])
    write_csv(tmp_path / "sizes.csv", header, [("img/a.png", "normal", "8 6 32 24")])
    (corners,) = list(open_source(manifest_cfg(tmp_path / "corners.csv")))
    (sizes,) = list(open_source(manifest_cfg(tmp_path / "sizes.csv", box_format="xywh")))
    assert corners.box is not None and sizes.box == corners.box


def test_a_wrong_box_format_is_refused_with_the_fix(tmp_path):
    # x y w h of lesions right of and below their size (w <= x, h <= y): as corners every box is degenerate.
    write_images(tmp_path)
    rows = [("img/a.png", "normal", f"{20 + i} 20 10 8") for i in range(6)]
    write_csv(tmp_path / "nih.csv", ["image", "labels", "box"], rows)
    with pytest.raises(IngestError) as info:
        open_source(manifest_cfg(tmp_path / "nih.csv"))
    message = str(info.value)
    assert "6 of 6 boxes are degenerate read as box_format=xyxy" in message
    assert "(first: row 1, degenerate box [20, 20, 10, 8]" in message
    assert "if the box column gives x y w h, set box_format=xywh" in message
    assert len(list(open_source(manifest_cfg(tmp_path / "nih.csv", box_format="xywh")))) == 6


def test_box_format_must_be_known():
    with pytest.raises(ConfigError, match="box_format: must be one of xyxy, xywh, got 'xyxz'"):
        manifest_cfg("m.csv", box_format="xyxz")


# ----------------------------------------------------------------------------- patients


def test_a_manifest_without_patient_ids_is_refused_unless_the_split_is_per_image(tmp_path):
    write_images(tmp_path)
    write_csv(tmp_path / "m.csv", ["image", "labels"], [("img/a.png", "normal"), ("img/b.jpg", "pneumonia")])
    with pytest.raises(IngestError) as err:
        open_source(manifest_cfg(tmp_path / "m.csv", split=SplitConfig()))
    assert "no row gives a patient_id" in str(err.value) and "split.unit=image" in str(err.value)
    samples = list(open_source(manifest_cfg(tmp_path / "m.csv", split=SplitConfig(unit="image"))))
    assert [s.patient_id for s in samples] == ["img/a.png", "img/b.jpg"], "asked for: each image its own patient"


def test_rows_without_a_patient_id_are_rejected_beside_rows_with_one(tmp_path):
    write_images(tmp_path)
    rows = [("img/a.png", "normal", "p1"), ("img/b.jpg", "pneumonia", "")]
    write_csv(tmp_path / "m.csv", ["image", "labels", "patient_id"], rows)
    source = open_source(manifest_cfg(tmp_path / "m.csv", split=SplitConfig()))
    assert [s.patient_id for s in source] == ["p1"]
    assert [(r.row, r.reason.split(" (")[0]) for r in source.rejected] == [(2, "no patient_id")]


def test_split_unit_is_checked():
    with pytest.raises(ConfigError, match="split.unit: must be one of patient, image, got 'study'"):
        SplitConfig(unit="study")


# ----------------------------------------------------------------------------- NIH ChestX-ray14


def write_nih(root: Path, box_rows: list[tuple], entries: list[tuple] | None = None, name: str = "BBox_List_2017.csv"):
    """NIH's files as published: the box list's header splits `Bbox [x,y,w,h]` into four cells and its
    rows end with empty cells; images live in images_001/images/."""
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for image in {r[0] for r in box_rows}:
        (folder / image).write_bytes(png())
    with (root / name).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""])
        writer.writerows([(*r, "", "", "") for r in box_rows])
    if entries is not None:
        header = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender"]
        write_csv(root / "Data_Entry_2017.csv", header, entries)


NIH_BOXES = [
    ("00000147_001.png", "Atelectasis", 8, 6, 20, 10),
    ("00000147_001.png", "Nodule", 30, 20, 5, 5),
    ("00000193_019.png", "Infiltrate", 1, 2, 30, 40),
    ("00000147_001.png", "Nodule", 40, 30, 4, 4),  # a second nodule of the same image
]


def test_nih_box_list_gives_an_image_per_row_group_with_a_box_per_finding(tmp_path):
    write_nih(tmp_path, NIH_BOXES)
    source = open_source(PrepareConfig(source="nih", source_uri=str(tmp_path)))
    samples = {s.sample_id: s for s in source}
    assert source.classes == ["Atelectasis", "Infiltrate", "Nodule"] and source.multi_label
    assert sorted(samples) == ["nih-00000147_001", "nih-00000193_019"] and source.rejected == []
    first = samples["nih-00000147_001"]
    assert first.patient_id == "00000147", "NIH's patient is the file-name prefix"
    assert first.labels == [0, 2] and first.report == "" and first.findings == ""
    assert [(c, pytest.approx(b)) for c, b in first.class_boxes] == [
        (0, (8 / W, 6 / H, 28 / W, 16 / H)),  # x y w h -> corners
        (2, (30 / W, 20 / H, 35 / W, 25 / H)),
        (2, (40 / W, 30 / H, 44 / W, 34 / H)),
    ]
    assert first.box == pytest.approx((8 / W, 6 / H, 28 / W, 16 / H)), "box: the first finding's, for schema 1 readers"
    row = first.row()
    assert row["box_labels"] == [0, 2, 2] and len(row["boxes"]) == 3


def test_nih_data_entry_gives_the_full_labels_and_patient(tmp_path):
    entries = [
        ("00000147_001.png", "Atelectasis|Nodule|Emphysema", 1, 147, 60, "M"),
        ("00000193_019.png", "Infiltration", 19, 193, 40, "F"),
        ("00000999_000.png", "No Finding", 0, 999, 30, "F"),  # not in the box list: not ingested
    ]
    write_nih(tmp_path, NIH_BOXES, entries)
    source = open_source(PrepareConfig(source="nih", source_uri=str(tmp_path / "BBox_List_2017.csv")))
    samples = {s.sample_id: s for s in source}
    assert source.classes == ["Atelectasis", "Emphysema", "Infiltration", "Nodule"]
    assert samples["nih-00000147_001"].labels == [0, 1, 3], "Emphysema has no box but is a label"
    assert samples["nih-00000147_001"].patient_id == "00000147"
    infiltrate = samples["nih-00000193_019"]
    assert infiltrate.labels == [2] and [c for c, _ in infiltrate.class_boxes] == [2], "Infiltrate is Infiltration"


@pytest.mark.parametrize(
    "rows, reason",
    [
        ([("00000147_001.png", "Mass", 8, 6, "x", 10)], "malformed box"),
        ([("00000147_001.png", "Mass", 8, 6, 0, 10)], "degenerate box"),
        ([("00000147_001.png", "Mass", 60, 6, 20, 10)], "outside the 64x48 image"),
        ([("nopatient.png", "Mass", 8, 6, 20, 10)], "no patient"),
        ([("00000147_001.png", "", 8, 6, 20, 10)], "no Finding Label"),
    ],
)
def test_nih_bad_rows_are_rejected_with_the_reason(tmp_path, rows, reason):
    write_nih(tmp_path, rows)
    source = open_source(PrepareConfig(source="nih", source_uri=str(tmp_path)))
    assert list(source) == []
    assert len(source.rejected) == 1 and reason in source.rejected[0].reason, source.rejected[0].reason


def test_nih_refuses_a_file_that_is_not_the_box_list(tmp_path):
    write_csv(tmp_path / "BBox_List_2017.csv", ["image", "labels"], [("a.png", "Mass")])
    with pytest.raises(IngestError, match="is not NIH's box list"):
        open_source(PrepareConfig(source="nih", source_uri=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="none of BBox_List_2017.csv, bbox.csv in the folder"):
        open_source(PrepareConfig(source="nih", source_uri=str(tmp_path / "empty")))
