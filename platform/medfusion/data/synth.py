"""Procedural chest radiographs with a clinical note and a radiology description, ground truth known.

Each sample is a study of a synthetic patient: a grayscale PA chest film (body outline, two dark lung
fields, bright mediastinum and heart, curved ribs, clavicles, noise; per-patient anatomy, per-study
pose and exposure), at most one lesion drawn in a named zone, and two texts:

- ``report``: the **clinical note** a clinician has before the read (age, sex, history, symptoms,
  risk factors). It is the text-encoder input.
- ``findings``: the **radiologist's description** of what the film shows (finding, zone, size,
  density, negations). It is the generation target, and ``parse_findings`` turns it back into
  ``(finding, zone)`` pairs for a CheXpert-style clinical-correctness score.

**Complementarity** is built in, so that only a model that fuses both modalities can be right:

- look-alikes in the image, told apart by the note: pneumonia vs tuberculosis (the same patchy
  consolidation; acute fever and productive cough vs weeks of night sweats, weight loss, TB contact),
  benign vs malignant nodule (the same round opacity; non-smoker, stable on prior imaging vs heavy
  smoker, haemoptysis);
- look-alikes in the note, told apart by the image: normal, pleural effusion and cardiomegaly all
  get notes drawn from one non-specific pool ("dyspnoea, evaluate").

The findings text describes only what is visible, so look-alikes share it too ("consolidation in the
right upper zone"): the class, not the description, needs the note.

Conventions: films are PA as displayed, so the patient's **right is the image's left**. Zones are
``ZONES``: six lung zones (``"right upper zone"`` ... ``"left lower zone"``), ``"right base"`` /
``"left base"`` (effusions) and ``"cardiac"`` (cardiomegaly). ``box`` is the lesion's tight box in
pixel-edge coordinates: pixel column ``c`` spans ``[c / W, (c + 1) / W]``.

Determinism: every sample is a function of ``(cfg, index)`` alone (per-index random streams;
patients are laid out sequentially from per-patient streams), so the first k samples of a run are
the same whatever ``num_samples`` is, and the random draws do not depend on ``image_size`` either.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from medfusion.config import ConfigError, SynthConfig
from medfusion.data.images import encode_png
from medfusion.data.schema import Sample
from medfusion.data.tokenizer import split_words

# Random streams: the first entropy word after the seed, so streams never collide.
_PATIENT, _STUDY, _NOISE, _CLASS_BLOCK = 1, 2, 3, 4
_BLOCK_PER_CLASS = 8  # classes are dealt in shuffled blocks of 8 per class: near-exact balance
CM_PER_UNIT = 12.0  # anatomical units (image half-width = 1) to centimetres, for nodule sizes
# Texts fit the `tiny` preset untruncated: notes <= 48 tokens, findings <= 40 with <bos>/<eos>.
MAX_FINDINGS_WORDS = 38
MASK_LEVEL = 0.3  # blend weight from which a pixel counts as lesion (what the box encloses)

SIDES = {"right": -1.0, "left": 1.0}  # patient side -> sign of the image x axis (PA view)
LEVELS = ("upper", "mid", "lower")
LUNG_ZONES = tuple(f"{side} {level} zone" for side in SIDES for level in LEVELS)
BASE_ZONES = ("right base", "left base")
CARDIAC = "cardiac"
ZONES = LUNG_ZONES + BASE_ZONES + (CARDIAC,)
NORMAL = "normal"

# --------------------------------------------------------------------------------------------
# Catalogue: what each class looks like and what its note says
# --------------------------------------------------------------------------------------------

NONSPECIFIC_CUES = (
    "shortness of breath",
    "dyspnoea",
    "breathlessness on exertion",
    "chest tightness",
    "fatigue",
    "reduced exercise tolerance",
    "ankle swelling",
    "palpitations",
    "pre-operative assessment",
    "routine follow-up",
    "chest discomfort",
    "cough",
    "symptoms for {days}",
    "symptoms for {weeks}",
)
BACKGROUND_CUES = ("hypertension", "type 2 diabetes", "ex-smoker", "asthma", "copd", "hypercholesterolaemia")
REQUESTS = ("evaluate.", "please evaluate.", "please assess.", "? cause.", "cxr requested.", "")


@dataclass(frozen=True)
class ClassSpec:
    """One class of the generator."""

    pattern: str
    """What is drawn: none, consolidation, nodule, effusion or cardiomegaly."""
    zones: tuple[str, ...]
    """Where the lesion may sit (empty for none)."""
    note_cues: tuple[str, ...]
    """Class-specific note phrases; empty means the note comes from NONSPECIFIC_CUES only."""
    finding: str
    """The canonical finding its findings text reports (a FINDING_SYNONYMS key, or "normal")."""


CATALOGUE: dict[str, ClassSpec] = {
    "normal": ClassSpec("none", (), (), NORMAL),
    "pneumonia": ClassSpec(
        "consolidation",
        LUNG_ZONES,
        (
            "fever",
            "high fever",
            "productive cough",
            "cough with green sputum",
            "rigors",
            "pleuritic chest pain",
            "onset {days} ago",
            "acute cough for {days}",
            "raised crp",
            "crackles on auscultation",
            "febrile and tachypnoeic",
            "query chest infection",
        ),
        "consolidation",
    ),
    "tuberculosis": ClassSpec(
        "consolidation",
        LUNG_ZONES,
        (
            "night sweats",
            "drenching night sweats",
            "weight loss",
            "unintentional weight loss",
            "cough for {weeks}",
            "household contact with tuberculosis",
            "recent travel to an endemic area",
            "hiv positive",
            "arrived from a high-prevalence country",
            "low-grade evening fevers",
            "haemoptysis",
        ),
        "consolidation",
    ),
    "benign_nodule": ClassSpec(
        "nodule",
        LUNG_ZONES,
        (
            "non-smoker",
            "never smoked",
            "nodule stable on prior imaging",
            "unchanged from previous film",
            "history of granulomatous disease",
            "known calcified granuloma",
            "follow-up of known nodule",
            "asymptomatic",
        ),
        "nodule",
    ),
    "malignant_nodule": ClassSpec(
        "nodule",
        LUNG_ZONES,
        (
            "heavy smoker",
            "{packs} pack-year smoking history",
            "current smoker",
            "haemoptysis",
            "weight loss",
            "new hoarseness",
            "family history of lung cancer",
            "no prior imaging",
            "persistent cough",
        ),
        "nodule",
    ),
    "pleural_effusion": ClassSpec("effusion", BASE_ZONES, (), "effusion"),
    "cardiomegaly": ClassSpec("cardiomegaly", (CARDIAC,), (), "cardiomegaly"),
}

# Positive mentions of each canonical finding (regular expressions over lower-case text).
FINDING_SYNONYMS: dict[str, tuple[str, ...]] = {
    "consolidation": ("consolidation", "airspace opacity", "airspace opacification"),
    "nodule": ("pulmonary nodule", "nodule", "rounded opacity", "nodular opacity"),
    "effusion": ("pleural effusion", "effusion", "pleural fluid", r"blunting of the (?:right|left) costophrenic angle"),
    "cardiomegaly": (
        "cardiomegaly",
        "enlarged cardiac silhouette",
        "cardiac silhouette is enlarged",
        "heart is enlarged",
        "enlarged heart",
    ),
    "pneumothorax": ("pneumothorax",),
}
# Statements that a study is normal (used only when nothing positive is mentioned).
NORMAL_PHRASES = (
    "lungs are clear",
    "clear lungs",
    "no acute cardiopulmonary",
    "normal chest",
    "heart size is normal",
    "cardiac silhouette is normal",
    "not enlarged",
)

# Negations drawn into findings: one list per finding they deny.
NEGATIONS = {
    "consolidation": ("no focal consolidation.", "no consolidation.", "no airspace opacity."),
    "nodule": ("no suspicious nodule.", "no pulmonary nodule."),
    "effusion": ("no pleural effusion.", "no effusion.", "the costophrenic angles are sharp."),
    "cardiomegaly": (
        "heart size is normal.",
        "the cardiac silhouette is normal.",
        "the heart is not enlarged.",
        "no cardiomegaly.",
    ),
    "pneumothorax": ("no pneumothorax.",),
}


def _specs(cfg: SynthConfig) -> list[ClassSpec]:
    unknown = [name for name in cfg.classes if name not in CATALOGUE]
    if unknown:
        raise ConfigError(
            f"synth.classes: unknown class(es) {', '.join(map(repr, unknown))}; known: {', '.join(CATALOGUE)}"
        )
    return [CATALOGUE[name] for name in cfg.classes]


def class_names(cfg: SynthConfig) -> list[str]:
    """The dataset's class names, in label-index order (checked against CATALOGUE)."""
    _specs(cfg)
    return list(cfg.classes)


# --------------------------------------------------------------------------------------------
# Study parameters (cheap: no pixels)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Per-patient body shape in anatomical units (image half-width = 1 at scale 1)."""

    scale_x: float
    scale_y: float
    lung_cx: float  # distance of each lung centre from the midline
    lung_cy: float
    lung_rx: float
    lung_ry: float
    heart_cx: float
    heart_cy: float
    heart_rx: float
    heart_ry: float
    dome: float  # diaphragm dome height
    rib_spacing: float
    rib_phase: float
    tissue: float  # soft-tissue density


@dataclass(frozen=True)
class Lesion:
    """The one abnormality of a study, in anatomical coordinates."""

    kind: str  # consolidation | nodule | effusion | cardiomegaly
    zone: str
    center: tuple[float, float] = (0.0, 0.0)
    size: float = 0.0  # nodule radius, consolidation spread, effusion height, heart scale
    extent: str = ""  # small | moderate | large (consolidation, effusion)
    density: float = 1.0
    measure: float = 0.0  # nodule diameter in cm, or cardiothoracic ratio
    seed: int = 0


@dataclass(frozen=True)
class Study:
    """Everything that defines one sample; `render` turns it into pixels."""

    index: int
    patient_id: str
    class_index: int
    label: int  # after label noise
    anatomy: Anatomy
    pose: tuple[float, float, float]  # rotation (radians), shift x, shift y
    exposure: tuple[float, float, float, float]  # contrast, brightness, gamma, noise sigma
    noise_seed: int
    lesion: Lesion | None
    report: str
    findings: str
    intended: frozenset[tuple[str, str]]
    """The (finding, zone) pairs the findings text states; what parse_findings must recover."""

    @property
    def sample_id(self) -> str:
        return f"syn-{self.index:06d}"


def _rng(cfg: SynthConfig, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed % (1 << 64), stream, index])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _class_block(cfg: SynthConfig, block: int) -> np.ndarray:
    """Class indices of one block: counts follow the weights (largest remainder), order shuffled."""
    n = len(cfg.classes)
    weights = np.asarray(cfg.class_weights or [1.0] * n, dtype=np.float64)
    if weights.sum() <= 0:
        raise ConfigError("synth.class_weights: at least one weight must be > 0")
    size = _BLOCK_PER_CLASS * n
    rng = _rng(cfg, _CLASS_BLOCK, block)
    expected = weights / weights.sum() * size
    counts = np.floor(expected).astype(int)
    remainder = expected - counts
    missing = size - int(counts.sum())
    if missing:
        p = remainder + 1e-12  # never zero: choice() refuses fewer candidates than draws
        counts[rng.choice(n, missing, replace=False, p=p / p.sum())] += 1
    return rng.permutation(np.repeat(np.arange(n), counts))


def _draw_anatomy(rng: np.random.Generator) -> Anatomy:
    u = rng.uniform
    lung_cy, lung_ry = u(-0.14, -0.08), u(0.56, 0.62)
    heart_ry = u(0.25, 0.29)
    return Anatomy(
        scale_x=u(0.9, 1.04),
        scale_y=u(0.92, 1.05),
        lung_cx=u(0.40, 0.44),
        lung_cy=lung_cy,
        lung_rx=u(0.36, 0.40),
        lung_ry=lung_ry,
        heart_cx=u(0.06, 0.12),
        heart_cy=lung_cy + lung_ry * 0.58,
        heart_rx=u(0.32, 0.37),
        heart_ry=heart_ry,
        dome=u(0.06, 0.12),
        rib_spacing=u(0.12, 0.145),
        rib_phase=u(0.0, 1.0),
        tissue=u(0.5, 0.6),
    )


def _zone_point(rng: np.random.Generator, anatomy: Anatomy, zone: str, margin: float) -> tuple[float, float]:
    """A lesion centre inside a lung zone (upper/mid/lower thirds; lower kept lateral of the heart)."""
    side, level, _ = zone.split()
    s = SIDES[side]
    t_lo, t_hi = {"upper": (-0.62, -0.38), "mid": (-0.22, 0.08), "lower": (0.22, 0.45)}[level]
    q_lo, q_hi = {"upper": (-0.25, 0.25), "mid": (-0.3, 0.4), "lower": (0.0, 0.45)}[level]
    m = min(margin, 0.1)  # keep a large nodule inside the lung
    q, t = rng.uniform(q_lo + m, q_hi - m), rng.uniform(t_lo, t_hi)
    return s * (anatomy.lung_cx + q * anatomy.lung_rx), anatomy.lung_cy + t * anatomy.lung_ry


def _draw_lesion(rng: np.random.Generator, spec: ClassSpec, anatomy: Anatomy) -> Lesion | None:
    if spec.pattern == "none":
        return None
    zone = _pick(rng, spec.zones)
    seed = int(rng.integers(1 << 62))
    if spec.pattern == "consolidation":
        extent = _pick(rng, ("small", "moderate", "large"))
        spread = {"small": 0.05, "moderate": 0.07, "large": 0.09}[extent] * rng.uniform(0.9, 1.1)
        density = _pick(rng, (0.7, 1.0))
        return Lesion("consolidation", zone, _zone_point(rng, anatomy, zone, 0.0), spread, extent, density, 0.0, seed)
    if spec.pattern == "nodule":
        diameter = round(float(rng.uniform(1.0, 3.0)), 1)
        radius = diameter / 2 / CM_PER_UNIT
        center = _zone_point(rng, anatomy, zone, radius / anatomy.lung_rx)
        return Lesion("nodule", zone, center, radius, "", 1.0, diameter, seed)
    if spec.pattern == "effusion":
        extent = _pick(rng, ("small", "moderate", "large"))
        height = {"small": 0.25, "moderate": 0.4, "large": 0.55}[extent] * anatomy.lung_ry * rng.uniform(0.9, 1.1)
        return Lesion("effusion", zone, (0.0, 0.0), height, extent, 1.0, 0.0, seed)
    scale = float(rng.uniform(1.3, 1.5))
    ctr = round(2 * anatomy.heart_rx * scale / (2 * (anatomy.lung_cx + anatomy.lung_rx)), 2)
    return Lesion("cardiomegaly", CARDIAC, (0.0, 0.0), scale, "", 1.0, ctr, seed)


def _fill(rng: np.random.Generator, cue: str) -> str:
    if "{days}" in cue:
        cue = cue.replace("{days}", f"{int(rng.integers(2, 6))} days")
    if "{weeks}" in cue:
        cue = cue.replace("{weeks}", f"{int(rng.integers(3, 11))} weeks")
    if "{packs}" in cue:
        cue = cue.replace("{packs}", str(5 * int(rng.integers(6, 13))))
    return cue


def _sample_cues(rng: np.random.Generator, pool: tuple[str, ...], k: int) -> list[str]:
    return [_fill(rng, pool[i]) for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


def _note(rng: np.random.Generator, spec: ClassSpec, age: int, male: bool) -> str:
    """The clinical note: demographics, shuffled cues joined in varied ways, a request."""
    noun, adj = ("man", "male") if male else ("woman", "female")
    demographics = _pick(
        rng, (f"{age}-year-old {noun}.", f"{age} year old {noun}.", f"{adj}, {age} years.", f"{adj} aged {age}.")
    )
    if spec.note_cues:
        cues = _sample_cues(rng, spec.note_cues, _pick(rng, (1, 2, 2, 2, 3, 3)))
        cues += _sample_cues(rng, NONSPECIFIC_CUES, int(rng.integers(0, 2)))
    else:
        cues = _sample_cues(rng, NONSPECIFIC_CUES, int(rng.integers(1, 4)))
    background = _sample_cues(rng, BACKGROUND_CUES, int(rng.integers(0, 3)))
    if any("smok" in cue for cue in cues):  # no "ex-smoker" next to "never smoked"
        background = [cue for cue in background if "smok" not in cue]
    cues += background
    cues = [cues[i] for i in rng.permutation(len(cues))]
    sentences: list[str] = []
    while cues:
        if len(cues) >= 2 and rng.random() < 0.35:
            sentences.append(f"{cues.pop()}{_pick(rng, (' and ', ', '))}{cues.pop()}.")
        else:
            sentences.append(f"{cues.pop()}.")
    request = _pick(rng, REQUESTS)
    return " ".join([demographics, *sentences, *([request] if request else [])])


def _zone_words(rng: np.random.Generator, zone: str) -> str:
    side, level, _ = zone.split()
    level = _pick(rng, ("mid", "middle")) if level == "mid" else level
    return _pick(rng, (f"{side} {level} zone", f"{level} zone of the {side} lung", f"{side} {level} lung zone"))


def _lesion_sentence(rng: np.random.Generator, lesion: Lesion) -> str:
    if lesion.kind == "consolidation":
        syn = _pick(rng, FINDING_SYNONYMS["consolidation"])
        texture = _pick(rng, ("patchy", "ill-defined"))
        density = "dense" if lesion.density > 0.85 else _pick(rng, ("faint", "hazy"))
        where = _zone_words(rng, lesion.zone)
        return _pick(
            rng,
            (
                f"there is {lesion.extent} {texture} {syn} in the {where}.",
                f"{lesion.extent} area of {density} {syn} in the {where}.",
                f"{density} {texture} {syn} is seen in the {where}, {lesion.extent} in extent.",
            ),
        )
    if lesion.kind == "nodule":
        syn = _pick(rng, ("pulmonary nodule", "nodule", "rounded opacity", "nodular opacity"))
        margin = _pick(rng, ("well-defined", "well-circumscribed", "smooth"))
        where, size = _zone_words(rng, lesion.zone), f"{lesion.measure:.1f} cm"
        return _pick(
            rng,
            (
                f"there is a {size} {margin} {syn} in the {where}.",
                f"a {margin} {syn} measuring {size} is seen in the {where}.",
                f"{size} {syn} of soft tissue density in the {where}.",
            ),
        )
    if lesion.kind == "effusion":
        side = lesion.zone.split()[0]
        return _pick(
            rng,
            (
                f"{lesion.extent} {side} pleural effusion with a meniscus.",
                f"blunting of the {side} costophrenic angle in keeping with a {lesion.extent} pleural effusion.",
                f"{lesion.extent} pleural effusion at the {side} base.",
                f"there is a {lesion.extent} {side} effusion.",
            ),
        )
    return _pick(
        rng,
        (
            "the cardiac silhouette is enlarged.",
            f"cardiomegaly with a cardiothoracic ratio of {lesion.measure:.2f}.",
            f"the heart is enlarged, cardiothoracic ratio {lesion.measure:.2f}.",
            "enlarged cardiac silhouette.",
        ),
    )


def _findings(rng: np.random.Generator, lesion: Lesion | None) -> tuple[str, frozenset[tuple[str, str]]]:
    """The radiology description, and the (finding, zone) pairs it states."""
    present = lesion.kind if lesion else None
    denied = [f for f in NEGATIONS if f != present]
    denied = [denied[i] for i in rng.choice(len(denied), size=int(rng.integers(2, 4)), replace=False)]
    negations = [_pick(rng, NEGATIONS[f]) for f in denied]
    if "effusion" in denied and "pneumothorax" in denied and rng.random() < 0.5:
        negations = [n for n in negations if "effusion" not in n and "pneumothorax" not in n and "angles" not in n]
        negations.append("no pleural effusion or pneumothorax.")
    negations = [negations[i] for i in rng.permutation(len(negations))]
    if lesion is None:
        opener = _pick(
            rng,
            (
                "the lungs are clear.",
                "clear lungs.",
                "no acute cardiopulmonary abnormality.",
                "normal chest radiograph.",
            ),
        )
        return " ".join([opener, *negations]), frozenset({(NORMAL, "")})
    parts = [_lesion_sentence(rng, lesion), *negations]
    if lesion.kind != "consolidation" and rng.random() < 0.4:
        parts.insert(1, _pick(rng, ("the lungs are otherwise clear.", "the lungs are clear.")))
    while len(parts) > 2 and len(split_words(" ".join(parts))) > MAX_FINDINGS_WORDS:
        parts.pop()
    return " ".join(parts), frozenset({(lesion.kind, lesion.zone)})


def studies(cfg: SynthConfig) -> Iterator[Study]:
    """The parameters and texts of every sample, in order, without rendering pixels.

    Raises:
        ConfigError: (at the call, not at the first item) a class name is not in CATALOGUE (the
            message lists the known ones), or all class weights are zero.
    """
    specs = _specs(cfg)
    _class_block(cfg, 0)  # checks the weights
    return _studies(cfg, specs)


def _studies(cfg: SynthConfig, specs: list[ClassSpec]) -> Iterator[Study]:
    block_size = _BLOCK_PER_CLASS * len(specs)
    block_index, block = -1, np.empty(0, dtype=int)
    patient, left_for_patient = -1, 0
    anatomy, age, male = None, 0, False
    for index in range(cfg.num_samples):
        if left_for_patient == 0:
            patient += 1
            prng = _rng(cfg, _PATIENT, patient)
            left_for_patient = 1 + int(prng.poisson(cfg.images_per_patient - 1))
            anatomy, age, male = _draw_anatomy(prng), int(prng.integers(25, 86)), bool(prng.random() < 0.5)
        left_for_patient -= 1
        if index // block_size != block_index:
            block_index = index // block_size
            block = _class_block(cfg, block_index)
        class_index = int(block[index % block_size])
        spec = specs[class_index]

        rng = _rng(cfg, _STUDY, index)
        pose = (math.radians(rng.uniform(-5, 5)), rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
        exposure = (rng.uniform(0.85, 1.2), rng.uniform(-0.06, 0.06), rng.uniform(0.85, 1.15), rng.uniform(0.01, 0.03))
        noise_seed = int(rng.integers(1 << 62))
        lesion = _draw_lesion(rng, spec, anatomy)
        report = _note(rng, spec, age, male)
        findings, intended = _findings(rng, lesion)

        label = class_index
        nrng = _rng(cfg, _NOISE, index)
        if nrng.random() < cfg.label_noise:
            label = (class_index + 1 + int(nrng.integers(len(specs) - 1))) % len(specs)
        yield Study(
            index,
            f"P{patient:06d}",
            class_index,
            label,
            anatomy,
            pose,
            exposure,
            noise_seed,
            lesion,
            report,
            findings,
            intended,
        )


# --------------------------------------------------------------------------------------------
# Rendering (vectorized numpy, float32)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: x as (1, S), y as (S, 1)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
    return c[None, :], c[:, None]


@functools.lru_cache(maxsize=32)
def _upsampler(size: int, n: int) -> np.ndarray:
    """(S, n) bilinear interpolation matrix from an n-point grid to S pixel centres."""
    pos = np.clip((np.arange(size) + 0.5) / size * n - 0.5, 0, n - 1)
    lo = np.minimum(np.floor(pos).astype(int), n - 2)
    frac = pos - lo
    m = np.zeros((size, n), dtype=np.float32)
    m[np.arange(size), lo] = 1 - frac
    m[np.arange(size), lo + 1] += frac
    return m


def _smooth_noise(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    up = _upsampler(size, n)
    return up @ rng.standard_normal((n, n)).astype(np.float32) @ up.T


def _inside(signed: np.ndarray, soft: float) -> np.ndarray:
    """1 inside (signed < 0), 0 outside, with a linear edge `soft` wide."""
    return np.clip(0.5 - signed / soft, 0.0, 1.0)


def _ellipse(u, v, cx, cy, rx, ry, soft):
    r = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return _inside((r - 1) * min(rx, ry), soft)


def _segment(u, v, p0, p1, width, soft):
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy), 0, 1)
    return _inside(np.sqrt((u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2) - width, soft)


def render(study: Study, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The film as uint8 (size, size), and the lesion's pixel mask (None without a lesion)."""
    a, lesion = study.anatomy, study.lesion
    theta, shift_x, shift_y = study.pose
    contrast, brightness, gamma, sigma = study.exposure
    x, y = _grid(size)
    cos, sin = math.cos(theta), math.sin(theta)
    dx, dy = x - shift_x, y - shift_y
    u = ((cos * dx + sin * dy) / a.scale_x).astype(np.float32)  # anatomical coordinates (S, S)
    v = ((cos * dy - sin * dx) / a.scale_y).astype(np.float32)
    px = 2.0 / size / min(a.scale_x, a.scale_y)  # one pixel in anatomical units
    soft = max(0.03, 1.5 * px)

    noise_rng = np.random.default_rng(study.noise_seed)
    markings = _smooth_noise(noise_rng, size, 10) + 0.6 * _smooth_noise(noise_rng, size, max(6, size // 5))
    grain = noise_rng.standard_normal((size, size), dtype=np.float32)

    bu, bv = u * (1 / 0.95), (v - 0.15) * (1 / 1.2)
    bu, bv = bu * bu, bv * bv
    body = _inside((np.sqrt(np.sqrt(bu * bu + bv * bv)) - 1) * 0.95, 0.04)  # a rounded-square torso
    t = (v - a.lung_cy) * (1 / a.lung_ry)
    t3 = np.abs(t * t * t)
    local_rx = a.lung_rx * (0.9 + 0.15 * np.clip(t, -1, 0.7))  # narrow apex, wide base
    # Diaphragm: one dome per side (the right one higher), the abdomen below it.
    lateral = np.minimum(((np.abs(u) - a.lung_cx) * (1 / a.lung_rx)) ** 2, 1)
    height = np.where(u < 0, np.float32(0.86 * a.lung_ry), np.float32(0.9 * a.lung_ry))
    floor = (a.lung_cy - a.dome) + height + a.dome * lateral
    abdomen = body * _inside(floor + 0.03 - v, 0.06)
    lungs, hemithorax = {}, {}
    for side, s in SIDES.items():
        q = np.abs((u - s * a.lung_cx) / local_rx)
        hemithorax[side] = _inside((np.cbrt(q * q * q + t3) - 1) * a.lung_rx, soft)  # a full, rounded lung
        lungs[side] = hemithorax[side] * _inside(v - floor, soft)
    lung = lungs["right"] + lungs["left"]

    phase = (v - a.rib_phase * a.rib_spacing + 0.25 * np.abs(u) - 0.55 * u * u) * (1 / a.rib_spacing)
    ribs = 0.5 + 0.5 * np.cos((2 * np.pi) * phase)
    ribs = ribs * ribs
    ribs = ribs * ribs * ribs * (hemithorax["right"] + hemithorax["left"]) * (1 - abdomen)  # thin bright bands
    clavicles = sum(_segment(u, v, (s * 0.08, -0.74), (s * 0.62, -0.84), 0.03, soft) for s in SIDES.values())
    hila = sum(np.exp(-((u - s * 0.17) ** 2 + (v - a.lung_cy - 0.08) ** 2) / 0.006) for s in SIDES.values())
    mediastinum = _inside(np.abs(u) - 0.13, soft) * _inside(v - 0.3, soft)
    trachea = _inside(np.abs(u) - 0.028, soft) * _inside(v + 0.3, soft)

    heart_rx, heart_ry, heart_cy = a.heart_rx, a.heart_ry, a.heart_cy
    if lesion is not None and lesion.kind == "cardiomegaly":
        heart_rx, heart_ry = a.heart_rx * lesion.size, a.heart_ry * (1 + 0.6 * (lesion.size - 1))
        heart_cy = a.heart_cy - (heart_ry - a.heart_ry) * 0.8  # grows up and out: it sits on the diaphragm
    heart = _ellipse(u, v, a.heart_cx, heart_cy, heart_rx, heart_ry, soft)

    film = 0.04 + (a.tissue - 0.04) * body
    film = film + (0.72 - film) * abdomen
    film = film - 0.34 * lung * (1 + 0.12 * markings) + 0.1 * ribs + 0.12 * clavicles + 0.1 * hila * lung
    film = film + (0.74 - film) * mediastinum - 0.16 * trachea
    film = film + (0.8 - film) * heart

    weight, mask = None, None
    if lesion is not None:
        if lesion.kind == "cardiomegaly":
            weight = heart
        else:
            weight = _lesion_weight(lesion, a, u, v, px, soft, lungs, size)
            level = {"consolidation": 0.72, "nodule": 0.82, "effusion": 0.7}[lesion.kind]
            film = film + (level - film) * weight * lesion.density
        mask = weight >= MASK_LEVEL
        if not mask.any():  # a lesion smaller than a pixel: its brightest pixel
            mask = np.zeros_like(mask)
            mask[np.unravel_index(int(np.argmax(weight)), weight.shape)] = True

    film = np.clip((film - 0.45) * contrast + 0.45 + brightness, 0.0, 1.0) ** gamma + sigma * grain
    return (np.clip(film, 0.0, 1.0) * 255 + 0.5).astype(np.uint8), mask


def _lesion_weight(
    lesion: Lesion, a: Anatomy, u: np.ndarray, v: np.ndarray, px: float, soft: float, lungs: dict, size: int
) -> np.ndarray:
    """Per-pixel blend weight in [0, 1] of the lesion (consolidation, nodule, effusion)."""
    cu, cv = lesion.center
    if lesion.kind == "nodule":
        return _inside(np.sqrt((u - cu) ** 2 + (v - cv) ** 2) - lesion.size, max(0.012, px))
    side = lesion.zone.split()[0]
    if lesion.kind == "effusion":
        s, cx = SIDES[side], SIDES[side] * a.lung_cx
        lateral = np.clip(s * (u - cx) / a.lung_rx + 0.2, 0, None)
        surface = a.lung_cy + a.lung_ry * 0.9 - lesion.size * (1 + 0.6 * lateral**2)  # meniscus
        return lungs[side] * _inside(surface - v, soft)
    rng = np.random.default_rng(lesion.seed)
    n = int(rng.integers(3, 7))
    offsets = rng.normal(0.0, lesion.size * 0.8, size=(n, 2))
    radii = rng.uniform(0.6, 1.0, size=n) * lesion.size
    field = np.zeros_like(u)
    for (ox, oy), r in zip(offsets, radii):
        field += np.exp(-((u - cu - ox) ** 2 + (v - cv - oy) ** 2) / (2 * r * r))
    patchy = 0.75 + 0.35 * _smooth_noise(rng, size, 14)
    return np.clip(1.6 * field * patchy - 0.3, 0.0, 1.0) * lungs[side]


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight normalized xyxy box (pixel edges) around the True pixels of a (H, W) mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def generate(cfg: SynthConfig) -> Iterator[Sample]:
    """`cfg.num_samples` synthetic samples, deterministic in `cfg`.

    Raises:
        ConfigError: (at the call) as `studies`.
    """
    return _samples(studies(cfg), cfg.image_size)


def _samples(plan: Iterator[Study], size: int) -> Iterator[Sample]:
    for study in plan:
        gray, mask = render(study, size)
        yield Sample(
            sample_id=study.sample_id,
            patient_id=study.patient_id,
            image=encode_png(gray),
            height=size,
            width=size,
            report=study.report,
            findings=study.findings,
            labels=[study.label],
            box=None if mask is None else tuple(float(c) for c in box_from_mask(mask)),
        )


# --------------------------------------------------------------------------------------------
# Parsing findings back into (finding, zone) pairs
# --------------------------------------------------------------------------------------------

_MENTION = re.compile(
    "|".join(f"(?P<{name}>{'|'.join(sorted(syns, key=len, reverse=True))})" for name, syns in FINDING_SYNONYMS.items())
)
_NEGATION = re.compile(r"\b(?:no|not|without|negative for|free of|absence of)\b")
_CLAUSE = re.compile(r"[,;:]|\bbut\b|\bhowever\b|\balthough\b")
_LUNG_ZONE = re.compile(
    r"\b(?P<s1>right|left) (?P<l1>upper|mid|middle|lower)(?: lung)? zone\b"
    r"|\b(?P<l2>upper|mid|middle|lower) zone of the (?P<s2>right|left) lung\b"
)
_SIDE = re.compile(r"\b(right|left)\b")


def _zone_name(match: re.Match) -> str:
    level = match["l1"] or match["l2"]
    return f"{match['s1'] or match['s2']} {'mid' if level == 'middle' else level} zone"


def _nearest(matches: list[tuple[int, str]], position: int) -> str:
    return min(matches, key=lambda m: abs(m[0] - position))[1] if matches else ""


def parse_findings(text: str) -> set[tuple[str, str]]:
    """The (finding, zone) pairs a findings text asserts.

    Findings are the keys of FINDING_SYNONYMS (any synonym maps to its key); zones are ZONES
    (consolidation and nodule: the nearest lung zone in the sentence; effusion: "<side> base" from
    the nearest side word; cardiomegaly: "cardiac"); "" when the sentence names no zone. A mention
    is negated when "no", "not", "without", "negative for", "free of" or "absence of" precedes it in
    the same clause (clauses end at , ; : but however although), and negated mentions are dropped.
    A text with no positive mention but a normal statement or a negation ("the lungs are clear",
    "no pleural effusion") gives ``{("normal", "")}``, so normal studies score like any other
    finding; a text with nothing recognizable gives the empty set.
    """
    found: set[tuple[str, str]] = set()
    negated_any = False
    for sentence in re.split(r"\.(?:\s+|$)|\n", text.lower()):
        sentence = " ".join(sentence.split())
        zones = [(m.start(), _zone_name(m)) for m in _LUNG_ZONE.finditer(sentence)]
        sides = [(m.start(), m.group(1)) for m in _SIDE.finditer(sentence)]
        for mention in _MENTION.finditer(sentence):
            clause_start = max([0] + [c.end() for c in _CLAUSE.finditer(sentence, 0, mention.start())])
            if _NEGATION.search(sentence, clause_start, mention.start()):
                negated_any = True
                continue
            finding = mention.lastgroup
            if finding == "cardiomegaly":
                zone = CARDIAC
            elif finding == "effusion":
                side = _nearest(sides, mention.start())
                zone = f"{side} base" if side else ""
            elif finding == "pneumothorax":
                zone = _nearest(sides, mention.start())
            else:
                zone = _nearest(zones, mention.start())
            found.add((finding, zone))
    if found:
        return found
    if negated_any or any(phrase in " ".join(text.lower().split()) for phrase in NORMAL_PHRASES):
        return {(NORMAL, "")}
    return set()
