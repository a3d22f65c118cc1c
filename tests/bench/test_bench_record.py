"""The bench record's ratios come from its figures, and the invariant checks of the bench tests fail on a
record that breaks them (a ratio that is not its figures' quotient, systems measured on different counts)."""

from __future__ import annotations

import copy

import pytest
from bench_invariants import check_counts, check_ratios

from medfusion.bench.record import ratio_terms, ratios_of

FIGURES = {
    "ray_data_samples_per_s": {"value": 1703.4, "unit": "samples/s"},
    "dataloader_samples_per_s": {"value": 3040.1, "unit": "samples/s"},
    "asha_trial_epochs_to_target": {"value": None, "unit": "trial-epochs"},  # never reached
    "grid_trial_epochs": {"value": 90, "unit": "trial-epochs"},
    "idle_rps": {"value": 0.0, "unit": "req/s"},
    "ray_data_samples": {"value": 2000, "unit": "samples"},
    "dataloader_samples": {"value": 2000, "unit": "samples"},
}
TERMS = {
    "ray_data_vs_dataloader": ("ray_data_samples_per_s", "dataloader_samples_per_s"),
    "asha_vs_grid_epochs": ("asha_trial_epochs_to_target", "grid_trial_epochs"),
    "grid_vs_idle": ("grid_trial_epochs", "idle_rps"),
}


def _record() -> dict:
    return {"figures": copy.deepcopy(FIGURES), "ratios": ratios_of(FIGURES, TERMS), "ratio_of": ratio_terms(TERMS)}


def test_ratios_are_the_quotients_of_the_figures_as_reported():
    record = _record()
    assert record["ratios"] == {"ray_data_vs_dataloader": 0.56, "asha_vs_grid_epochs": None, "grid_vs_idle": None}
    assert record["ratio_of"]["ray_data_vs_dataloader"] == ["ray_data_samples_per_s", "dataloader_samples_per_s"]
    check_ratios(record)
    check_counts(record["figures"], ["ray_data_samples", "dataloader_samples"], 2000)
    with pytest.raises(KeyError, match="decode_ceiling_samples_per_s"):
        ratios_of(FIGURES, {"ray_data_vs_decode_ceiling": ("ray_data_samples_per_s", "decode_ceiling_samples_per_s")})


def _off_by_a_percent(record):
    record["ratios"]["ray_data_vs_dataloader"] = round(1.01 * 1703.4 / 3040.1, 3)


def _inverted(record):
    record["ratios"]["ray_data_vs_dataloader"] = round(3040.1 / 1703.4, 3)


def _unrounded_figure(record):
    record["figures"]["dataloader_samples_per_s"]["value"] = 2 * 3040.1  # figure and ratio from different runs


def _value_for_an_unreached_target(record):
    record["ratios"]["asha_vs_grid_epochs"] = 1.0


def _without_terms(record):
    del record["ratio_of"]["ray_data_vs_dataloader"]


def _terms_name_a_missing_figure(record):
    record["ratio_of"]["ray_data_vs_dataloader"] = ["ray_data_samples_per_s", "decode_ceiling_samples_per_s"]


@pytest.mark.parametrize(
    "break_record, message",
    [
        (
            _off_by_a_percent,
            "ray_data_vs_dataloader = 0.566, but ray_data_samples_per_s / dataloader_samples_per_s = 1703.4 / 3040.1",
        ),
        (_inverted, "ray_data_vs_dataloader = 1.785, but"),
        (_unrounded_figure, "ray_data_vs_dataloader = 0.56, but .* = 0.28016"),
        (_value_for_an_unreached_target, "asha_vs_grid_epochs = 1.0, but .* = None / 90 has no value"),
        (_without_terms, "ratios without terms {'ray_data_vs_dataloader'}"),
        (_terms_name_a_missing_figure, "names figures the record lacks"),
    ],
)
def test_a_ratio_that_is_not_its_figures_quotient_fails(break_record, message):
    record = _record()
    break_record(record)
    with pytest.raises(AssertionError, match=message):
        check_ratios(record)


def test_systems_measured_on_different_counts_fail():
    figures = copy.deepcopy(FIGURES)
    figures["dataloader_samples"]["value"] = 1984  # e.g. a DataLoader worker that skipped a batch
    with pytest.raises(AssertionError, match="different counts .*'dataloader_samples': 1984"):
        check_counts(figures, ["ray_data_samples", "dataloader_samples"], 2000)
