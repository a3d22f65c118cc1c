"""A property-based fuzz of the OpenAPI schema (Schemathesis over Hypothesis) on the real Serve app.

Every operation the schema publishes gets requests generated from it, valid and invalid, with auth on
(the valid token sent) and with auth off. Each answer must be no 5xx, a status and a content type the
schema documents, a body that matches the documented schema, and, with auth on, a /v1 answer that
only a valid token gets. The default run is bounded to about a minute for both modes together; the
`slow` variant runs ten times the examples.
"""

from __future__ import annotations

import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from serve_cases import LIMITS, TOKEN

pytestmark = pytest.mark.integration

AUTH = {"auth-on": True, "auth-off": False}
EXAMPLES = 500  # per auth mode: 11-15 s each on 2 CPU cores, under a minute with both deployments
SLOW_EXAMPLES = 5000
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module", params=list(AUTH))
def fuzz_app(request, deploy_module, tiny_export, token_file) -> tuple[str, bool]:
    auth = AUTH[request.param]
    extra = {"auth_token_file": token_file} if auth else {"auth_token_env": "MEDFUSION_FUZZ_NO_TOKEN"}
    url = deploy_module(f"fuzz-{request.param}", model=tiny_export.uri, num_cpus=0.25, limits=vars(LIMITS), **extra)
    return url, auth


def fuzz(url: str, auth: bool, examples: int) -> dict[str, int]:
    """Send `examples` generated requests over the schema's operations; return the count per status."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/model", "/healthz", "/readyz"}
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode])
    headers = {"Authorization": f"Bearer {TOKEN}"} if auth else {}
    checks = CHECKS + ([ignored_auth] if auth else [])
    statuses: dict[str, int] = {}
    session = requests.Session()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure here is a regression, not luck
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case) -> None:
        response = case.call(base_url=url, session=session, headers=headers, timeout=60)
        key = f"{case.method} {case.path} {response.status_code}"
        statuses[key] = statuses.get(key, 0) + 1
        # Every multipart field arrives as text: a number, or a list sent as no part at all, violates
        # nothing the server can see, so invalid multipart bodies are not required to be refused.
        multipart = (case.media_type or "").startswith("multipart/")
        case.validate_response(
            response, checks=[c for c in checks if not (multipart and c is negative_data_rejection)], headers=headers
        )

    run()
    return statuses


def _report(url: str, auth: bool, examples: int) -> None:
    start = time.monotonic()
    statuses = fuzz(url, auth, examples)
    seconds = time.monotonic() - start
    print(f"fuzz ({'auth on' if auth else 'auth off'}): {sum(statuses.values())} cases in {seconds:.1f} s: {statuses}")
    assert sum(statuses.values()) >= examples


def test_fuzz_the_openapi_schema(fuzz_app):
    _report(*fuzz_app, EXAMPLES)


@pytest.mark.slow
def test_fuzz_the_openapi_schema_longer(fuzz_app):
    _report(*fuzz_app, SLOW_EXAMPLES)
