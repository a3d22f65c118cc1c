"""What every `medfusion bench` JSON record must satisfy, whatever the machine measured: each ratio is
the quotient of the two figures its `ratio_of` entry names, and systems compared were measured on the
same number of samples (requests, trials)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# Ratios are rounded to 3 (tune: 4) digits from the figures as reported.
RATIO_ROUNDING = 0.5e-3 + 1e-9


def check_ratios(record: Mapping[str, Any]) -> None:
    """Every ratio names two figures of the record and equals their quotient (None when the numerator
    was not measured or the denominator is 0)."""
    figures, ratios, terms = record["figures"], record["ratios"], record["ratio_of"]
    assert set(terms) == set(ratios), (
        f"ratios without terms {set(ratios) - set(terms)}, terms without a ratio {set(terms) - set(ratios)}"
    )
    for name, value in ratios.items():
        numerator, denominator = terms[name]
        assert {numerator, denominator} <= set(figures), f"{name}: names figures the record lacks: {terms[name]}"
        top, bottom = figures[numerator]["value"], figures[denominator]["value"]
        if top is None or not bottom:
            assert value is None, f"{name} = {value}, but {numerator} / {denominator} = {top} / {bottom} has no value"
            continue
        assert value is not None and abs(value - top / bottom) <= RATIO_ROUNDING, (
            f"{name} = {value}, but {numerator} / {denominator} = {top} / {bottom} = {top / bottom:.5f}"
        )


def check_counts(figures: Mapping[str, Mapping[str, Any]], names: Iterable[str], expected: int) -> None:
    """The count figures `names` (samples, requests, trials each system was measured on) all equal `expected`."""
    counts = {name: figures[name]["value"] for name in names}
    assert set(counts.values()) == {expected}, f"systems measured on different counts (expected {expected}): {counts}"
