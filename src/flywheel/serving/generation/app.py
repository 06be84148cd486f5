"""The text-generation server of a LoRA project: POST /v1/generate from the champion adapter, on
transformers (the merged model in PyTorch) or llama.cpp (its GGUF export), by `serving.runtime`.

Same behaviour as the tabular server where it applies: the champion is followed by a watcher
thread and hot-swapped (a request keeps the model it started on), /health, /ready, /metrics
(Prometheus, summed over workers), /v1/models, /admin/reload (bearer token), /openapi.json,
validation with the field named, a bounded body. Generation is CPU-heavy and long, so each worker
runs at most `serving.max_concurrent` at once (in threads; torch and llama.cpp release the GIL),
lets up to `serving.max_waiting` wait, and answers 429 beyond that.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from flywheel.config import GenerateServingConfig, LlmProject
from flywheel.core.cpus import usable_cpus
from flywheel.llm.llamacpp import load_llamacpp
from flywheel.llm.runtime import Generation, TextGenerator, load_generator
from flywheel.serving.generation.openai import OpenAIEndpoints, openai_error
from flywheel.serving.generation.openapi import MAX_SEED, MIN_TEMPERATURE, generate_openapi
from flywheel.serving.http.bodies import parse_json_body, read_body
from flywheel.serving.http.common import (
    ERROR_HANDLERS,
    Call,
    CountedErrors,
    Endpoint,
    Mounts,
    champion_runtime,
    client_address,
    common_routes,
    worker_lifespan,
)
from flywheel.serving.http.errors import FieldError, RequestInvalid, TooBusy, Unavailable
from flywheel.serving.http.metrics import GENERATION_BUCKETS, GenerationMetrics, ServingMetrics
from flywheel.serving.http.runtime import ModelRuntime
from flywheel.serving.http.traffic import TrafficRollup
from flywheel.state.db import open_state

log = logging.getLogger("flywheel.serving")


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
    max_new = _number(body, errors, "max_new_tokens", cfg.default_max_new_tokens, 1, cfg.max_new_tokens,
                      integer=True)
    temperature = _number(body, errors, "temperature", 0.0, 0.0, cfg.max_temperature)
    if 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow to inf: sampling breaks
        errors.append(FieldError(("body", "temperature"), f"0 (greedy) or at least {MIN_TEMPERATURE}",
                                 "out_of_range"))
    top_p = _number(body, errors, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed <= MAX_SEED):
        errors.append(FieldError(("body", "seed"), f"an integer in [0, {MAX_SEED}]", "type_error"))
    if errors:
        raise RequestInvalid(errors)
    return GenerateRequest(str(prompt), int(max_new), float(temperature), float(top_p), seed)


def _number(body: dict[str, Any], errors: list[FieldError], name: str, default: float, lo: float,
            hi: float, lo_open: bool = False, integer: bool = False) -> float:
    """A numeric field in bounds, or its default with the problem appended to `errors`."""
    value = body.get(name, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        errors.append(FieldError(("body", name), "an integer" if integer else "a number", "type_error"))
        return default
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        errors.append(FieldError(("body", name), f"must be in {left}{lo}, {hi}]", "out_of_range"))
        return default
    return float(value)


class GenerationSlots:
    """At most `concurrent` generations at once, `waiting` more in line, refusal beyond; and at
    most `per_client` of those (running or waiting) for one client address (default: all but one),
    so that one caller can never hold every slot and the whole line."""

    def __init__(self, concurrent: int, waiting: int, metrics: GenerationMetrics,
                 per_client: int | None = None):
        self.semaphore = asyncio.Semaphore(concurrent)
        self.max_waiting = waiting
        self.waiting = 0
        self.per_client = per_client or max(1, concurrent + waiting - 1)
        self.held: collections.Counter[str] = collections.Counter()
        self.metrics = metrics

    def full(self, client: str = "") -> bool:
        """Whether `slot` would refuse now (every slot busy and the queue full, or this client at
        its share)."""
        return (self.semaphore.locked() and self.waiting >= self.max_waiting) \
            or self.held[client] >= self.per_client

    @contextlib.asynccontextmanager
    async def slot(self, client: str = "") -> AsyncIterator[bool]:
        if self.full(client):
            self.metrics.rejected.inc()
            yield False
            return
        self.held[client] += 1
        try:
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
        finally:
            self.held[client] -= 1
            if not self.held[client]:
                del self.held[client]


def create_generate_app(project: LlmProject, migrate: bool = True,
                        mounts: Mounts | None = None) -> CountedErrors:
    """The ASGI app of a LoRA project; its only state rows are the traffic rollups (`migrate`:
    False when `flywheel serve` already migrated the state database)."""
    cfg = project.config.serving
    if cfg.runtime == "transformers":
        import torch  # heavy: only a generation server needs it

        torch.set_num_threads(cfg.threads or usable_cpus())
    load = load_llamacpp if cfg.runtime == "llama.cpp" else load_generator
    metrics = ServingMetrics(GENERATION_BUCKETS)
    rollup = metrics.rollup = TrafficRollup(open_state(project.state_url, migrate=migrate),
                                            project.config.registered_model)
    runtime: ModelRuntime[TextGenerator] = champion_runtime(
        project, cfg.reload_interval_s, metrics, lambda registry, version: load(project, registry, version))
    endpoint = GenerateEndpoint(cfg, runtime, metrics)

    def openapi() -> dict[str, Any]:
        version = runtime.current.version if runtime.current else None
        return generate_openapi(project.config.registered_model, cfg, version)

    compatible = OpenAIEndpoints(endpoint)
    chat = Endpoint("chat_completions", metrics, compatible.chat, openai_error)
    completions = Endpoint("completions", metrics, compatible.completions, openai_error)
    app = Starlette(routes=[Route("/v1/generate", Endpoint("generate", metrics, endpoint.handle),
                                  methods=["POST"]),
                            Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/completions", completions, methods=["POST"]),
                            *common_routes(runtime, metrics, openapi),
                            *(mounts(runtime) if mounts else [])],
                    lifespan=worker_lifespan(runtime, start=rollup.start, stop=rollup.stopped),
                    exception_handlers=ERROR_HANDLERS)
    app.state.runtime = runtime
    return CountedErrors(app, metrics)


class GenerateEndpoint:
    """POST /v1/generate: validate, wait for a slot, generate on the model the request started on."""

    def __init__(self, cfg: GenerateServingConfig, runtime: ModelRuntime[TextGenerator],
                 metrics: ServingMetrics):
        self.cfg, self.runtime = cfg, runtime
        self.metrics = metrics
        self.gen_metrics = GenerationMetrics(metrics)
        self.slots = GenerationSlots(cfg.max_concurrent, cfg.max_waiting, self.gen_metrics,
                                     cfg.max_per_client)

    async def handle(self, request: Request, call: Call) -> dict[str, Any]:
        model = self.runtime.current  # this request finishes on this model, whatever swaps meanwhile
        if model is None:
            raise Unavailable("no champion adapter is loaded yet")
        call.version = model.version
        req, prompt_ids = await self.parse(request, model)
        return await self.generate(model, req, prompt_ids, call, client_address(request))

    async def parse(self, request: Request, model: TextGenerator) -> tuple[GenerateRequest, list[int]]:
        cfg = self.cfg
        req = parse_generate(parse_json_body(await read_body(request, cfg.max_body_bytes)), cfg)
        prompt_ids = await run_in_threadpool(model.prompt_tokens, req.prompt)  # not on the event loop
        if len(prompt_ids) > cfg.max_prompt_tokens:
            raise RequestInvalid([FieldError(("body", "prompt"), f"{len(prompt_ids)} tokens; at "
                                             f"most {cfg.max_prompt_tokens}", "too_long")])
        if not prompt_ids:
            raise RequestInvalid([FieldError(("body", "prompt"), "has no tokens", "type_error")])
        return req, prompt_ids

    def busy(self) -> TooBusy:
        cfg = self.cfg
        return TooBusy(f"{cfg.max_concurrent} generation(s) running and {cfg.max_waiting} waiting, at "
                       f"most {self.slots.per_client} for one client: retry later")

    async def generate(self, model: TextGenerator, req: GenerateRequest, prompt_ids: list[int],
                       call: Call, client: str = "") -> dict[str, Any]:
        async with self.slots.slot(client) as granted:
            if not granted:
                raise self.busy()
            out = await run_in_threadpool(model.generate, prompt_ids, req.max_new_tokens,
                                          req.temperature, req.top_p, req.seed)
        self.record(model, out, call.request_id, call.started)
        return {
            "model": model.name, "version": model.version, "request_id": call.request_id,
            "text": out.text, "finish_reason": out.finish_reason,
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens},
            "parameters": {"max_new_tokens": req.max_new_tokens, "temperature": req.temperature,
                           "top_p": req.top_p, "seed": req.seed},
        }

    def record(self, model: TextGenerator, out: Generation, request_id: str, started: float) -> None:
        version = str(model.version)
        self.gen_metrics.generated_tokens.labels(version).inc(out.completion_tokens)
        self.gen_metrics.prompt_tokens.labels(version).inc(out.prompt_tokens)
        log.info("generated", extra={"event": "generation", "request_id": request_id,
                                     "model_version": model.version, "prompt_tokens": out.prompt_tokens,
                                     "completion_tokens": out.completion_tokens,
                                     "finish_reason": out.finish_reason,
                                     "latency_ms": round((time.perf_counter() - started) * 1000, 1)})
