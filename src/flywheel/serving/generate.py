"""The text-generation server of a LoRA project: POST /v1/generate from the champion adapter.

Same behaviour as the tabular server where it applies: the champion is followed by a watcher
thread and hot-swapped (a request keeps the model it started on), /health, /ready, /metrics
(Prometheus, summed over workers), /v1/models, /admin/reload (bearer token), /openapi.json,
validation with the field named, a bounded body. Generation is CPU-heavy and long, so each worker
runs at most `serving.max_concurrent` at once (in threads; torch releases the GIL), lets up to
`serving.max_waiting` wait, and answers 429 beyond that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flywheel.config import GenerateServingConfig, LlmProject
from flywheel.llm.runtime import LoadedGenerator, load_generator
from flywheel.serving.app import (
    BodyTooLarge,
    _json,
    _new_request_id,
    _read_body,
    champion_runtime,
    runtime_routes,
)
from flywheel.serving.metrics import GENERATION_BUCKETS, GenerationMetrics, ServingMetrics
from flywheel.serving.runtime import ModelRuntime
from flywheel.serving.validation import FieldError, RequestInvalid, parse_json_body
from flywheel.state.db import open_state

log = logging.getLogger("flywheel.serving")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def parse_generate(body: Any, cfg: GenerateServingConfig) -> GenerateRequest:
    """Validate a /v1/generate body; every wrong field is named in one 422."""
    if not isinstance(body, dict):
        raise RequestInvalid([FieldError(("body",), "a JSON object is required", "type_error")])
    errors: list[FieldError] = []
    allowed = {"prompt", "max_new_tokens", "temperature", "top_p", "seed"}
    for extra in sorted(set(body) - allowed):
        errors.append(FieldError(("body", extra), "unknown field", "extra_forbidden"))
    prompt = body.get("prompt")
    if prompt is None:
        errors.append(FieldError(("body", "prompt"), "field required", "missing"))
    elif not isinstance(prompt, str) or not prompt.strip():
        errors.append(FieldError(("body", "prompt"), "a non-empty string", "type_error"))
    elif len(prompt) > cfg.max_prompt_chars:
        errors.append(FieldError(("body", "prompt"), f"at most {cfg.max_prompt_chars} characters",
                                 "too_long"))

    def number(name: str, default: float, lo: float, hi: float, lo_open: bool = False,
               integer: bool = False) -> float:
        value = body.get(name, default)
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            errors.append(FieldError(("body", name), "an integer" if integer else "a number",
                                     "type_error"))
            return default
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
            left = "(" if lo_open else "["
            errors.append(FieldError(("body", name), f"must be in {left}{lo}, {hi}]", "out_of_range"))
            return default
        return value

    max_new = number("max_new_tokens", cfg.default_max_new_tokens, 1, cfg.max_new_tokens, integer=True)
    temperature = number("temperature", 0.0, 0.0, cfg.max_temperature)
    top_p = number("top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_SEED):
        errors.append(FieldError(("body", "seed"), f"an integer in [0, {MAX_SEED}]", "type_error"))
    if errors:
        raise RequestInvalid(errors)
    return GenerateRequest(str(prompt), int(max_new), float(temperature), float(top_p), seed)


class GenerationSlots:
    """At most `concurrent` generations at once, `waiting` more in line, refusal beyond."""

    def __init__(self, concurrent: int, waiting: int, metrics: GenerationMetrics):
        self.semaphore = asyncio.Semaphore(concurrent)
        self.max_waiting = waiting
        self.waiting = 0
        self.metrics = metrics

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[bool]:
        if self.semaphore.locked() and self.waiting >= self.max_waiting:
            self.metrics.rejected.inc()
            yield False
            return
        self.waiting += 1
        self.metrics.waiting.inc()
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.dec()
        self.metrics.in_progress.inc()
        try:
            yield True
        finally:
            self.metrics.in_progress.dec()
            self.semaphore.release()


def create_generate_app(project: LlmProject, migrate: bool = True) -> Starlette:
    cfg = project.config.serving
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    metrics = ServingMetrics(GENERATION_BUCKETS)
    gen_metrics = GenerationMetrics(metrics)

    runtime: ModelRuntime[LoadedGenerator] = champion_runtime(
        project, cfg.reload_interval_s, metrics,
        lambda registry, version: load_generator(project, registry, version))
    engine = open_state(project.state_url, migrate=migrate)  # alias history lives there
    slots = GenerationSlots(cfg.max_concurrent, cfg.max_waiting, gen_metrics)

    def answer(status: int, payload: dict[str, Any], request_id: str, started: float, version: int,
               headers: dict[str, str] | None = None) -> Response:
        metrics.observe("generate", status, version, time.perf_counter() - started)
        if status != 200:
            payload = {**payload, "request_id": request_id}
        return _json(payload, status, {"x-request-id": request_id, **(headers or {})})

    async def generate(request: Request) -> Response:
        started = time.perf_counter()
        request_id = _new_request_id()
        model = runtime.current  # this request finishes on this model, whatever swaps meanwhile
        if model is None:
            return answer(503, {"detail": "no champion adapter is loaded yet"}, request_id, started, 0)
        try:
            req = parse_generate(parse_json_body(await _read_body(request, cfg.max_body_bytes)), cfg)
            prompt_ids = model.prompt_tokens(req.prompt)
            if len(prompt_ids) > cfg.max_prompt_tokens:
                raise RequestInvalid([FieldError(("body", "prompt"), f"{len(prompt_ids)} tokens; at "
                                                 f"most {cfg.max_prompt_tokens}", "too_long")])
            if not prompt_ids:
                raise RequestInvalid([FieldError(("body", "prompt"), "has no tokens", "type_error")])
        except BodyTooLarge:
            return answer(413, {"detail": f"body larger than {cfg.max_body_bytes} bytes"}, request_id,
                          started, model.version)
        except RequestInvalid as exc:
            return answer(422, {"detail": [e.as_dict() for e in exc.errors]}, request_id, started,
                          model.version)
        async with slots.slot() as granted:
            if not granted:
                return answer(429, {"detail": f"{cfg.max_concurrent} generation(s) running and "
                                    f"{cfg.max_waiting} waiting: retry later"}, request_id, started,
                              model.version, {"retry-after": "1"})
            try:
                out = await run_in_threadpool(model.generate, prompt_ids, req.max_new_tokens,
                                              req.temperature, req.top_p, req.seed)
            except Exception:
                log.exception("generation failed", extra={"event": "request_error", "status": 500,
                                                           "request_id": request_id})
                return answer(500, {"detail": "internal error; see the server log"}, request_id,
                              started, model.version)
        version = str(model.version)
        gen_metrics.generated_tokens.labels(version).inc(out.completion_tokens)
        gen_metrics.prompt_tokens.labels(version).inc(out.prompt_tokens)
        seconds = time.perf_counter() - started
        log.info("generated", extra={"event": "generation", "request_id": request_id,
                                     "model_version": model.version, "prompt_tokens": out.prompt_tokens,
                                     "completion_tokens": out.completion_tokens,
                                     "finish_reason": out.finish_reason,
                                     "latency_ms": round(seconds * 1000, 1)})
        return answer(200, {
            "model": model.name, "version": model.version, "request_id": request_id,
            "text": out.text, "finish_reason": out.finish_reason,
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens},
            "parameters": {"max_new_tokens": req.max_new_tokens, "temperature": req.temperature,
                           "top_p": req.top_p, "seed": req.seed},
        }, request_id, started, model.version)

    async def models(request: Request) -> Response:
        model = runtime.current
        return _json({"models": [model.describe()] if model else [], "last_error": runtime.last_error})

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def openapi(request: Request) -> Response:
        return _json(generate_openapi(project.config.registered_model, cfg,
                                      runtime.current.version if runtime.current else None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(runtime.check_now)
        runtime.start()
        log.info("worker ready", extra={"event": "worker_started", "version":
                                         runtime.current.version if runtime.current else None})
        try:
            yield
        finally:
            runtime.stop()
            ServingMetrics.worker_exited(os.getpid())
            engine.dispose()
            log.info("worker stopped", extra={"event": "worker_stopped"})

    app = Starlette(routes=[
        Route("/v1/generate", generate, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *runtime_routes(runtime),
    ], lifespan=lifespan)
    app.state.runtime = runtime
    return app


def generate_openapi(name: str, cfg: GenerateServingConfig, version: int | None) -> dict[str, Any]:
    error = {"type": "object", "properties": {"detail": {}, "request_id": {"type": "string"}}}
    body = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        "prompt": {"type": "string", "minLength": 1, "maxLength": cfg.max_prompt_chars,
                   "description": f"at most {cfg.max_prompt_tokens} tokens"},
        "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_new_tokens,
                           "default": cfg.default_max_new_tokens},
        "temperature": {"type": "number", "minimum": 0, "maximum": cfg.max_temperature, "default": 0,
                        "description": "0 = greedy (deterministic); above 0 = sampling"},
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
