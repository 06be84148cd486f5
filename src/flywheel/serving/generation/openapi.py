"""The OpenAPI document of the generation server (/v1/generate and the OpenAI-compatible
endpoints), and the bounds on sampling it states."""

from __future__ import annotations

from typing import Any

from flywheel.config import GenerateServingConfig

MIN_TEMPERATURE = 0.01  # below it, logits divided by the temperature overflow
MAX_SEED = 2**63 - 1


def generate_openapi(name: str, cfg: GenerateServingConfig, version: int | None) -> dict[str, Any]:
    error = {"type": "object", "properties": {"detail": {}, "request_id": {"type": "string"}}}
    body = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": cfg.max_prompt_chars,
                   "description": f"at most {cfg.max_prompt_tokens} tokens"},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_new_tokens,
                           "default": cfg.default_max_new_tokens},
        "temperature": {"anyOf": [{"type": "number", "enum": [0]},
                                  {"type": "number", "minimum": MIN_TEMPERATURE,
                                   "maximum": cfg.max_temperature}], "default": 0,
                        "description": f"0 = greedy (deterministic); from {MIN_TEMPERATURE} = sampling"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED,
                 "description": "makes sampling reproducible"}}}
    ok = {"type": "object", "properties": {
        "model": {"type": "string"}, "version": {"type": "integer"}, "request_id": {"type": "string"},
        "text": {"type": "string"}, "finish_reason": {"type": "string", "enum": ["stop", "length"]},
        "usage": {"type": "object", "properties": {"prompt_tokens": {"type": "integer"},
                                                   "completion_tokens": {"type": "integer"}}},
        "parameters": {"type": "object"}}}

    def simple(summary: str, op: str) -> dict[str, Any]:
        return {"get": {"summary": summary, "operationId": op, "responses": {"200": {
            "description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": f"Flywheel: {name}", "version": str(version) if version else "none",
                 "description": "Text generation from the LoRA adapter behind alias champion "
                                "(merged into its base model at load time)."},
        "paths": {
            "/v1/generate": {"post": {
                "summary": "Continue a prompt", "operationId": "generate",
                "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                "responses": {
                    "200": {"description": "OK", "content": {"application/json": {"schema": ok}}},
                    "413": {"description": "body larger than serving.max_body_bytes"},
                    "422": {"description": "a field is missing, unknown, of the wrong type or out of "
                                           "bounds", "content": {"application/json": {"schema": error}}},
                    "429": {"description": "every generation slot busy and the queue full"},
                    "503": {"description": "no champion loaded yet"}}}},
            "/v1/chat/completions": openai_compatible(name, cfg, "messages", "chat"),
            "/v1/completions": openai_compatible(name, cfg, "prompt", "completions"),
            "/v1/models": simple("What is served, with its lineage", "models"),
            "/health": simple("Alive", "health"),
            "/ready": simple("A champion is loaded and warm", "ready"),
            "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                                 "responses": {"200": {"description": "text exposition format"}}}},
            "/admin/reload": {"post": {"summary": "Check the champion alias now (bearer token)",
                                       "operationId": "reload", "security": [{"bearer": []}],
                                       "responses": {"200": {"description": "OK"},
                                                     "401": {"description": "no or wrong token"},
                                                     "403": {"description": "admin disabled"}}}},
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def openai_compatible(name: str, cfg: GenerateServingConfig, field: str, op: str) -> dict[str, Any]:
    """OpenAI's request and answer (its client's own schema is the reference)."""
    request = {"type": "object", "required": ["model", field], "properties": {
        "model": {"type": "string", "enum": [name]},
        field: ({"type": "array", "items": {"type": "object"}} if field == "messages"
                else {"type": "string"}),
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_new_tokens},
        "temperature": {"type": "number", "minimum": 0, "maximum": min(2.0, cfg.max_temperature)},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                 "maxItems": 4}]},
        "stream": {"type": "boolean"}}}
    return {"post": {
        "summary": f"OpenAI-compatible {'chat completion' if op == 'chat' else 'completion'}",
        "operationId": f"openai_{op}",
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": {
            "200": {"description": "the answer (JSON), or server-sent events when stream is true",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                "text/event-stream": {"schema": {"type": "string"}}}},
            "400": {"description": "a wrong field, named in error.param"},
            "404": {"description": "another model than this server's"},
            "413": {"description": "body larger than serving.max_body_bytes"},
            "429": {"description": "every generation slot busy and the queue full"},
            "503": {"description": "no champion loaded yet"}}}}
