"""Property-based fuzzing of the server's own OpenAPI schema (schemathesis): valid and invalid bodies
for every route, sent to a real server; no response may be a 5xx, and every error has the shape of the
API called (OpenAI's; Ollama's under /api/; Anthropic's under /v1/messages).
Bounded: a few dozen examples per operation, and the server caps max_tokens so each call is short.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from qiusuo.engine import EngineConfig, LLMEngine
from qiusuo.model import build_model
from qiusuo.serve import create_app
from qiusuo.serve.server import ServerThread

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

torch.set_num_threads(1)


def _app():
    model, tok = build_model("tiny-dense", max_position_embeddings=256, num_hidden_layers=1)
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_bytes=16 << 20, num_threads=1))
    return create_app(engine, served_model_name="tiny", max_tokens_cap=4, max_queue=1000)


APP = _app()
SCHEMA = schemathesis.openapi.from_dict(APP.openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# Invalid data needs something to break: only routes that declare a body (Ollama's catch-all
# /api/{rest}, which answers 404 for endpoints qiusuo lacks, declares none).
CASES = [(op, mode) for op in OPERATIONS for mode in GenerationMode
         if mode is GenerationMode.POSITIVE or (op.method.upper() == "POST" and op.body)]


def check_error_shape(path: str, body: dict) -> None:
    if path.startswith("/api/"):  # Ollama: {"error": "..."}
        assert set(body) == {"error"} and isinstance(body["error"], str), body
    elif path.startswith("/v1/messages"):  # Anthropic: {"type": "error", "error": {"type", "message"}}
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:  # OpenAI
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


@pytest.fixture(scope="module")
def server():
    with ServerThread(APP) as srv:
        yield srv


@pytest.mark.parametrize("operation, mode", CASES, ids=[f"{op.label} {m.value}" for op, m in CASES])
def test_no_server_errors(server, operation, mode):
    examples = 25 if operation.method.upper() == "POST" else 5

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body["model"] = "tiny"  # else every valid body is a 404 and the engine is never reached
            for m in case.body.get("messages", []):
                if isinstance(m, dict) and m.get("role") != "tool" and m.get("content") is None:
                    m["content"] = "hi"  # schema-valid, but the chat template refuses a message without one
        response = case.call(base_url=server.url, timeout=30)
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            check_error_shape(operation.path, response.json())

    check()
