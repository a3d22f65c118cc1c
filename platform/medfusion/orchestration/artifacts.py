"""KFP artifact recording: what a pipeline step writes into its output artifacts.

The artifacts are duck-typed (``.path``, ``.metadata``, ``.uri``, ``log_metric``...): kfp is not
imported here, so the components in ``medfusion.components`` pass theirs in. A stage's data stays
where the stage wrote it; an artifact records where that is and the stage's result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medfusion import storage


def record_artifact(artifact: Any, uri: str, result: Mapping[str, Any]) -> None:
    """Describe a stage output in a KFP artifact: `uri` and the result's other URIs and names in its
    metadata, the whole result as JSON in its file (the data itself stays where the stage wrote it).

    Numbers stay out of the metadata: KFP stores it as a protobuf Struct, which turns ints into floats,
    and the changed metadata would change the cache key of every downstream step."""
    artifact.metadata["uri"] = uri
    for key, value in result.items():
        if isinstance(value, str) and key != "uri":
            artifact.metadata[key] = value
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(result, indent=2, default=str))


def artifact_uri(artifact: Any) -> str:
    """Where the data of an artifact written by `record_artifact` is."""
    uri = artifact.metadata.get("uri") or json.loads(Path(artifact.path).read_text()).get("uri", "")
    if not uri:
        raise ValueError(f"artifact {artifact.uri}: names no data location (metadata 'uri')")
    return uri


def log_metrics(metrics: Any, values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Log every finite number of `values` to a KFP Metrics artifact; return them."""
    logged = {}
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics.log_metric(prefix + key, float(value))
            logged[prefix + key] = float(value)
    return logged


def log_result_metrics(metrics: Any, result: Mapping[str, Any]) -> dict[str, float]:
    """A train or tune result's numbers into a KFP Metrics artifact: its top-level numbers (best value,
    epochs...) and its ``test_metrics`` / ``best_metrics`` (prefixed ``test_`` / ``best_``)."""
    logged = log_metrics(metrics, result)
    for key, prefix in (("test_metrics", "test_"), ("best_metrics", "best_")):
        logged.update(log_metrics(metrics, result.get(key) or {}, prefix=prefix))
    return logged


def log_evaluation(result: Mapping[str, Any], metrics: Any, classification: Any, report: Any) -> dict[str, float]:
    """An evaluate result into KFP artifacts: headline metrics, the confusion matrix, report.html."""
    record = json.loads(storage.read_text(result["metrics_uri"]))
    classification.log_confusion_matrix(
        list(record["classes"]), [[int(v) for v in row] for row in record["confusion_matrix"]]
    )
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(storage.read_text(result["report_uri"]))
    report.metadata["uri"] = result["report_uri"]
    return log_metrics(metrics, result["metrics"])


def write_leaderboard(artifact: Any, leaderboard_uri: str, max_rows: int = 50) -> None:
    """Tune's leaderboard.json as a KFP Markdown artifact: the table `medfusion tune` prints (rank,
    trial, fusion, searched settings, metrics, objective, epochs, early stop, status), best first."""
    from medfusion.tuning.results import leaderboard_table

    data = json.loads(storage.read_text(leaderboard_uri))
    trials = data.get("trials", [])
    table = leaderboard_table(
        trials[:max_rows], list(data.get("search_space", {})), list(data.get("pareto_metrics", []))
    )
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(
        f"Leaderboard ({len(trials)} trials, best first): {leaderboard_uri}\n\n```\n{table}\n```\n"
    )
    artifact.metadata["uri"] = leaderboard_uri
