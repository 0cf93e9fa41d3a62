"""Schema-driven fuzzing of the HTTP API from its own /openapi.json: no request makes it answer 5xx.

One test per API operation with its own node id: schemathesis' `schema.parametrize()` gives every operation the
same node id, and pytest-xdist (which schedules by node id) would then run only one of them."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from api_fixtures import build_api  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

app, _ = build_api()
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
OPERATIONS = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


def test_the_schema_lists_every_operation():
    assert set(OPERATIONS) >= {"POST /v1/images/segmentations", "GET /v1/models", "POST /authentication/validate"}


@pytest.mark.parametrize("name", sorted(OPERATIONS))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_input_makes_the_api_fail(name, data):
    case = data.draw(OPERATIONS[name].as_strategy())
    response = case.call()
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["message"] and error["type"]
