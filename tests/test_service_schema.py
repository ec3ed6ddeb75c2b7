"""Property-based fuzzing of every operation in the service's OpenAPI schema (schemathesis): whatever
the request, authorised or not, the server must not answer with a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from live_server import KEY_A, LiveServer, install_model


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("fuzz-home")
    install_model(home, "tiny-llama", tiny_model_dir)
    # a short context keeps generated max_tokens cheap; no worker: queued jobs need not run here
    with LiveServer(home, "tiny-llama", "transformers", workers=0,
                    extra_env={"SAFEKEEL_MAX_MODEL_LEN": "96", "SAFEKEEL_MAX_UPLOAD_BYTES": "100000"}) as live:
        yield live


def test_no_server_errors_on_any_schema_operation(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    headers = {"Authorization": f"Bearer {KEY_A}"}
    seen: dict[str, set[int]] = {}

    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def run(case):
            response = case.call(base_url=fuzz_server.url, headers=headers, timeout=60)
            seen.setdefault(label, set()).add(response.status_code)
            assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}\n{fuzz_server.log_tail(20)}"

        run()
    assert set(seen) == {f"{op.method.upper()} {op.path}" for op in operations}
