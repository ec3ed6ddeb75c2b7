"""The service's OpenAPI schema: it describes what each route returns, and property-based fuzzing of every
operation (schemathesis) finds no 5xx and no response the schema does not describe."""

from __future__ import annotations

import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, response_schema_conformance, status_code_conformance

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
            # the status is one the schema lists, and the body and its content type are what it says
            case.validate_response(response, checks=[status_code_conformance, content_type_conformance, response_schema_conformance])

        run()
    assert set(seen) == {f"{op.method.upper()} {op.path}" for op in operations}


def _success_schema(schema: dict, path: str, method: str) -> tuple[dict, set[str]]:
    """The JSON schema of an operation's 200 response (references resolved one level), and its media types."""
    content = schema["paths"][path][method]["responses"]["200"]["content"]
    body = content["application/json"]["schema"]
    return _resolve(schema, body), set(content)


def _resolve(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    return schema["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else node


def test_the_openapi_schema_describes_what_each_route_returns(fuzz_server):
    with urllib.request.urlopen(fuzz_server.url + "/openapi.json") as response:
        schema = json.loads(response.read())
    # (path, method) -> fields the 200 response names, and for lists the fields of each item
    expected = {
        ("/v1/files", "post"): {"id", "object", "bytes", "created_at", "filename", "purpose", "status"},
        ("/v1/files/{file_id}", "get"): {"id", "bytes", "filename", "purpose"},
        ("/v1/files/{file_id}", "delete"): {"id", "object", "deleted"},
        ("/v1/fine_tuning/jobs", "post"): {"id", "status", "model", "training_file", "hyperparameters", "fine_tuned_model",
                                           "error", "seed", "method", "safety", "result"},
        ("/v1/fine_tuning/jobs/{job_id}", "get"): {"id", "status", "safety", "result"},
        ("/v1/fine_tuning/jobs/{job_id}/cancel", "post"): {"id", "status"},
        ("/v1/models/{model_id}", "get"): {"id", "object", "created", "owned_by", "parent", "served", "guard"},
        ("/v1/chat/completions", "post"): {"id", "object", "created", "model", "choices", "usage", "safekeel"},
        ("/v1/completions", "post"): {"id", "object", "created", "model", "choices", "usage"},
        ("/healthz", "get"): {"status", "engine", "workers", "jobs"},
    }
    for (path, method), fields in expected.items():
        body, _ = _success_schema(schema, path, method)
        assert fields <= set(body.get("properties", {})), (path, method, sorted(body.get("properties", {})))
    listed = {
        ("/v1/files", "get"): {"id", "filename", "purpose", "bytes"},
        ("/v1/fine_tuning/jobs", "get"): {"id", "status", "safety", "result"},
        ("/v1/fine_tuning/jobs/{job_id}/events", "get"): {"id", "created_at", "level", "message", "type", "data"},
        ("/v1/fine_tuning/jobs/{job_id}/checkpoints", "get"): {"id", "step_number", "fine_tuned_model_checkpoint", "metrics",
                                                               "fine_tuning_job_id"},
        ("/v1/models", "get"): {"id", "owned_by", "parent", "served"},
    }
    for (path, method), fields in listed.items():
        page, _ = _success_schema(schema, path, method)
        assert {"object", "data"} <= set(page["properties"]), (path, page)
        item = _resolve(schema, page["properties"]["data"]["items"])
        assert fields <= set(item["properties"]), (path, method, sorted(item["properties"]))
    # the safekeel extensions are described too, not only named
    components = schema["components"]["schemas"]
    assert {"passed", "reasons", "harmful_rate"} <= set(components["GateReport"]["properties"])
    assert {"selector", "k", "mode", "gate", "guard"} <= set(components["SafetyOptions"]["properties"])
    assert {"guard", "monitor"} <= set(components["SafekeelRecord"]["properties"])
    # streaming stays server-sent events, and is documented as such beside the JSON answer
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert {"application/json", "text/event-stream"} <= _success_schema(schema, path, "post")[1]
    # errors are documented as they are returned: OpenAI's error object with a 400, never FastAPI's 422
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)
            if path.startswith("/v1/"):
                error = operation["responses"]["400"]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/ErrorResponse"}, (path, method)
