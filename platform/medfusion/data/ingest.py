"""Reading real sources: the generic manifest (CSV or JSONL), the IU X-Ray / OpenI layout, and NIH
ChestX-ray14's box list (BBox_List_2017.csv, with Data_Entry_2017.csv for the full labels) as published.

`open_source(cfg)` reads the source's text tables at once (so a whole-source problem such as a
missing column fails before any image is touched) and returns a `Source`: an iterable of `Sample`s
that reads, validates and re-encodes the images lazily. A bad row never stops the run and never
disappears silently: it becomes a `Rejection` naming the file, the row and the reason, and the
prepare stage decides from `rejected` and `total_rows` whether the run is still acceptable.

Both sources are first turned into the same row records (`_Entry`), so the image checks, box
normalization, label mapping and text truncation exist once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import numpy as np

from medfusion import storage
from medfusion.config import PrepareConfig
from medfusion.data.images import ImageDecodeError, decode_image, encode_png, resize, sniff_format
from medfusion.data.schema import SPLITS, Sample

T = TypeVar("T")
R = TypeVar("R")

LABEL_SEPARATOR = "|"
MANIFEST_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl"}
MANIFEST_COLUMNS = ("image", "labels", "report", "findings", "box", "patient_id", "split")
REQUIRED_COLUMNS = ("image", "labels")

IU_REPORTS = "indiana_reports.csv"
IU_PROJECTIONS = "indiana_projections.csv"
IU_IMAGE_FOLDERS = ("images/images_normalized", "images", "")  # searched in this order
IU_FRONTAL = "frontal"
IU_PROBLEM_SEPARATOR = ";"

NIH_BOXES = ("BBox_List_2017.csv", "bbox.csv")  # NIH's name, and the development set's
NIH_ENTRIES = "Data_Entry_2017.csv"
NIH_IMAGE_FOLDERS = ("images", "")  # then anywhere below (NIH ships images_001/images/ ... images_012/images/)
NIH_NO_FINDING = "No Finding"
NIH_BOX_NAMES = {"Infiltrate": "Infiltration"}
"""The box list spells one finding differently from Data_Entry_2017.csv's labels."""

READ_WORKERS = 4
"""Images read and decoded concurrently; object-store reads are latency bound, so threads help."""
KNOWN_CLASSES_SHOWN = 20
"""Class names listed in an 'unknown label' reason before it is cut short."""


class IngestError(ValueError):
    """The source as a whole cannot be read: a missing file or column, an empty table."""


@dataclass
class Rejection:
    """A row left out of the dataset, and why."""

    row: int
    """1-based data row in `source` (CSV: the header is not counted; JSONL: the line number)."""
    source: str
    """The manifest file (or IU X-Ray csv) the row came from."""
    reason: str
    image: str = ""
    """The row's image reference as written in the source, when there is one."""

    def to_json(self) -> dict:
        return asdict(self)


class _RowError(Exception):
    """A problem with one row; becomes a Rejection."""


@dataclass
class _Entry:
    """One row of a source after its text has been parsed and checked, before its image is read."""

    row: int
    source: str
    image: str
    """The reference as written (for messages)."""
    image_uri: str
    sample_id: str
    patient_id: str
    label_names: list[str]
    report: str
    findings: str
    box: tuple[float, float, float, float] | None = None
    """Pixels of the original image."""
    class_boxes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    """(finding, box in pixels) per boxed finding, when the source gives boxes per finding."""
    split: str | None = None
    truncated: int = 0
    """How many of report/findings were cut at max_report_chars."""
    labels: list[int] = field(default_factory=list)


class Source:
    """Samples of one real source, read lazily.

    Iterating reads each row's image, checks it (and its box against it), stores it as PNG (JPEG
    bytes are kept as they are when no resize is needed) and yields a `Sample`. Rows that fail any
    check are skipped into `rejected`; both `rejected` and `truncated_texts` are recomputed on
    every pass.

    Attributes:
        kind: "manifest" or "iu_xray".
        uri: the manifest file or the dataset folder.
        classes: class names in the index order of `Sample.labels`.
        multi_label: True when any row that passed the table checks has more than one label.
        total_rows: data rows in the source (IU X-Ray: projections kept by iu_frontal_only).
        rejected: rows left out so far in the current pass.
        truncated_texts: report/findings texts cut at max_report_chars in the current pass.
    """

    def __init__(
        self,
        kind: str,
        uri: str,
        items: list[_Entry | Rejection],
        cfg: PrepareConfig,
        workers: int = READ_WORKERS,
    ) -> None:
        self.kind = kind
        self.uri = uri
        self.total_rows = len(items)
        self.image_size = cfg.image_size
        self.workers = workers
        self.rejected: list[Rejection] = []
        self.truncated_texts = 0
        self.classes, self._items = _assign_classes(items, list(cfg.classes))
        self.multi_label = any(len(e.labels) > 1 for e in self._items if isinstance(e, _Entry))

    def __iter__(self) -> Iterator[Sample]:
        """Yield the good rows' samples in source order; bad rows go to `rejected`.

        Raises:
            IngestError: storage failed after its retries (an outage is not a bad row).
        """
        self.rejected = []
        self.truncated_texts = 0
        for entry, result in _ordered_map(self._load, self._items, self.workers):
            if isinstance(result, Rejection):
                self.rejected.append(result)
                continue
            self.truncated_texts += entry.truncated
            yield result

    def _load(self, item: _Entry | Rejection) -> tuple[_Entry | Rejection, Sample | Rejection]:
        if isinstance(item, Rejection):
            return item, item
        try:
            return item, self._sample(item)
        except _RowError as err:
            return item, Rejection(item.row, item.source, str(err), item.image)

    def _sample(self, entry: _Entry) -> Sample:
        data = _read_image(entry.image_uri, entry.image)
        try:
            gray = decode_image(data)
        except Exception as err:  # ImageDecodeError, or anything a decoder let through: a bad row
            detail = str(err) if isinstance(err, ImageDecodeError) else f"{type(err).__name__}: {err}"
            raise _RowError(f"image '{entry.image}' cannot be decoded: {detail}") from None
        height, width = gray.shape
        box = None if entry.box is None else _normalize_box(entry.box, width, height)
        index = {name: i for i, name in enumerate(self.classes)}
        class_boxes = [(index[name], _normalize_box(b, width, height)) for name, b in entry.class_boxes]
        stored, gray = _stored_image(data, gray, self.image_size)
        return Sample(
            sample_id=entry.sample_id,
            patient_id=entry.patient_id,
            image=stored,
            height=int(gray.shape[0]),
            width=int(gray.shape[1]),
            report=entry.report,
            findings=entry.findings,
            labels=list(entry.labels),
            box=box,
            split=entry.split,
            class_boxes=class_boxes,
        )


def open_source(cfg: PrepareConfig, workers: int = READ_WORKERS) -> Source:
    """Open the real source that `cfg` names: cfg.source "manifest", "iu_xray" or "nih".

    Reads the text tables now; images are read while iterating the returned `Source`.

    Raises:
        IngestError: the source cannot be read as a whole (missing file, missing required column,
            no data rows, unsupported manifest extension).
    """
    if cfg.source == "manifest":
        return Source("manifest", cfg.source_uri, _manifest_items(cfg), cfg, workers)
    if cfg.source == "iu_xray":
        return Source("iu_xray", cfg.source_uri, _iu_xray_items(cfg), cfg, workers)
    if cfg.source == "nih":
        return Source("nih", cfg.source_uri, _nih_items(cfg), cfg, workers)
    raise IngestError(f"source={cfg.source!r} is not a file source (expected manifest, iu_xray or nih)")


# --------------------------------------------------------------------------------------------
# Generic manifest
# --------------------------------------------------------------------------------------------


def _manifest_items(cfg: PrepareConfig) -> list[_Entry | Rejection]:
    uri = cfg.source_uri
    suffix = _suffix(uri)
    fmt = MANIFEST_FORMATS.get(suffix)
    if fmt is None:
        raise IngestError(
            f"manifest {uri}: unsupported extension {suffix or '(none)'!r} (expected {', '.join(MANIFEST_FORMATS)})"
        )
    text = _read_table(uri, "manifest")
    rows = _csv_rows(text, uri, "manifest", REQUIRED_COLUMNS) if fmt == "csv" else _jsonl_rows(text, uri)
    stem = _stem(uri)
    base = storage.parent(uri)
    items: list[_Entry | Rejection] = []
    for row, record in rows:
        if isinstance(record, Rejection):
            items.append(record)
            continue
        image = record.get("image")
        shown = image if isinstance(image, str) else ""
        try:
            items.append(
                _manifest_entry(row, record, uri, stem, base, cfg.max_report_chars, cfg.box_format, cfg.split.unit)
            )
        except _RowError as err:
            items.append(Rejection(row, uri, str(err), shown))
    if not items:
        raise IngestError(f"manifest {uri}: no data rows")
    no_patient = any(isinstance(i, Rejection) and i.reason.startswith(NO_PATIENT) for i in items)
    if no_patient and not any(isinstance(i, _Entry) for i in items):
        raise IngestError(
            f"manifest {uri}: no row gives a patient_id, so one patient's images could land in both train and "
            "test; add a patient_id column, or set split.unit=image to split per image knowingly"
        )
    _check_box_format(items, uri, cfg.box_format)
    return _keep_patients_whole(items, uri)


# A wrong box_format shows as many degenerate boxes: x y w h read as corners wherever w <= x or h <= y.
DEGENERATE_BOXES_MIN, DEGENERATE_BOXES_SHARE = 5, 0.2


def _check_box_format(items: list[_Entry | Rejection], uri: str, box_format: str) -> None:
    """Refuse a manifest whose boxes mostly do not make sense in `box_format` (the other one is likely).

    Raises:
        IngestError: at least DEGENERATE_BOXES_MIN boxes, and DEGENERATE_BOXES_SHARE of all, are degenerate.
    """
    degenerate = [i for i in items if isinstance(i, Rejection) and i.reason.startswith("degenerate box")]
    boxes = len(degenerate) + sum(1 for i in items if isinstance(i, _Entry) and i.box is not None)
    if len(degenerate) >= DEGENERATE_BOXES_MIN and len(degenerate) >= DEGENERATE_BOXES_SHARE * boxes:
        other = "xywh" if box_format == "xyxy" else "xyxy"
        raise IngestError(
            f"manifest {uri}: {len(degenerate)} of {boxes} boxes are degenerate read as box_format={box_format} "
            f"(first: row {degenerate[0].row}, {degenerate[0].reason}); if the box column gives "
            f"{BOX_LAYOUTS[other]}, set box_format={other}"
        )


def _keep_patients_whole(items: list[_Entry | Rejection], uri: str) -> list[_Entry | Rejection]:
    """One patient, one split: a patient whose rows name different splits would leak between them.

    Rows without a split follow the one their patient's other rows name (a hash split could send
    them elsewhere).

    Raises:
        IngestError: a patient's rows name more than one split (the patient and rows are named).
    """
    given: dict[str, dict[str, list[int]]] = {}
    for item in items:
        if isinstance(item, _Entry) and item.split is not None:
            given.setdefault(item.patient_id, {}).setdefault(item.split, []).append(item.row)
    split_across = {patient: splits for patient, splits in given.items() if len(splits) > 1}
    if split_across:
        shown = [
            f"patient {patient!r}: "
            + "; ".join(f"{split} (rows {', '.join(map(str, rows))})" for split, rows in by.items())
            for patient, by in sorted(split_across.items())
        ]
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        raise IngestError(
            f"manifest {uri}: {len(shown)} patient(s) appear in more than one split, which leaks them between "
            f"train and evaluation; give each patient one split: " + " | ".join(shown[:5]) + more
        )
    for item in items:
        if isinstance(item, _Entry) and item.split is None and item.patient_id in given:
            (item.split,) = given[item.patient_id]
    return items


NO_PATIENT = "no patient_id"


def _manifest_entry(
    row: int,
    record: dict,
    uri: str,
    stem: str,
    base: str,
    max_chars: int,
    box_format: str = "xyxy",
    split_unit: str = "patient",
) -> _Entry:
    image = record.get("image")
    if image is None or (isinstance(image, str) and not image.strip()):
        raise _RowError("no image (column 'image' is empty)")
    if not isinstance(image, str):
        raise _RowError(f"image {image!r} is not a path or URI")
    image = image.strip()
    labels = _label_list(record.get("labels"))
    report, cut_report = _truncate(_text(record.get("report"), "report"), max_chars)
    # No findings is no generation target: never the note in its place (the decoder would learn to copy it).
    findings, cut_findings = _truncate(_text(record.get("findings"), "findings"), max_chars)
    split = _text(record.get("split"), "split").lower() or None
    if split is not None and split not in SPLITS:
        raise _RowError(f"split '{split}' is not one of {', '.join(SPLITS)} (or empty)")
    patient_id = _text(record.get("patient_id"), "patient_id")
    if not patient_id:
        if split_unit != "image":
            raise _RowError(f"{NO_PATIENT} (a patient could land in train and test; or set split.unit=image)")
        patient_id = image
    return _Entry(
        row=row,
        source=uri,
        image=image,
        image_uri=_resolve(base, image),
        sample_id=f"{stem}-{row}",
        patient_id=patient_id,
        label_names=labels,
        report=report,
        findings=findings,
        box=_parse_box(record.get("box"), box_format),
        split=split,
        truncated=int(cut_report) + int(cut_findings),
    )


def _csv_rows(text: str, uri: str, what: str, required: tuple[str, ...]) -> list[tuple[int, dict | Rejection]]:
    """(data row number, {column: cell}) for every non-blank record after the header, whose
    (stripped, lower-cased) column names must include `required`."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
        if header is None:
            raise IngestError(f"{what} {uri}: empty file (no header row)")
        columns = [cell.strip().lower() for cell in header]
        duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
        if duplicated:
            raise IngestError(f"{what} {uri}: column(s) {', '.join(map(repr, duplicated))} appear more than once")
        _require_columns(columns, required, uri, what)
        rows: list[tuple[int, dict | Rejection]] = []
        for number, cells in enumerate(reader, start=1):
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) > len(columns):
                rows.append(
                    (number, Rejection(number, uri, f"row has {len(cells)} fields, the header has {len(columns)}"))
                )
                continue
            cells += [""] * (len(columns) - len(cells))  # short rows: the missing cells are empty
            rows.append((number, dict(zip(columns, cells))))
    except csv.Error as err:
        raise IngestError(f"{what} {uri}: line {reader.line_num}: malformed CSV ({err})") from None
    return rows


def _jsonl_rows(text: str, uri: str) -> list[tuple[int, dict | Rejection]]:
    rows: list[tuple[int, dict | Rejection]] = []
    keys_seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            rows.append((number, Rejection(number, uri, f"not valid JSON ({err.msg} at column {err.colno})")))
            continue
        if not isinstance(value, dict):
            rows.append((number, Rejection(number, uri, f"expected a JSON object, got {type(value).__name__}")))
            continue
        record = {str(k).strip().lower(): v for k, v in value.items()}
        keys_seen.update(record)
        rows.append((number, record))
    if not rows:
        raise IngestError(f"manifest {uri}: empty file (no JSON lines)")
    if keys_seen:  # when every line is broken the rows are rejected one by one instead
        _require_columns(sorted(keys_seen), REQUIRED_COLUMNS, uri, "manifest")
    return rows


def _require_columns(found: list[str], required: Iterable[str], uri: str, what: str) -> None:
    for name in required:
        if name not in found:
            listed = ", ".join(repr(c) for c in found if c) or "none"
            raise IngestError(f"{what} {uri}: missing required column '{name}' (columns found: {listed})")


def _resolve(base: str, reference: str) -> str:
    """The URI of an image reference: s3:// and absolute paths as they are, others from `base`."""
    if storage.is_s3(reference):
        return reference
    if "://" in reference:
        raise _RowError(f"image '{reference}': only local paths and s3:// URIs are supported")
    if storage.is_s3(base) and not reference.startswith("/"):
        return "s3://" + posixpath.normpath(posixpath.join(base[len("s3://") :], reference))
    return str(Path(base) / reference)


# --------------------------------------------------------------------------------------------
# IU X-Ray / OpenI
# --------------------------------------------------------------------------------------------


def _iu_xray_items(cfg: PrepareConfig) -> list[_Entry | Rejection]:
    root = cfg.source_uri.rstrip("/") if storage.is_s3(cfg.source_uri) else cfg.source_uri
    files = _FileIndex(root)
    reports_uri = files.find(IU_REPORTS, ("",))
    projections_uri = files.find(IU_PROJECTIONS, ("",))
    for name, found in ((IU_REPORTS, reports_uri), (IU_PROJECTIONS, projections_uri)):
        if found is None:
            raise IngestError(f"iu_xray {root}: {name} not found in the folder")
    assert reports_uri is not None and projections_uri is not None

    reports: dict[str, dict] = {}
    report_rows = _csv_rows(_read_table(reports_uri, "iu_xray"), reports_uri, "iu_xray reports", ("uid", "problems"))
    for _, record in report_rows:
        if isinstance(record, dict):
            reports.setdefault(record["uid"].strip(), record)  # the first report of a uid wins

    projection_text = _read_table(projections_uri, "iu_xray")
    projections = _csv_rows(projection_text, projections_uri, "iu_xray projections", ("uid", "filename", "projection"))
    items: list[_Entry | Rejection] = []
    images_of_uid: dict[str, int] = {}
    for row, record in projections:
        if isinstance(record, Rejection):
            items.append(record)
            continue
        uid = record["uid"].strip()
        filename = record["filename"].strip()
        images_of_uid[uid] = images_of_uid.get(uid, 0) + 1  # counts every view: ids stay put
        if cfg.iu_frontal_only and record["projection"].strip().lower() != IU_FRONTAL:
            continue
        try:
            items.append(
                _iu_entry(row, uid, filename, images_of_uid[uid], reports, files, projections_uri, cfg.max_report_chars)
            )
        except _RowError as err:
            items.append(Rejection(row, projections_uri, str(err), filename))
    if not items:
        raise IngestError(
            f"iu_xray {root}: no images in {IU_PROJECTIONS}"
            + (" with a Frontal projection (iu_frontal_only)" if cfg.iu_frontal_only else "")
        )
    return items


def _iu_entry(
    row: int,
    uid: str,
    filename: str,
    number: int,
    reports: dict[str, dict],
    files: _FileIndex,
    source: str,
    max_chars: int,
) -> _Entry:
    if not uid:
        raise _RowError("empty uid")
    if not filename:
        raise _RowError("empty filename")
    report = reports.get(uid)
    if report is None:
        raise _RowError(f"no report with uid {uid} in {IU_REPORTS}")
    image_uri = files.find(filename, IU_IMAGE_FOLDERS)
    if image_uri is None:
        raise _RowError(f"image '{filename}': no such file in {files.root} (looked in images/ and below)")
    labels = _unique(p.strip() for p in _iu_text(report.get("problems")).split(IU_PROBLEM_SEPARATOR))
    if not labels:
        raise _RowError(f"no labels (Problems of uid {uid} is empty)")
    note, cut_note = _truncate(_iu_text(report.get("indication")), max_chars)
    described = " ".join(t for t in (_iu_text(report.get("findings")), _iu_text(report.get("impression"))) if t)
    findings, cut_findings = _truncate(described, max_chars)
    return _Entry(
        row=row,
        source=source,
        image=filename,
        image_uri=image_uri,
        sample_id=f"iu-{uid}-{number}",
        patient_id=uid,
        label_names=labels,
        report=note,
        findings=findings,
        truncated=int(cut_note) + int(cut_findings),
    )


def _iu_text(value: Any) -> str:
    """A cell as text; pandas exports write missing cells as empty or as NaN."""
    text = " ".join(str(value or "").split())
    return "" if text.lower() in ("nan", "none", "null") else text


class _FileIndex:
    """Every file under a folder, looked up by name (the IU X-Ray zip comes in several layouts)."""

    def __init__(self, root: str) -> None:
        self.root = root
        fs_root = "s3://" + root[len("s3://") :].rstrip("/") if storage.is_s3(root) else str(Path(root).absolute())
        if not storage.is_s3(root) and not Path(root).is_dir():
            raise IngestError(f"iu_xray {root}: no such folder")
        try:
            uris = storage.list_files(root)
        except storage.StorageError as err:
            raise IngestError(f"iu_xray {root}: cannot list the folder ({err})") from None
        self.by_path: dict[str, str] = {}
        self.by_name: dict[str, list[str]] = {}
        for uri in uris:
            relative = uri[len(fs_root) :].lstrip("/")
            self.by_path[relative] = uri
            self.by_name.setdefault(PurePosixPath(relative).name, []).append(relative)

    def find(self, name: str, folders: tuple[str, ...]) -> str | None:
        """`name` in the first of `folders` that has it, else the shallowest file of that name."""
        for folder in folders:
            uri = self.by_path.get(posixpath.join(folder, name) if folder else name)
            if uri is not None:
                return uri
        candidates = self.by_name.get(PurePosixPath(name).name)
        if not candidates:
            return None
        return self.by_path[min(candidates, key=lambda p: (p.count("/"), p))]


# --------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# --------------------------------------------------------------------------------------------


def _nih_items(cfg: PrepareConfig) -> list[_Entry | Rejection]:
    """One entry per image of the box list: its boxed findings (each with its own box), its labels
    (Data_Entry_2017.csv's full set when present, else the boxed findings) and its patient (Data_Entry's
    Patient ID, else the file-name prefix: 00000147_001.png is patient 00000147)."""
    uri = cfg.source_uri
    root = storage.parent(uri) if _suffix(uri) == ".csv" else uri.rstrip("/")
    if not storage.is_s3(root) and not Path(root).is_dir():
        raise IngestError(f"nih {root}: no such folder")
    files = _FileIndex(root)
    boxes_uri = uri if _suffix(uri) == ".csv" else next(filter(None, (files.find(n, ("",)) for n in NIH_BOXES)), None)
    if boxes_uri is None:
        raise IngestError(f"nih {root}: none of {', '.join(NIH_BOXES)} in the folder")
    entries_uri = files.find(NIH_ENTRIES, ("",))
    entries = _nih_entries(entries_uri) if entries_uri else {}

    items: dict[str, _Entry | Rejection] = {}
    for row, cells in _nih_box_rows(boxes_uri):
        name = cells[0].strip()
        item = items.get(name)
        if isinstance(item, Rejection):
            continue
        try:
            finding, box = _nih_box(cells, entries)
            if item is None:
                item = items[name] = _nih_entry(row, name, boxes_uri, files, entries)
            item.class_boxes.append((finding, box))
            item.label_names = _unique([*item.label_names, finding])
            item.box = item.box or box
        except _RowError as err:
            items[name] = Rejection(row, boxes_uri, str(err), name)
    if not items:
        raise IngestError(f"nih {boxes_uri}: no data rows")
    return list(items.values())


def _nih_box_rows(uri: str) -> list[tuple[int, list[str]]]:
    """(data row number, cells) of the box list. Its header `Image Index,Finding Label,Bbox [x,y,w,h]`
    splits the box into four cells, and NIH's own file ends each row with empty cells."""
    reader = csv.reader(io.StringIO(_read_table(uri, "nih")))
    header = [h.strip() for h in next(reader, [])]
    if header[:2] != ["Image Index", "Finding Label"]:
        raise IngestError(
            f"nih {uri}: header {','.join(header)!r} is not NIH's box list "
            "(expected Image Index,Finding Label,Bbox [x,y,w,h])"
        )
    return [(row, cells) for row, cells in enumerate(reader, start=1) if any(c.strip() for c in cells)]


def _nih_box(cells: list[str], entries: dict[str, tuple[list[str], str]]) -> tuple[str, tuple[float, ...]]:
    finding = cells[1].strip() if len(cells) > 1 else ""
    if not finding:
        raise _RowError("no Finding Label")
    if entries:  # name the finding as the label list does
        finding = NIH_BOX_NAMES.get(finding, finding)
    return finding, _parse_box(list(cells[2:6]), "xywh")  # NIH publishes x y w h


def _nih_entry(
    row: int, name: str, source: str, files: _FileIndex, entries: dict[str, tuple[list[str], str]]
) -> _Entry:
    if not name:
        raise _RowError("empty Image Index")
    image_uri = files.find(name, NIH_IMAGE_FOLDERS)
    if image_uri is None:
        raise _RowError(f"image '{name}': no such file in {files.root} (looked in images/ and below)")
    labels, patient = entries.get(name, ([], ""))
    if not patient:
        patient = name.split("_", 1)[0] if "_" in name else ""
        if not patient:
            raise _RowError(f"image '{name}': no patient (not in {NIH_ENTRIES}, and no NNNNNNNN_ prefix)")
    return _Entry(
        row=row,
        source=source,
        image=name,
        image_uri=image_uri,
        sample_id=f"nih-{_stem(name)}",
        patient_id=patient,
        label_names=list(labels),
        report="",
        findings="",
    )


def _nih_entries(uri: str) -> dict[str, tuple[list[str], str]]:
    """Image Index -> (Finding Labels without 'No Finding', Patient ID) of Data_Entry_2017.csv."""
    # _csv_rows matches column names case-blind and gives them lower-cased.
    rows = _csv_rows(_read_table(uri, "nih"), uri, "nih entries", ("image index", "finding labels", "patient id"))
    out: dict[str, tuple[list[str], str]] = {}
    for _, record in rows:
        if isinstance(record, dict):
            labels = _unique(p.strip() for p in record["finding labels"].split(LABEL_SEPARATOR))
            patient = record["patient id"].strip()
            out[record["image index"].strip()] = (
                [n for n in labels if n != NIH_NO_FINDING],
                patient.zfill(8) if patient.isdigit() else patient,
            )
    return out


# --------------------------------------------------------------------------------------------
# Shared row checks
# --------------------------------------------------------------------------------------------


def _assign_classes(items: list[_Entry | Rejection], given: list[str]) -> tuple[list[str], list[_Entry | Rejection]]:
    """Fix the class list (given, or the sorted labels seen) and map each row's labels to indices;
    a row with a label outside a given list becomes a Rejection."""
    classes = given or sorted({name for e in items if isinstance(e, _Entry) for name in e.label_names})
    index = {name: i for i, name in enumerate(classes)}
    shown = ", ".join(classes[:KNOWN_CLASSES_SHOWN])
    if len(classes) > KNOWN_CLASSES_SHOWN:
        shown += f", ... ({len(classes)} in all)"
    mapped: list[_Entry | Rejection] = []
    for item in items:
        if isinstance(item, _Entry):
            unknown = [name for name in item.label_names if name not in index]
            if unknown:
                names = ", ".join(f"'{u}'" for u in unknown)
                reason = f"unknown label{'s' if len(unknown) > 1 else ''} {names} (known: {shown})"
                item = Rejection(item.row, item.source, reason, item.image)
            else:
                item.labels = sorted(index[name] for name in item.label_names)
        mapped.append(item)
    return classes, mapped


def _label_list(value: Any) -> list[str]:
    if value is None:
        names: list[str] = []
    elif isinstance(value, str):
        names = value.split(LABEL_SEPARATOR)
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = list(value)
    else:
        raise _RowError(f"labels {value!r} are not class names joined by '{LABEL_SEPARATOR}' (or a list of names)")
    labels = _unique(n.strip() for n in names)
    if not labels:
        raise _RowError("no labels (column 'labels' is empty)")
    return labels


BOX_LAYOUTS = {"xyxy": "x0 y0 x1 y1", "xywh": "x y w h"}


def _parse_box(value: Any, box_format: str = "xyxy") -> tuple[float, float, float, float] | None:
    """4 numbers in `box_format` (spaces or commas, brackets allowed, or a list) as corners x0 y0 x1 y1;
    empty is no box."""
    if value is None:
        return None
    if isinstance(value, str):
        parts: list[Any] = [p for p in re.split(r"[\s,;]+", value.strip().strip("[]()")) if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if not parts:
        return None
    numbers: list[float] = []
    for part in parts:
        try:
            number = float(part) if not isinstance(part, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        numbers.append(number)
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise _RowError(
            f"malformed box {value!r} (expected 4 numbers {BOX_LAYOUTS[box_format]} in pixels, box_format={box_format})"
        )
    if box_format == "xywh":
        x, y, w, h = numbers
        if not (w > 0 and h > 0):
            raise _RowError(f"degenerate box {_show_box(numbers)} (needs w > 0 and h > 0, box_format=xywh)")
        return x, y, x + w, y + h
    x0, y0, x1, y1 = numbers
    if not (x0 < x1 and y0 < y1):
        raise _RowError(f"degenerate box {_show_box(numbers)} (needs x0 < x1 and y0 < y1, box_format=xyxy)")
    return x0, y0, x1, y1


def _normalize_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, ...]:
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise _RowError(f"box {_show_box(box)} outside the {width}x{height} image")
    return (x0 / width, y0 / height, x1 / width, y1 / height)


def _show_box(box: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _text(value: Any, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError(f"column '{column}' must be text, got {type(value).__name__}")
    return str(value).strip()


def _truncate(text: str, max_chars: int) -> tuple[str, bool]:
    if max_chars > 0 and len(text) > max_chars:
        return text[:max_chars], True
    return text, False


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(n for n in names if n))


# --------------------------------------------------------------------------------------------
# Files and images
# --------------------------------------------------------------------------------------------


def _read_table(uri: str, what: str) -> str:
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise IngestError(f"{what} {uri}: no such file") from None
    except storage.StorageError as err:
        raise IngestError(f"{what} {uri}: cannot be read ({err})") from None
    try:
        text = data.decode("utf-8-sig")  # spreadsheet exports often start with a BOM
    except UnicodeDecodeError as err:
        raise IngestError(f"{what} {uri}: not UTF-8 text ({err})") from None
    if not text.strip():
        raise IngestError(f"{what} {uri}: empty file")
    return text


def _read_image(uri: str, shown: str) -> bytes:
    if not storage.is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise _RowError(f"image '{shown}': no such file")
        if not path.is_file():
            raise _RowError(f"image '{shown}': not a file")
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise _RowError(f"image '{shown}': no such file") from None
    except storage.StorageError as err:
        # Storage that fails after its retries is an outage, not a bad row: stop the run.
        raise IngestError(f"image '{shown}' ({uri}): {err}") from None
    if not data:
        raise _RowError(f"image '{shown}' cannot be decoded: empty file")
    return data


def _stored_image(data: bytes, gray: np.ndarray, size: int) -> tuple[bytes, np.ndarray]:
    """The bytes a shard stores and their pixels: the original when it already is 8-bit grey PNG
    or JPEG at the right size (decode_image gives the same pixels), else a fresh grey PNG."""
    if size > 0 and gray.shape != (size, size):
        gray = resize(gray, size)
        return encode_png(gray), gray
    kind = sniff_format(data)
    if kind == "jpeg" or (kind == "png" and _is_gray8_png(data)):
        return data, gray
    return encode_png(gray), gray


def _is_gray8_png(data: bytes) -> bool:
    # IHDR is the first chunk: bit depth at byte 24, colour type at byte 25 (0 = greyscale).
    return len(data) > 25 and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 0


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on a few threads, in order, with a bounded number of items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ingest") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _suffix(uri: str) -> str:
    return PurePosixPath(uri).suffix.lower()


def _stem(uri: str) -> str:
    return PurePosixPath(uri.rstrip("/")).stem
