"""KFP component: the quality gate (medfusion.orchestration.quality_gate) that deploy waits on."""

from kfp import dsl
from kfp.dsl import Markdown, Output

from medfusion.orchestration.kuberay import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def quality_gate(metrics: dict, gates: dict, decision: Output[Markdown]) -> bool:
    """Return whether every gated metric reaches its minimum (the pipeline deploys only then).

    A single bool output (not a NamedTuple): kfp.local (2.17) resolves a condition on a task's
    ``Output`` but not on a named output.

    Args:
        metrics: evaluate's headline metrics.
        gates: {metric: minimum}.
        decision: each gated metric against its threshold, and the verdict.
    """
    from medfusion.orchestration import gate

    result = gate.quality_gate(metrics, gates)
    gate.write_gate_decision(decision, result)
    return result.passed
