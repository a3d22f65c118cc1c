"""The quality gate: whether an evaluated model may be deployed (the pipeline deploys only when it passes)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion.config import ConfigError


@dataclass
class GateCheck:
    """One gated metric against its minimum."""

    metric: str
    value: float | None
    """The reported value; None when evaluate did not report the metric."""
    threshold: float
    passed: bool

    def shown_value(self, missing: str = "missing") -> str:
        """The value as printed, `missing` when it was not reported."""
        return str(self.value) if self.value is not None else missing


@dataclass
class GateResult:
    """Whether a model may be deployed, and why."""

    passed: bool
    checks: list[GateCheck] = field(default_factory=list)
    """One per gate."""

    def summary(self) -> str:
        """One line: PASS or BLOCKED, and each metric against its minimum."""
        parts = [f"{c.metric} {c.shown_value()} {'>=' if c.passed else '<'} {c.threshold}" for c in self.checks]
        return ("PASS: " if self.passed else "BLOCKED: ") + "; ".join(parts)


def quality_gate(metrics: Mapping[str, Any], gates: Mapping[str, Any]) -> GateResult:
    """Pass when every gated metric reaches its minimum (all evaluate headline metrics are
    higher-is-better); a gated metric that was not reported fails its gate.

    Args:
        metrics: evaluate's headline metrics.
        gates: {metric: minimum}.

    Returns:
        The verdict and each gate's check.

    Raises:
        ConfigError: no gates, or a threshold that is not a number.
    """
    if not gates:
        raise ConfigError("gates: at least one {metric: minimum} is required (e.g. {accuracy: 0.8})")
    checks = []
    for metric, threshold in gates.items():
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError(f"gates.{metric}: the minimum must be a number, got {threshold!r}")
        value = metrics.get(metric)
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        passed = value is not None and value >= threshold
        checks.append(GateCheck(metric=metric, value=value, threshold=float(threshold), passed=passed))
    return GateResult(passed=all(c.passed for c in checks), checks=checks)


def write_gate_decision(artifact: Any, result: GateResult) -> None:
    """The gate's verdict as a Markdown table in a KFP Markdown artifact (and on stdout)."""
    print(result.summary())
    lines = ["| metric | value | minimum | passed |", "|---|---|---|---|"]
    lines += [
        f"| {c.metric} | {c.shown_value('not reported')} | {c.threshold} | {'yes' if c.passed else 'no'} |"
        for c in result.checks
    ]
    verdict = f"**{'Deploy' if result.passed else 'Blocked'}**: {result.summary()}\n\n"
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(verdict + "\n".join(lines) + "\n")
    artifact.metadata["passed"] = result.passed
