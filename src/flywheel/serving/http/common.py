"""What every Flywheel server shares over HTTP, whatever it serves (ONNX or a merged LoRA model):
request ids, JSON answers, the counted 500 of anything unexpected, admin auth, the champion
runtime,
and the routes /health, /ready, /admin/reload, /v1/models, /metrics, /openapi.json and /docs
(Swagger UI on the served OpenAPI document, its assets from the installed package: no network)."""

from __future__ import annotations

import contextlib
import gc
import hmac
import itertools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from flywheel.config import ProjectBase
from flywheel.core.secrets import env_secret
from flywheel.registry import Registry
from flywheel.serving.http.clients import Clients
from flywheel.serving.http.errors import INTERNAL, HttpError, error_answer
from flywheel.serving.http.metrics import ServingMetrics
from flywheel.serving.http.runtime import M, ModelRuntime

log = logging.getLogger("flywheel.serving")

# More routes for an app, given its champion runtime: what the composing layer mounts (the room).
Mounts = Callable[[ModelRuntime[Any]], list[BaseRoute]]
ADMIN_TOKEN_ENV = "FLYWHEEL_ADMIN_TOKEN"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


class RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):012x}"


new_request_id = RequestIds()


@dataclass
class Call:
    """One request as its endpoint handles it: its id, when it started, the version serving it."""

    request_id: str
    started: float
    version: int = 0
    counted: bool = False  # the handler counts it itself (a stream, counted when it ends)


Handle = Callable[[Request, Call], Awaitable[Response | dict[str, Any]]]
# An endpoint's own error format (the OpenAI endpoints'): (status, payload, what was raised) ->
# the (status, payload) to answer.
ErrorBody = Callable[[int, dict[str, Any], BaseException], tuple[int, dict[str, Any]]]


class Endpoint:
    """A route's one answer path. The handler returns a JSON payload (or a Response) or raises: an
    `HttpError` is answered with its status, code and detail, anything else is a logged 500 with
    no internals; every answer carries the request id and is counted once under `name`."""

    def __init__(self, name: str, metrics: ServingMetrics, handle: Handle,
                 error_body: ErrorBody | None = None):
        self.name, self.metrics, self.handle, self.error_body = name, metrics, handle, error_body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:  # ASGI: a route's endpoint
        response = await self.answer(Request(scope, receive))
        await response(scope, receive, send)

    async def answer(self, request: Request) -> Response:
        call = Call(new_request_id(), time.perf_counter())
        try:
            result = await self.handle(request, call)
            response = result if isinstance(result, Response) else json_response(result)
        except Exception as exc:
            status, payload, headers = error_answer(exc, call.request_id, self.name)
            if self.error_body is not None:
                status, payload = self.error_body(status, payload, exc)
            response = json_response(payload, status, headers)
        response.headers["x-request-id"] = call.request_id
        if not call.counted:
            self.metrics.observe(self.name, response.status_code, call.version,
                                 time.perf_counter() - call.started)
        return response


def client_address(request: Request) -> str:
    """Whose share of the generation slots a request takes: its peer's address (behind a proxy every
    caller shares one: raise serving.max_per_client there)."""
    return request.client.host if request.client else ""


def admin_refusal(request: Request, clients: Clients | None = None) -> Response | None:
    """None when the request carries the admin bearer token (FLYWHEEL_ADMIN_TOKEN, or a declared
    client's with the `admin` scope); else the 401/403 to answer."""
    expected = env_secret(ADMIN_TOKEN_ENV)
    if clients is not None and clients.enabled:
        _, refused = clients.identify(request.headers.get("authorization", ""), "admin")
        if refused is None:
            return None
        if not expected or refused.status == 403:  # a known client without the scope
            return json_response({"detail": refused.detail}, refused.status, refused.headers)
    if not expected:
        return json_response({"detail": f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV} "
                                         f"(or {ADMIN_TOKEN_ENV}_FILE)"}, 403)
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        return json_response({"detail": "a valid bearer token is required"}, 401,
                             {"www-authenticate": "Bearer"})
    return None


def champion_runtime(project: ProjectBase, interval_s: float, metrics: ServingMetrics,
                     loader: Callable[[Registry, int], M],
                     after_swap: Callable[[], None] | None = None) -> ModelRuntime[M]:
    """The runtime that follows alias champion, counting swaps and the served version in metrics."""

    def on_swap(old: M | None, new: M) -> None:
        if old is not None:
            metrics.swaps.inc()
        metrics.model_version.set(new.version)
        if after_swap:
            after_swap()

    return ModelRuntime(lambda: Registry.for_project(project), interval_s, loader, on_swap=on_swap)


def common_routes(runtime: ModelRuntime[Any], metrics: ServingMetrics,
                  openapi: Callable[[], dict[str, Any]], models_extra: dict[str, Any] | None = None,
                  metrics_extra: Callable[[], Awaitable[bytes]] | None = None,
                  health_extra: Callable[[], dict[str, Any]] | None = None,
                  clients: Clients | None = None) -> list[Route]:
    """/health, /ready, /admin/reload, /v1/models, /metrics, /openapi.json."""

    async def health(request: Request) -> Response:
        return json_response({"status": "ok", **(health_extra() if health_extra else {})})

    async def ready(request: Request) -> Response:
        model = runtime.current
        if model is None:
            reason = _public(runtime.last_error) or "no champion loaded"
            return json_response({"ready": False, "reason": reason}, 503)
        return json_response({"ready": True, "model": model.name, "version": model.version})

    async def reload(request: Request) -> Response:
        refused = admin_refusal(request, clients)
        if refused is not None:
            return refused
        swapped = await run_in_threadpool(runtime.check_now)
        model = runtime.current
        log.info("admin reload", extra={"event": "admin_reload", "swapped": swapped})
        return json_response({"swapped": swapped, "version": model.version if model else None,
                              "last_error": runtime.last_error})

    async def models(request: Request) -> Response:
        model = runtime.current
        # `data`/`object`: the same list in the OpenAI shape (`client.models.list()`)
        listed = [{"id": model.name, "object": "model", "created": int(model.loaded_at.timestamp()),
                   "owned_by": "flywheel"}] if model else []
        return json_response({"models": [model.describe()] if model else [], **(models_extra or {}),
                              "last_error": _public(runtime.last_error), "object": "list", "data": listed})

    async def prometheus(request: Request) -> Response:
        extra = await metrics_extra() if metrics_extra else b""  # may update gauges: first
        body, content_type = metrics.render()
        return Response(body + extra, media_type=content_type)

    async def openapi_json(request: Request) -> Response:
        return json_response(openapi())

    return [Route("/health", health, methods=["GET"]), Route("/ready", ready, methods=["GET"]),
            Route("/admin/reload", reload, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]), *docs_routes()]


# The interactive API page: Swagger UI's own files, shipped by the swagger-ui-bundle package.
DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en"><head><meta charset="UTF-8"><title>Flywheel API</title>
<link rel="stylesheet" href="docs/swagger-ui.css"><link rel="icon" href="docs/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div><script src="docs/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script></body></html>
"""
DOCS_INIT = b'window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true});\n'
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
               "favicon-32x32.png": "image/png"}


def docs_routes() -> list[Route]:
    """/docs and the few files it loads (read once, cached by browsers for a day)."""
    from swagger_ui_bundle import swagger_ui_path

    cache: dict[str, bytes] = {"init.js": DOCS_INIT}
    types = {**DOCS_ASSETS, "init.js": "text/javascript"}

    async def page(request: Request) -> Response:
        return Response(DOCS_PAGE, media_type="text/html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in types:
            return json_response({"detail": "not found"}, 404)
        if name not in cache:
            cache[name] = (swagger_ui_path / name).read_bytes()
        return Response(cache[name], media_type=types[name], headers={"cache-control": "max-age=86400"})

    return [Route("/docs", page, methods=["GET"]), Route("/docs/{name}", asset, methods=["GET"])]


def _public(error: str | None) -> str | None:
    """What anyone may read of a load or registry error: its kind, not its text (which may hold
    paths, hosts or URLs); the server log and /admin/reload (with the token) have the whole of it."""
    if error is None:
        return None
    kind = "the registry is unreachable" if error.startswith("registry:") else "the champion failed to load"
    return f"{kind}; see the server log"


def freeze_heap() -> None:
    """Move everything alive now (MLflow, pandas, the model) out of the collector's sight.

    Full collections scan every tracked object; with the libraries a worker imports that took
    tens of milliseconds and showed up as the p99 latency. Request garbage is short-lived and is
    still collected in the young generations.
    """
    gc.collect()
    gc.freeze()
    # The prediction-log thread must never hold the event loop for the default 5 ms.
    sys.setswitchinterval(0.0005)


def worker_lifespan(runtime: ModelRuntime[Any], start: Callable[[], None] | None = None,
                    stop: Callable[[], dict[str, Any]] | None = None,
                    after_load: Callable[[], None] | None = None,
                    ) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """Load the champion before taking traffic, follow the alias, and stop cleanly (SIGTERM)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if start:
            start()
        await run_in_threadpool(runtime.check_now)
        if after_load:
            after_load()
        runtime.start()
        log.info("worker ready", extra={"event": "worker_started", "version":
                                         runtime.current.version if runtime.current else None})
        try:
            yield
        finally:
            runtime.stop()
            stopped = stop() if stop else {}
            ServingMetrics.worker_exited(os.getpid())
            log.info("worker stopped", extra={"event": "worker_stopped", **stopped})

    return lifespan


class CountedErrors:
    """The one handler of unexpected exceptions, around a whole server: whatever a route raises
    becomes a JSON 500 with a request id, counted in the request metrics under the route's
    endpoint name, and logged with its traceback. Routes raise what they expect (an `HttpError`:
    413, 422, 503, ...) and their `Endpoint` answers it;
    everything else lands here, so no failure is an HTML page or missing from /metrics."""

    def __init__(self, app: Any, metrics: ServingMetrics, endpoint_of: Callable[[str], str] | None = None):
        self.app = app
        self.state = getattr(app, "state", None)
        self.metrics = metrics
        self.endpoint_of = endpoint_of or endpoint_name

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        response_started = False

        async def tracked_send(message: Any) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            # Starlette's own error middleware answered already (with `internal_error`) and raised
            request_id = scope.get(REQUEST_ID_KEY) or new_request_id()
            endpoint = self.endpoint_of(scope.get("path", ""))
            log.exception("unexpected error", extra={"event": "request_error", "status": 500,
                                                     "request_id": request_id, "endpoint": endpoint})
            self.metrics.observe(endpoint, 500, 0, time.perf_counter() - started)
            if response_started:
                return  # the status line is gone: the client sees the stream end early
            body = orjson.dumps({"detail": "internal error; see the server log", "request_id": request_id})
            await send({"type": "http.response.start", "status": 500, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode())]})
            await send({"type": "http.response.body", "body": body})


REQUEST_ID_KEY = "flywheel.request_id"


async def internal_error(request: Request, exc: Exception) -> Response:
    """Starlette's answer to an unexpected exception (its error middleware then re-raises it for
    `CountedErrors` to log and count): the same JSON 500 as every other error."""
    request_id = request.scope[REQUEST_ID_KEY] = new_request_id()
    return json_response({"detail": INTERNAL, "code": HttpError.code, "request_id": request_id},
                         500, {"x-request-id": request_id})


ERROR_HANDLERS: dict[Any, Any] = {Exception: internal_error}


def endpoint_name(path: str) -> str:
    """A bounded metrics label for a request path: its first two segments ("v2/models" for every
    model route), never the raw path a client chose."""
    parts = [p for p in path.split("/") if p][:2]
    known = {"v1", "v2", "admin", "room", "health", "ready", "metrics", "openapi.json", "docs",
             "invocations", "ping", "predict", "models", "feedback", "generate", "chat", "completions",
             "infer", "reload", "api"}
    return "/".join(p if p in known else "other" for p in parts) or "root"


class HotPathDispatch:
    """Sends one route (method + path) straight to a raw ASGI handler and the rest to Starlette."""

    def __init__(self, app: Starlette, method: str, path: str, handler: Any):
        self.app = app
        self.state = app.state
        self.method, self.path, self.handler = method, path, handler

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == self.method:
            await self.handler(scope, receive, send)
        else:
            await self.app(scope, receive, send)
