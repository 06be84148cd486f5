"""The OpenAPI document of the server, built from the served model's input schema."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flywheel.config import ServingConfig
from flywheel.serving.tabular.validation import MAX_META_KEYS

if TYPE_CHECKING:
    from flywheel.serving.tabular.runtime import LoadedModel

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
