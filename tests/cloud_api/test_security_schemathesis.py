"""Property-based requests generated from the app's own OpenAPI document (schemathesis), sent
with a valid admin token to the real app and database: no 5xx for any request, and every
error answer is problem+json."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from psycopg_pool import ConnectionPool
from schemathesis.generation.case import Case

from tests.cloud_api.securitykit import secured_api, seed_two_sites


def check(case: Case, headers: dict[str, str]) -> None:
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])
        value = content_type[0] if isinstance(content_type, list) else content_type
        assert value.startswith("application/problem+json"), (
            case.method,
            case.formatted_path,
            response.status_code,
        )


def test_generated_requests(pg_url: str, pool: ConnectionPool, tmp_path: Path) -> None:
    seed_two_sites(pg_url)
    api = secured_api(pg_url, pool, tmp_path)
    headers = api.headers("admin", ["*"])
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5
    calls: list[tuple[str, str]] = []
    for operation in operations:

        @settings(
            max_examples=15,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: Case) -> None:
            check(case, headers)
            calls.append((case.method, case.operation.path))

        run()
    # Every operation was exercised, most of them many times.
    assert {path for _, path in calls} == {op.path for op in operations}
    assert len(calls) >= 5 * len(operations)
