"""The OpenAPI document of the server, built from the served model's input schema."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flywheel.config import GenerateServingConfig, ServingConfig
from flywheel.serving.validation import MAX_META_KEYS

if TYPE_CHECKING:
    from flywheel.serving.runtime import LoadedModel

_ERROR = {"type": "object", "properties": {"detail": {}, "request_id": {"type": "string"}}}


def record_schema(model: LoadedModel | None, cfg: ServingConfig) -> dict[str, Any]:
    if model is None:
        return {"type": "object", "description": "the champion's input fields (none loaded yet)"}
    props: dict[str, Any] = {}
    for name, kind in model.spec.input_types.items():
        prop: dict[str, Any] = ({"type": "number"} if kind == "number"
                                else {"type": "string", "maxLength": cfg.max_string_length})
        if name in model.spec.nullable_inputs:
            prop["nullable"] = True
        props[name] = prop
    props["meta"] = {"type": "object", "maxProperties": MAX_META_KEYS,
                     "description": "logged with the prediction, never a model input"}
    return {"type": "object", "properties": props, "required": list(model.spec.input_types),
            "additionalProperties": False}


def openapi_document(model: LoadedModel | None, name: str, cfg: ServingConfig) -> dict[str, Any]:
    # long: one OpenAPI document, a literal; cut into pieces its paths would no longer read as one
    record = record_schema(model, cfg)
    json_body = {"required": True, "content": {"application/json": {"schema": {
        "oneOf": [record, {"type": "array", "items": record, "minItems": 1,
                           "maxItems": cfg.max_records}]}}}}
    errors = {
        "413": {"description": "body larger than serving.max_body_bytes"},
        "422": {"description": "a field is missing, unknown, of the wrong type, NaN or infinite",
                "content": {"application/json": {"schema": _ERROR}}},
        "503": {"description": "no champion loaded yet"},
    }
    prediction = (model.answers.prediction_schema() if model else {"type": "object"})
    input_names = list(model.spec.input_types) if model else []
    oip_input = {"type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
        "name": {"type": "string", "enum": input_names} if input_names else {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "enum": ["FP32", "FP64", "INT32", "INT64", "BYTES"]},
        "data": {"type": "array", "maxItems": cfg.max_records}}}
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": f"Flywheel: {name}", "version": str(model.version) if model else "none",
                 "description": "Predictions from the model behind alias champion."},
        "paths": {
            "/v1/predict": {"post": {
                "summary": "Score one record or a list of records", "operationId": "predict",
                "requestBody": json_body,
                "responses": {"200": {"description": "one prediction per record", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "model": {"type": "string"}, "version": {"type": "integer"},
                        "request_id": {"type": "string"}, "threshold": {"type": "number"},
                        "task": {"type": "string"},
                        "predictions": {"type": "array", "items": prediction}}}}}}, **errors}}},
            "/v2/models/{name}/infer": {"post": {
                "summary": "Open Inference Protocol (KServe v2) inference", "operationId": "infer",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": [name]}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["inputs"], "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": oip_input, "minItems": 1}}}}}},
                "responses": {"200": ok, "404": {"description": "another model's name"}, **errors}}},
            "/v2/models/{name}": {"get": {
                "summary": "Open Inference Protocol model metadata", "operationId": "oipModel",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": [name]}}],
                "responses": {"200": ok, "404": {"description": "not served here"}}}},
            "/v1/models": {"get": {"summary": "The served model and its lineage",
                                   "operationId": "models", "responses": {"200": ok}}},
            "/v1/feedback": {"post": {
                "summary": "Ground-truth labels by record id (idempotent; late labels accepted)",
                "operationId": "feedback",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["labels"], "properties": {"labels": {
                        "type": "array", "minItems": 1, "items": {
                            "type": "object", "required": ["record_id", "label"],
                            "additionalProperties": False, "properties": {
                                "record_id": {"type": "string", "minLength": 1, "maxLength": 100},
                                "label": {"type": "integer", "enum": [0, 1]},
                                "observed_at": {"type": "string", "format": "date-time"}}}}}}}}},
                "responses": {"200": ok, "413": errors["413"], "422": errors["422"],
                              "415": {"description": "the body is not sent as JSON"},
                              "503": {"description": "the state database is unavailable; "
                                                     "retry after Retry-After seconds"}}}},
            "/health": {"get": {"summary": "The process is alive; prediction_log.state is 'degraded' "
                                           "while the log's sink is down, its buffer over half full, "
                                           "or it dropped rows in the last minute",
                                "operationId": "health",
                                "responses": {"200": ok}}},
            "/ready": {"get": {"summary": "A model is loaded and warm", "operationId": "ready",
                               "responses": {"200": ok, "503": {"description": "not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics, summed over workers",
                                 "operationId": "metrics", "responses": {"200": {
                                     "description": "text exposition format",
                                     "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/admin/reload": {"post": {
                "summary": "Check the champion alias now and swap if it moved",
                "operationId": "reload", "security": [{"bearer": []}],
                "responses": {"200": ok, "401": {"description": "missing or wrong token"},
                              "403": {"description": "admin disabled (no token configured)"}}}},
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


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
