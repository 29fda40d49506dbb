"""Schemathesis against the served OpenAPI schema: every operation, valid and invalid inputs, with and without
a valid API key, and not one server error (5xx). Bounded in examples and time."""
from __future__ import annotations

import time
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

EXAMPLES_PER_OPERATION = 25
BUDGET_S = 60.0


def _checker(operation: Any, mode: GenerationMode, url: str, auth: dict[str, str], calls: dict[str, Any]) -> Any:
    """One Hypothesis test for one operation and generation mode (a factory, so each binds its own operation)."""

    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        headers = None if operation.path == "/healthz" or calls["n"] % 7 == 6 else auth  # some without a key
        response = case.call(base_url=url, headers=headers, timeout=60)
        calls["n"] += 1
        calls["statuses"].add(response.status_code)
        assert response.status_code < 500, (operation.label, case.as_curl_command(), response.text[:300])
        case.validate_response(response, checks=[not_a_server_error])

    return check


def test_no_server_errors_anywhere(service: Any) -> None:
    schema = schemathesis.openapi.from_url(service.url + "/openapi.json", timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12
    auth = {"Authorization": f"Bearer {service.keys['alice']}"}
    deadline = time.monotonic() + BUDGET_S
    calls: dict[str, Any] = {"n": 0, "statuses": set()}
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                break
            try:
                _checker(operation, mode, service.url, auth, calls)()
            except Unsatisfiable:
                # an operation without inputs (e.g. GET /healthz) has no invalid form to generate
                assert mode == GenerationMode.NEGATIVE, operation.label
    print(f"schemathesis: {calls['n']} calls, statuses {sorted(calls['statuses'])}")
    assert calls["n"] >= 100, calls
    assert {200, 401, 422} <= calls["statuses"]
