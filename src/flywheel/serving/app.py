"""The prediction server: a Starlette app that serves the champion and follows the registry."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flywheel.config import Project, ProjectBase, load_any_project, load_project
from flywheel.serving.metrics import ServingMetrics, monitoring_gauges
from flywheel.serving.openapi import openapi_document
from flywheel.serving.predlog import PredictionLogWriter, store_feedback
from flywheel.serving.runtime import LoadedModel, M, ModelRuntime, load_version
from flywheel.serving.validation import FieldError, RequestInvalid, parse_json_body
from flywheel.state.db import open_state

log = logging.getLogger("flywheel.serving")
ADMIN_TOKEN_ENV = "FLYWHEEL_ADMIN_TOKEN"
MAX_FEEDBACK_LABELS = 10_000


class BodyTooLarge(Exception):
    pass


def _freeze_heap() -> None:
    """Move everything alive now (MLflow, pandas, the model) out of the collector's sight.

    Full collections scan every tracked object; with the libraries a worker imports that took
    tens of milliseconds and showed up as the p99 latency. Request garbage is short-lived and is
    still collected in the young generations.
    """
    gc.collect()
    gc.freeze()
    # The prediction-log thread must never hold the event loop for the default 5 ms.
    sys.setswitchinterval(0.0005)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


class _RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):012x}"


_new_request_id = _RequestIds()


async def _read_body(request: Request, limit: int) -> bytes:
    return await _receive_body(request.scope, request.receive, limit)


def create_app(project: Project | None = None, migrate: bool = True) -> Starlette:
    """The app for one project; `migrate=False` when `flywheel serve` already migrated the state DB."""
    project = project or load_project(os.environ["FLYWHEEL_CONFIG"])
    cfg = project.config.serving
    metrics = ServingMetrics()

    def loader(registry: Any, version: int) -> LoadedModel:
        return load_version(registry, version, cfg.max_records, cfg.max_string_length)

    runtime = champion_runtime(project, cfg.reload_interval_s, metrics, loader, _freeze_heap)
    engine = open_state(project.state_url, migrate=migrate)
    writer = PredictionLogWriter(project.state_url, cfg.log, on_dropped=metrics.log_dropped.inc,
                                 on_depth=metrics.log_depth.set)
    threshold = cfg.threshold
    limit = cfg.max_body_bytes
    predictions_by_version: dict[int, Any] = {}

    def error(status: int, detail: Any, request_id: str, endpoint: str, started: float,
              version: int = 0) -> Response:
        metrics.observe(endpoint, status, version, time.perf_counter() - started)
        if status >= 500 or status == 413:
            log.warning("request refused", extra={"event": "request_error", "status": status,
                                                   "request_id": request_id, "endpoint": endpoint})
        return _json({"detail": detail, "request_id": request_id}, status,
                     {"x-request-id": request_id})

    def invalid(exc: RequestInvalid, request_id: str, endpoint: str, started: float,
                version: int) -> Response:
        return error(422, [e.as_dict() for e in exc.errors], request_id, endpoint, started, version)

    batcher = MicroBatcher()

    async def score_and_log(model: LoadedModel, records: list[dict[str, Any]], request_id: str,
                            started: float) -> tuple[list[str], list[float], list[bool]]:
        probs = await batcher.submit(model, records)
        now = time.time_ns() // 1000
        latency_ms = (time.perf_counter() - started) * 1000
        ids = [f"{request_id}-{i}" for i in range(len(records))]
        decisions = [p >= threshold for p in probs]
        name, version, put = model.name, model.version, writer.put
        for rid, record, p, d in zip(ids, records, probs, decisions, strict=True):
            put((rid, request_id, now, name, version, record, p, d, latency_ms))
        counter = predictions_by_version.get(version)
        if counter is None:
            counter = predictions_by_version[version] = metrics.predictions.labels(str(version))
        counter.inc(len(records))
        return ids, probs, decisions

    # ---- /v1/predict -------------------------------------------------------------------------

    async def predict(scope: Any, receive: Any, send: Any) -> None:
        """POST /v1/predict as a plain ASGI callable: the hot path skips Starlette's layers."""
        started = time.perf_counter()
        request_id = _new_request_id()
        model = runtime.current
        version = model.version if model else 0
        payload: dict[str, Any]
        try:
            if model is None:
                status, payload = 503, {"detail": "no champion model is loaded yet"}
            else:
                try:
                    raw = await _receive_body(scope, receive, limit)
                    records = model.validator.records(parse_json_body(raw))
                except BodyTooLarge:
                    status, payload = 413, {"detail": f"body larger than {limit} bytes"}
                except RequestInvalid as exc:
                    status, payload = 422, {"detail": [e.as_dict() for e in exc.errors]}
                else:
                    ids, probs, decisions = await score_and_log(model, records, request_id,
                                                                started)
                    status, payload = 200, {
                        "model": model.name, "version": version, "request_id": request_id,
                        "threshold": threshold,
                        "predictions": [{"record_id": r, "probability": p, "decision": d}
                                        for r, p, d in zip(ids, probs, decisions, strict=True)],
                    }
        except Exception:
            log.exception("predict failed", extra={"event": "request_error", "status": 500,
                                                    "request_id": request_id})
            status, payload = 500, {"detail": "internal error; see the server log"}
        if status != 200:
            payload["request_id"] = request_id
        body = orjson.dumps(payload)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode())]})
        await send({"type": "http.response.body", "body": body})
        metrics.observe("predict", status, version, time.perf_counter() - started)

    # ---- /v2/models/{name}/infer (Open Inference Protocol) ----------------------------------

    async def infer(request: Request) -> Response:
        started = time.perf_counter()
        request_id = _new_request_id()
        model = runtime.current
        if model is None:
            return error(503, "no champion model is loaded yet", request_id, "infer", started)
        if request.path_params["name"] != model.name:
            return error(404, f"model '{request.path_params['name']}' is not served here; "
                         f"this server serves '{model.name}'", request_id, "infer", started)
        try:
            body = parse_json_body(await _read_body(request, limit))
            records = oip_records(body, model)
        except BodyTooLarge:
            return error(413, f"body larger than {limit} bytes", request_id, "infer", started,
                         model.version)
        except RequestInvalid as exc:
            return invalid(exc, request_id, "infer", started, model.version)
        ids, probs, decisions = await score_and_log(model, records, request_id, started)
        n = len(records)
        payload = {
            "model_name": model.name, "model_version": str(model.version),
            "id": body.get("id") if isinstance(body.get("id"), str) else request_id,
            "parameters": {"request_id": request_id, "record_ids": ids, "threshold": threshold},
            "outputs": [
                {"name": "probability", "shape": [n], "datatype": "FP64", "data": probs},
                {"name": "decision", "shape": [n], "datatype": "BOOL", "data": decisions},
            ],
        }
        response = _json(payload, headers={"x-request-id": request_id})
        metrics.observe("infer", 200, model.version, time.perf_counter() - started)
        return response

    async def oip_model(request: Request) -> Response:
        model = runtime.current
        if model is None or request.path_params["name"] != model.name:
            return _json({"error": f"model '{request.path_params['name']}' is not served here"}, 404)
        dtype = {"number": "FP64", "string": "BYTES"}
        return _json({
            "name": model.name, "versions": [str(model.version)], "platform": "onnxruntime",
            "inputs": [{"name": n, "datatype": dtype[t], "shape": [-1]}
                       for n, t in model.spec.input_types.items()],
            "outputs": [{"name": "probability", "datatype": "FP64", "shape": [-1]},
                        {"name": "decision", "datatype": "BOOL", "shape": [-1]}],
        })

    # ---- the rest ----------------------------------------------------------------------------

    async def models(request: Request) -> Response:
        model = runtime.current
        return _json({"models": [model.describe()] if model else [], "threshold": threshold,
                      "last_error": runtime.last_error})

    async def prometheus(request: Request) -> Response:
        metrics.log_depth.set(writer.depth())  # the flusher's own update lags when the sink is slow
        body, content_type = metrics.render()
        verdicts = await run_in_threadpool(monitoring_gauges, engine, project.config.registered_model)
        return Response(body + verdicts, media_type=content_type)

    async def feedback(request: Request) -> Response:
        started = time.perf_counter()
        request_id = _new_request_id()
        try:
            labels = feedback_labels(parse_json_body(await _read_body(request, limit)))
        except BodyTooLarge:
            return error(413, f"body larger than {limit} bytes", request_id, "feedback", started)
        except RequestInvalid as exc:
            return invalid(exc, request_id, "feedback", started, 0)
        stored = await run_in_threadpool(store_feedback, engine, labels)
        metrics.observe("feedback", 200, 0, time.perf_counter() - started)
        return _json({"accepted": stored, "request_id": request_id})

    async def openapi(request: Request) -> Response:
        return _json(openapi_document(runtime.current, project.config.registered_model, cfg))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        writer.start()
        await run_in_threadpool(runtime.check_now)
        _freeze_heap()
        runtime.start()
        log.info("worker ready", extra={"event": "worker_started", "version":
                                         runtime.current.version if runtime.current else None})
        try:
            yield
        finally:
            runtime.stop()
            sink_code = writer.close()
            ServingMetrics.worker_exited(os.getpid())
            engine.dispose()
            log.info("worker stopped", extra={"event": "worker_stopped", "sent_to_log": writer.sent,
                                               "dropped": writer.dropped, "sink_exit": sink_code})

    async def predict_elsewhere(request: Request) -> Response:  # POST is served by `predict`
        raise RuntimeError("unreachable: POST /v1/predict is dispatched before Starlette")

    routes = [
        Route("/v1/predict", predict_elsewhere, methods=["POST"]),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}", oip_model, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/feedback", feedback, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *runtime_routes(runtime),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.runtime = runtime
    app.state.writer = writer
    return HotPathDispatch(app, predict)  # type: ignore[return-value]


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


class HotPathDispatch:
    """Sends POST /v1/predict straight to its handler and everything else to Starlette."""

    def __init__(self, app: Starlette, predict: Any):
        self.app = app
        self.state = app.state
        self.predict = predict

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/predict" and scope["method"] == "POST":
            await self.predict(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def _receive_body(scope: Any, receive: Any, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise BodyTooLarge
            break
    chunks, size = [], 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def champion_runtime(project: ProjectBase, interval_s: float, metrics: ServingMetrics,
                     loader: Callable[[Any, int], M], after_swap: Callable[[], None] | None = None,
                     ) -> ModelRuntime[M]:
    """The runtime that follows alias champion, counting swaps and the served version in metrics."""

    def registry_factory() -> Any:
        from flywheel.pipeline.steps import open_registry

        return open_registry(project)

    def on_swap(old: M | None, new: M) -> None:
        if old is not None:
            metrics.swaps.inc()
        metrics.model_version.set(new.version)
        if after_swap:
            after_swap()

    return ModelRuntime(registry_factory, interval_s, loader, on_swap=on_swap)


def runtime_routes(runtime: ModelRuntime[Any]) -> list[Route]:
    """/health, /ready and /admin/reload: the same for every kind of served model."""

    async def health(request: Request) -> Response:
        return _json({"status": "ok"})

    async def ready(request: Request) -> Response:
        model = runtime.current
        if model is None:
            return _json({"ready": False, "reason": runtime.last_error or "no champion loaded"}, 503)
        return _json({"ready": True, "model": model.name, "version": model.version})

    async def reload(request: Request) -> Response:
        refused = admin_refusal(request)
        if refused is not None:
            return refused
        swapped = await run_in_threadpool(runtime.check_now)
        model = runtime.current
        log.info("admin reload", extra={"event": "admin_reload", "swapped": swapped})
        return _json({"swapped": swapped, "version": model.version if model else None,
                      "last_error": runtime.last_error})

    return [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"]),
            Route("/admin/reload", reload, methods=["POST"])]


def admin_refusal(request: Request) -> Response | None:
    """None when the request carries the admin bearer token; else the 401/403 to answer."""
    expected = os.environ.get(ADMIN_TOKEN_ENV)
    if not expected:
        return _json({"detail": f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV}"}, 403)
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        return _json({"detail": "a valid bearer token is required"}, 401, {"www-authenticate": "Bearer"})
    return None


def app_from_env() -> Any:
    """Factory for uvicorn workers: the config path comes from FLYWHEEL_CONFIG."""
    from flywheel.config import LlmProject
    from flywheel.serving.logs import configure_json_logging

    project = load_any_project(os.environ["FLYWHEEL_CONFIG"])
    configure_json_logging(access_log=project.config.serving.access_log)
    if isinstance(project, LlmProject):
        from flywheel.serving.generate import create_generate_app

        return create_generate_app(project, migrate=False)
    return create_app(project, migrate=False)


def oip_records(body: Any, model: LoadedModel) -> list[dict[str, Any]]:
    """Open Inference Protocol columns (one tensor per input field) as records."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise RequestInvalid([FieldError(("body", "inputs"), "a non-empty list of input tensors "
                                         "({name, shape, datatype, data}) is required", "missing")])
    columns: dict[str, list[Any]] = {}
    errors: list[FieldError] = []
    for i, tensor in enumerate(body["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str) \
                or not isinstance(tensor.get("data"), list):
            errors.append(FieldError(("body", "inputs", i), "each input needs a string 'name' and a "
                                     "'data' list", "type_error"))
            continue
        data = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in tensor["data"]]
        columns[tensor["name"]] = data
    if errors:
        raise RequestInvalid(errors)
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise RequestInvalid([FieldError(("body", "inputs"), "every input needs the same, non-zero "
                                         "number of values", "shape_mismatch")])
    n = lengths.pop()
    records = [{name: values[i] for name, values in columns.items()} for i in range(n)]
    try:
        return model.validator.records(records)
    except RequestInvalid as exc:
        # (body, i, field) -> (body, inputs, field, i): point at the tensor and the element
        raise RequestInvalid([
            FieldError(("body", "inputs", e.loc[2], e.loc[1]) if len(e.loc) == 3 else e.loc,
                       e.msg, e.type) for e in exc.errors]) from None


def feedback_labels(body: Any) -> list[dict[str, Any]]:
    """{"labels": [{"record_id", "label" (0/1 or true/false), "observed_at"?}]}, validated."""
    labels = body.get("labels") if isinstance(body, dict) else None
    if not isinstance(labels, list) or not labels:
        raise RequestInvalid([FieldError(("body", "labels"), "a non-empty list of labels is required",
                                         "missing")])
    if len(labels) > MAX_FEEDBACK_LABELS:
        raise RequestInvalid([FieldError(("body", "labels"), f"at most {MAX_FEEDBACK_LABELS} labels",
                                         "too_long")])
    errors: list[FieldError] = []
    out = []
    for i, item in enumerate(labels):
        loc = ("body", "labels", i)
        if not isinstance(item, dict):
            errors.append(FieldError(loc, "a label must be an object", "type_error"))
            continue
        extra = set(item) - {"record_id", "label", "observed_at"}
        if extra:
            errors.append(FieldError((*loc, sorted(extra)[0]), "unknown field", "extra_forbidden"))
        rid = item.get("record_id")
        if not isinstance(rid, str) or not 0 < len(rid) <= 100:
            errors.append(FieldError((*loc, "record_id"), "a string of 1 to 100 characters",
                                     "type_error"))
        label = item.get("label")
        if label not in (0, 1) or isinstance(label, float):
            errors.append(FieldError((*loc, "label"), "must be 0, 1, true or false", "type_error"))
        observed = item.get("observed_at")
        parsed = None
        if observed is not None:
            try:
                parsed = datetime.fromisoformat(observed) if isinstance(observed, str) else None
            except ValueError:
                parsed = None
            if parsed is None:
                errors.append(FieldError((*loc, "observed_at"), "an ISO 8601 date-time", "type_error"))
        out.append({"record_id": rid, "label": int(label) if label in (0, 1) else 0,
                    "observed_at": parsed})
    if errors:
        raise RequestInvalid(errors)
    return out
