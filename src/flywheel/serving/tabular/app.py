"""The prediction server of a tabular project: a Starlette app that serves the champion's ONNX
export and follows the registry. POST /v1/predict is a raw ASGI handler (the hot path skips
Starlette's layers); the rest are thin Starlette endpoints over one data plane."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flywheel.config import Project, load_project
from flywheel.core.times import EventTimes
from flywheel.serving.http.bodies import is_json, parse_json_body, read_body, receive_body
from flywheel.serving.http.clients import ANONYMOUS, Clients
from flywheel.serving.http.common import (
    ERROR_HANDLERS,
    Call,
    CountedErrors,
    Endpoint,
    HotPathDispatch,
    Mounts,
    champion_runtime,
    common_routes,
    freeze_heap,
    new_request_id,
    worker_lifespan,
)
from flywheel.serving.http.errors import Unavailable, UnsupportedMediaType, error_answer
from flywheel.serving.http.metrics import ServingMetrics, monitoring_gauges
from flywheel.serving.http.traffic import TrafficRollup
from flywheel.serving.tabular.canary import Canary, CanaryRoute
from flywheel.serving.tabular.openapi import openapi_document
from flywheel.serving.tabular.platforms import PlatformRoutes
from flywheel.serving.tabular.predlog import PredictionLogWriter, store_feedback
from flywheel.serving.tabular.records import RecordIds
from flywheel.serving.tabular.runtime import LoadedModel, load_version
from flywheel.serving.tabular.shadow import ShadowTarget
from flywheel.serving.tabular.validation import META, feedback_labels, refuse_unissued
from flywheel.state.db import CLIENT_META, open_state

log = logging.getLogger("flywheel.serving")


class MicroBatcher:
    """Scores the requests that arrive in one event-loop pass with one ONNX Runtime call.

    Under load several requests are parsed in the same pass; each waits on a future and a
    callback scheduled right after the pass runs them together. No timer, no added wait: a lone
    request is scored in the next loop step. ONNX Runtime's fixed cost per call is paid once per
    batch instead of once per request.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[LoadedModel, list[dict[str, Any]], asyncio.Future[list[float]]]] = []
        self.scheduled = False

    def submit(self, model: LoadedModel, records: list[dict[str, Any]]) -> asyncio.Future[list[float]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[float]] = loop.create_future()
        self.pending.append((model, records, future))
        if not self.scheduled:
            self.scheduled = True
            loop.call_soon(self.run)
        return future

    def run(self) -> None:
        self.scheduled = False
        batch, self.pending = self.pending, []
        groups: dict[int, tuple[LoadedModel, list[tuple[list[dict[str, Any]], Any]]]] = {}
        for model, records, future in batch:  # one group per model object (a swap may split a pass)
            groups.setdefault(id(model), (model, []))[1].append((records, future))
        for model, items in groups.values():
            try:
                probs = model.predict([r for records, _ in items for r in records]).tolist()
            except Exception as exc:
                for _, future in items:
                    future.set_exception(exc)
                continue
            start = 0
            for records, future in items:
                future.set_result(probs[start : start + len(records)])
                start += len(records)


class TabularService:
    """The data plane: the champion runtime, micro-batched scoring, the prediction log, feedback."""

    def __init__(self, project: Project, migrate: bool):
        self.project = project
        self.cfg = cfg = project.config.serving
        self.times = EventTimes(project.config.data.time_unit, cfg.times.earliest,
                                timedelta(days=cfg.times.max_future_days))
        self.metrics = ServingMetrics()
        self.runtime = champion_runtime(
            project, cfg.reload_interval_s, self.metrics,
            lambda registry, version: load_version(registry, version, cfg.max_records,
                                                   cfg.max_string_length, cfg.threshold, self.times),
            freeze_heap)
        self.engine = open_state(project.state_url, migrate=migrate)
        self.writer = PredictionLogWriter(project.state_url, cfg.log,
                                          on_dropped=self.metrics.count_dropped,
                                          on_depth=self.metrics.log_depth.set,
                                          on_health=self._log_health,
                                          shadow=ShadowTarget(
                                              project.tracking_url, str(project.artifact_root),
                                              project.config.project,
                                              project.config.registered_model,
                                              cfg.threshold).to_env())
        self.rollup = self.metrics.rollup = TrafficRollup(self.engine, project.config.registered_model)
        self.record_ids = RecordIds.from_state(self.engine, cfg.max_records)
        self.clients = Clients(cfg.clients)
        self.batcher = MicroBatcher()
        self.canary = CanaryRoute(
            self.engine, project.config.registered_model, project.config.rollout.entity,
            cfg.reload_interval_s,
            lambda version: load_version(self.runtime.registry, version, cfg.max_records,
                                         cfg.max_string_length, cfg.threshold, self.times))
        self.counters: dict[int, Any] = {}  # predictions counter child per model version
        self._restarts_counted = 0
        self.max_body_bytes = cfg.max_body_bytes

    @property
    def current(self) -> LoadedModel | None:
        return self.runtime.current

    def _log_health(self, health: dict[str, Any]) -> None:
        self.metrics.log_degraded.set(1 if health["state"] == "degraded" else 0)
        restarts = health["sink_restarts"] - self._restarts_counted
        if restarts:
            self.metrics.log_sink_restarts.inc(restarts)
            self._restarts_counted += restarts

    async def score_and_log(self, model: LoadedModel, records: list[dict[str, Any]], request_id: str,
                            started: float, client: str = ANONYMOUS, ids: list[str] | None = None
                            ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Score, mint the record ids (for `client`; or take `ids`, minted for a whole request
        split between versions), log; the ids and, per record, the answer's fields (see
        `TaskAnswers.log_fields`)."""
        outs = await self.batcher.submit(model, records)
        now = time.time_ns() // 1000
        latency_ms = (time.perf_counter() - started) * 1000
        ids = ids or self.record_ids.mint(request_id, len(records), client)
        if client:  # logged with each row: learning from feedback keeps each client's rows apart
            for record in records:
                record[META] = {**(record.get(META) or {}), CLIENT_META: client}
        fields = model.answers.log_fields(outs)
        name, version, offer = model.name, model.version, self.writer.offer
        for rid, record, f in zip(ids, records, fields, strict=True):
            row = ((rid, request_id, now, name, version, record, f[0], f[1], latency_ms) if len(f) == 2
                   else (rid, request_id, now, name, version, record, f[0], f[1], latency_ms, f[2]))
            if not offer(row):  # the buffer is full: wait for room without blocking the loop
                await self.writer.put(row)
        counter = self.counters.get(version)
        if counter is None:
            counter = self.counters[version] = self.metrics.predictions.labels(str(version))
        counter.inc(len(records))
        return ids, fields

    async def predict(self, scope: Any, receive: Any, send: Any) -> None:
        """POST /v1/predict as a plain ASGI callable; its errors take the one answer path too."""
        started = time.perf_counter()
        request_id = new_request_id()
        model = self.runtime.current
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
        # the version the request's traffic counts for: a canary's challenger when it answered any
        # of it (its errors and latency are the rollout's guard rails), else the champion
        answering = [model.version if model else 0]
        try:
            status, payload = 200, await self._predict(model, scope, receive, request_id, started,
                                                       answering)
        except Exception as exc:
            status, payload, extra = error_answer(exc, request_id, "predict")
            headers += [(k.encode(), v.encode()) for k, v in extra.items()]
        body = orjson.dumps(payload)
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.metrics.observe("predict", status, answering[0], time.perf_counter() - started)

    async def _predict(self, model: LoadedModel | None, scope: Any, receive: Any, request_id: str,
                       started: float, answering: list[int]) -> dict[str, Any]:
        client = self.clients.caller_of(scope, "predict")
        if model is None:
            raise Unavailable("no champion model is loaded yet")
        body = await receive_body(scope, receive, self.cfg.max_body_bytes)
        records = model.validator.records(parse_json_body(body))
        canary = self.canary.active
        if canary is not None and canary.model.version != model.version:
            return await self._predict_canary(model, canary, records, request_id, started, client,
                                              answering)
        ids, fields = await self.score_and_log(model, records, request_id, started, client)
        answers = model.answers
        return {"model": model.name, "version": model.version, "request_id": request_id,
                **answers.top_level, "predictions": answers.predictions(ids, fields)}

    async def _predict_canary(self, champion: LoadedModel, canary: Canary, records: list[dict[str, Any]],
                              request_id: str, started: float, client: str,
                              answering: list[int]) -> dict[str, Any]:
        """A canary rollout's request: each record answered by the version its entity is routed
        to; a request both answer names the version of each prediction."""
        takes = [canary.takes(r) for r in records]
        if any(takes):
            answering[0] = canary.model.version
        if all(takes) or not any(takes):
            model = canary.model if takes[0] else champion
            ids, fields = await self.score_and_log(model, records, request_id, started, client)
            return {"model": model.name, "version": model.version, "request_id": request_id,
                    **model.answers.top_level, "predictions": model.answers.predictions(ids, fields)}
        all_ids = self.record_ids.mint(request_id, len(records), client)
        predictions: list[Any] = [None] * len(records)
        for model, side in ((champion, False), (canary.model, True)):
            at = [i for i, t in enumerate(takes) if t == side]
            ids, fields = await self.score_and_log(model, [records[i] for i in at], request_id,
                                                   started, client, [all_ids[i] for i in at])
            for i, answer in zip(at, model.answers.predictions(ids, fields), strict=True):
                predictions[i] = {**answer, "version": model.version}
        return {"model": champion.name, "version": champion.version, "request_id": request_id,
                **champion.answers.top_level, "predictions": predictions}

    async def feedback(self, request: Request, call: Call) -> dict[str, Any]:
        client = self.clients.caller(request.headers.get("authorization", ""), "feedback")
        body = await read_body(request, self.cfg.max_body_bytes)
        if not is_json(request.headers.get("content-type", "")):
            # A web page may post text/plain or a form to any origin without asking first;
            # only JSON needs the browser's CORS preflight, which this server never grants.
            raise UnsupportedMediaType("send the labels as JSON (content-type: application/json)")
        model = self.runtime.current
        labels = feedback_labels(parse_json_body(body), self.project.config.task,
                                 model.spec.classes if model else None, self.times)
        if not self.cfg.accept_unsigned_feedback:
            refuse_unissued(labels, lambda rid: self.record_ids.issued(rid, client))
        try:
            stored = await run_in_threadpool(store_feedback, self.engine, labels)
        except sa.exc.SQLAlchemyError as exc:  # locked, down, full: the client may send them again
            log.warning("feedback not stored: state database unavailable", extra={
                "event": "feedback_error", "error": type(exc).__name__, "request_id": call.request_id})
            raise Unavailable("the state database is unavailable; send the labels again later",
                              {"retry-after": "5"}) from None
        return {"accepted": stored, "request_id": call.request_id}

    async def monitoring_metrics(self) -> bytes:
        """The log queue's depth now, and the latest monitoring verdicts as gauges."""
        self.metrics.log_depth.set(self.writer.depth())  # the flusher's update lags a slow sink
        return await run_in_threadpool(monitoring_gauges, self.engine,
                                       self.project.config.registered_model)

    def openapi(self) -> dict[str, Any]:
        return openapi_document(self.runtime.current, self.project.config.registered_model, self.cfg)

    def start(self) -> None:
        self.writer.start()
        self.rollup.start()
        self.canary.start()

    def stop(self) -> dict[str, Any]:
        self.canary.stop()
        sink_code = self.writer.close()
        self.rollup.stop()
        return {"sent_to_log": self.writer.sent, "dropped": self.writer.dropped, "sink_exit": sink_code}


def create_app(project: Project | None = None, migrate: bool = True, mounts: Mounts | None = None) -> Any:
    """The ASGI app for one project; `migrate=False` when `flywheel serve` already migrated;
    `mounts`: more routes, given the runtime (the control room, where the app is composed)."""
    project = project or load_project(os.environ["FLYWHEEL_CONFIG"])
    service = TabularService(project, migrate)

    async def predict_elsewhere(request: Request) -> Response:  # POST is served by `predict`
        raise RuntimeError("unreachable: POST /v1/predict is dispatched before Starlette")

    routes = [
        Route("/v1/predict", predict_elsewhere, methods=["POST"]),
        *PlatformRoutes(service).routes(),
        Route("/v1/feedback", Endpoint("feedback", service.metrics, service.feedback), methods=["POST"]),
        *(mounts(service.runtime) if mounts else []),
        *common_routes(service.runtime, service.metrics, service.openapi,
                       {"threshold": service.cfg.threshold}, service.monitoring_metrics,
                       lambda: {"prediction_log": service.writer.health()}, service.clients),
    ]
    lifespan = worker_lifespan(service.runtime, start=service.start, stop=service.stop,
                               after_load=freeze_heap)
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=ERROR_HANDLERS)
    app.state.runtime, app.state.writer = service.runtime, service.writer
    return CountedErrors(HotPathDispatch(app, "POST", "/v1/predict", service.predict), service.metrics)
