"""Schema-driven fuzzing of the HTTP API from its own /openapi.json: no request makes it answer 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from api_fixtures import build_api  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

app, _ = build_api()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_api_fail(case):
    response = case.call()
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]
