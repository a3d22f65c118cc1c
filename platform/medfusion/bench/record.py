"""The ratios of a benchmark's JSON record, each the quotient of two of its figures.

A bench names each ratio's terms once (``{ratio: (numerator figure, denominator figure)}``); the
record carries them as ``ratio_of`` and computes each ratio from the figures *as reported* (rounded),
so a reader of the JSON recomputes every ratio from the figures it names, up to the ratio's own
rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def ratios_of(
    figures: Mapping[str, Mapping[str, Any]], terms: Mapping[str, tuple[str, str]], digits: int = 3
) -> dict[str, float | None]:
    """Each ratio of `terms` as ``figures[numerator] / figures[denominator]``, rounded to `digits`.

    A ratio is None when a term's value is None (not measured, e.g. a target never reached) or the
    denominator is 0.

    Raises:
        KeyError: a term names a figure the record does not have.
    """
    ratios: dict[str, float | None] = {}
    for name, (numerator, denominator) in terms.items():
        top, bottom = figures[numerator]["value"], figures[denominator]["value"]
        ratios[name] = None if top is None or not bottom else round(top / bottom, digits)
    return ratios


def ratio_terms(terms: Mapping[str, tuple[str, str]]) -> dict[str, list[str]]:
    """`terms` as the record's ``ratio_of`` field (JSON lists)."""
    return {name: list(pair) for name, pair in terms.items()}
