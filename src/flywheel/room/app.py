"""The control room as a Starlette app: the page, each section's JSON, the Evidently reports, and
promote/rollback behind the admin token.

Reading needs the viewer token (FLYWHEEL_VIEWER_TOKEN, or _FILE) when one is set, and one must be
set to listen beyond 127.0.0.1: as `Authorization: Bearer`, or once as `?token=` (the page then
keeps it in an HTTP-only cookie). Every query runs in a worker thread, never in the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route

from flywheel.config import ConfigError, ProjectBase
from flywheel.core.errors import FlywheelError
from flywheel.core.secrets import env_secret, redact
from flywheel.lifecycle.aliases import promote, rollback
from flywheel.lifecycle.card import ModelCard
from flywheel.llm.card import model_card
from flywheel.registry import Registry, RegistryError
from flywheel.room import data
from flywheel.room.page import page

log = logging.getLogger("flywheel.room")
VIEWER_TOKEN_ENV = "FLYWHEEL_VIEWER_TOKEN"
ADMIN_TOKEN_ENV = "FLYWHEEL_ADMIN_TOKEN"
COOKIE = "flywheel_room"
SECTION_TIMEOUT_S = 5.0
MAX_BODY = 4096


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str) -> None:
    """Beyond 127.0.0.1 the page needs a viewer token: refuse to start without one."""
    if not is_loopback(host) and not env_secret(VIEWER_TOKEN_ENV):
        raise ConfigError(f"the control room would listen on {host}: set {VIEWER_TOKEN_ENV} (or "
                          f"{VIEWER_TOKEN_ENV}_FILE) so that reading it needs a token, or listen on "
                          "127.0.0.1")


SERVING_ADDRESS = "serving-address.json"


def record_serving_address(home: Path, host: str, port: int) -> None:
    """Where `flywheel serve` listens, for the room of the same project to find it."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    home.mkdir(parents=True, exist_ok=True)
    (home / SERVING_ADDRESS).write_text(json.dumps({"url": f"http://{shown}:{port}", "pid": os.getpid()}))


def recorded_serving_url(home: Path) -> str | None:
    """The address a live `flywheel serve` of this project recorded (None: none runs)."""
    try:
        found = json.loads((home / SERVING_ADDRESS).read_text())
        os.kill(int(found["pid"]), 0)
        return str(found["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_NON_STR_KEYS), status,
                    media_type="application/json", headers=headers)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _bearer(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token if scheme.lower() == "bearer" else ""


class Room:
    def __init__(self, project: ProjectBase, base: str = "/",
                 served: Callable[[], dict[str, Any]] | None = None) -> None:
        """`served`: the version served now (default: asked of the prediction server's /ready)."""
        self.project, self.base = project, base
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="room")
        if served is not None:
            self.served = served  # type: ignore[method-assign]
        cfg = project.config.room
        serving = getattr(project.config, "serving", None)
        host = getattr(serving, "host", "127.0.0.1")
        self.configured_url = cfg.serving_url
        self.default_url = (
            f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{getattr(serving, 'port', 8000)}")

    @property
    def serving_url(self) -> str:
        """room.serving_url, else where this project's `flywheel serve` says it listens (it may
        have been given --port), else serving.host and serving.port."""
        return self.configured_url or recorded_serving_url(self.project.home) or self.default_url

    def viewer_refusal(self, request: Request) -> Response | None:
        expected = env_secret(VIEWER_TOKEN_ENV)
        if not expected:
            return None
        given = _bearer(request) or request.cookies.get(COOKIE, "") or request.query_params.get("token", "")
        if given and _same(given, expected):
            return None
        return _json({"detail": f"a viewer token is required ({VIEWER_TOKEN_ENV}): send it as a bearer "
                                "token or open the page once with ?token=..."}, 401,
                     {"www-authenticate": "Bearer"})

    async def index(self, request: Request) -> Response:
        if (refused := self.viewer_refusal(request)) is not None:
            return refused
        if "token" in request.query_params:  # keep it in a cookie, out of the address bar
            response = RedirectResponse(self.base, 303)
            response.set_cookie(COOKIE, request.query_params["token"], httponly=True, samesite="strict")
            return response
        range_ = request.query_params.get("range", "hour")
        if range_ not in data.RANGES:
            return _json({"detail": f"range must be one of {', '.join(data.RANGES)}"}, 422)
        sections = await run_in_threadpool(self.sections, range_)
        html = page(sections, self.base, range_, self.project.config.room.mlflow_url)
        return HTMLResponse(html, headers={"cache-control": "no-store"})

    def sections(self, range_: str) -> dict[str, Any]:
        p = self.project
        readers: dict[str, Callable[[], dict[str, Any]]] = {
            "models": lambda: data.models(p), "served": self.served,
            "traffic": lambda: data.traffic(p, range_), "drift": lambda: data.drift(p),
            "distribution": lambda: data.prediction_distribution(p),
            "performance": lambda: data.performance(p), "pipelines": lambda: data.pipelines(p)}
        out: dict[str, Any] = {"now": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                               "header": data.header(p)}
        # The sections are read side by side, each given SECTION_TIMEOUT_S: a store that hangs
        # (an MLflow server retrying its requests) blanks its own sections, not the page.
        futures = {name: self.pool.submit(read) for name, read in readers.items()}
        deadline = time.monotonic() + SECTION_TIMEOUT_S
        for name, future in futures.items():
            try:
                out[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # one store down must not blank the whole page
                error = (f"no answer within {SECTION_TIMEOUT_S:.0f} s" if isinstance(exc, FutureTimeout)
                         else redact(f"{type(exc).__name__}: {exc}"))
                log.warning("room section failed", extra={"event": "room_error", "section": name,
                                                          "error": error})
                out[name] = {"error": error}
        return out

    def served(self) -> dict[str, Any]:
        """The version the prediction server answers with now (its /ready)."""
        try:
            r = httpx.get(f"{self.serving_url}/ready", timeout=1.0)
            return {"url": self.serving_url, "version": r.json().get("version")}
        except (httpx.HTTPError, ValueError) as exc:
            return {"url": self.serving_url, "version": None,
                    "error": f"{self.serving_url}: {type(exc).__name__}"}

    async def api(self, request: Request) -> Response:
        if (refused := self.viewer_refusal(request)) is not None:
            return refused
        section = request.path_params["section"]
        p = self.project
        readers = {"models": lambda: data.models(p), "drift": lambda: data.drift(p),
                   "distribution": lambda: data.prediction_distribution(p),
                   "performance": lambda: data.performance(p), "pipelines": lambda: data.pipelines(p),
                   "served": self.served,
                   "traffic": lambda: data.traffic(p, request.query_params.get("range", "hour"))}
        if section not in readers:
            return _json({"detail": f"no section '{section}': {', '.join(readers)}"}, 404)
        try:
            future = self.pool.submit(readers[section])
            return _json(await asyncio.wait_for(asyncio.wrap_future(future), SECTION_TIMEOUT_S))
        except TimeoutError:
            return _json({"detail": f"{section} could not be read: no answer within "
                                    f"{SECTION_TIMEOUT_S:.0f} s"}, 503)
        except ValueError as exc:
            return _json({"detail": redact(str(exc))}, 422)
        except Exception as exc:  # a store that does not answer: say which, stay up
            error = redact(f"{type(exc).__name__}: {exc}")
            log.warning("room section failed", extra={"event": "room_error", "section": section,
                                                      "error": error})
            return _json({"detail": f"{section} could not be read: {error}"}, 503)

    async def report(self, request: Request) -> Response:
        if (refused := self.viewer_refusal(request)) is not None:
            return refused
        path = await run_in_threadpool(data.report_path, self.project, int(request.path_params["id"]))
        if not path:
            return _json({"detail": "this window has no report"}, 404)
        file = Path(path).resolve()
        if not file.is_relative_to(self.project.monitoring_dir.resolve()) or not file.is_file():
            return _json({"detail": "the report is not under the project's monitoring folder"}, 404)
        return FileResponse(file, media_type="text/html")

    async def card(self, request: Request) -> Response:
        """A version's model card, made now from its run (with its monitoring so far)."""
        if (refused := self.viewer_refusal(request)) is not None:
            return refused
        version = int(request.path_params["version"])

        def make() -> ModelCard | None:
            return model_card(self.project, Registry.for_project(self.project), version)

        try:
            made = await run_in_threadpool(make)
        except RegistryError as exc:
            return _json({"detail": str(exc)}, 404)
        if made is None:
            return _json({"detail": f"v{version} was trained before model cards"}, 404)
        return HTMLResponse(made.html)

    async def action(self, request: Request) -> Response:
        refused = self._admin_refusal(request)
        if refused is not None:
            return refused
        body = await request.body()  # JSON only: a form cannot be posted here from another site
        if len(body) > MAX_BODY or "json" not in request.headers.get("content-type", ""):
            return _json({"detail": "send a small JSON body (content-type: application/json)"}, 415)
        kind = request.path_params["kind"]
        if kind not in ("promote", "rollback"):
            return _json({"detail": f"no action '{kind}': promote or rollback"}, 404)
        try:
            payload = orjson.loads(body or b"{}")
            if kind == "promote":
                version = payload.get("version") if isinstance(payload, dict) else None
                if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                    return _json({"detail": [{"field": "version",
                                              "message": "a version number (>= 1)"}]}, 422)
                reason = f"promoted from the control room by {request.client.host if request.client else '?'}"
                move = await run_in_threadpool(promote, self.project, version, reason=reason)
            else:
                move = await run_in_threadpool(rollback, self.project)
        except orjson.JSONDecodeError:
            return _json({"detail": "the body is not JSON"}, 422)
        except FlywheelError as exc:
            return _json({"detail": str(exc)}, 409)
        log.info("alias moved from the room", extra={"event": "room_action", "action": kind,
                                                      "version": move.version})
        return _json({"action": kind, "version": move.version, "previous_version": move.previous_version})

    def _admin_refusal(self, request: Request) -> Response | None:
        expected = env_secret(ADMIN_TOKEN_ENV)
        if not expected:
            return _json({"detail": f"actions are disabled: set {ADMIN_TOKEN_ENV} where the room runs"}, 403)
        if not _same(_bearer(request), expected):
            return _json({"detail": "the admin token is required"}, 401, {"www-authenticate": "Bearer"})
        return None

    def routes(self) -> list[Route]:
        return [Route("/", self.index, methods=["GET"]),
                Route("/api/{section}", self.api, methods=["GET"]),
                Route("/api/{kind:str}", self.action, methods=["POST"]),
                Route("/reports/{id:int}", self.report, methods=["GET"]),
                Route("/cards/{version:int}", self.card, methods=["GET"])]


def create_room_app(project: ProjectBase) -> Starlette:
    return Starlette(routes=Room(project).routes())


def room_mount(project: ProjectBase, runtime: Any) -> list[Mount]:
    """The page at /room of a prediction server, when `room.mount_on_serve` is set; the version
    served is the one this worker's `runtime` holds."""
    if not project.config.room.mount_on_serve:
        return []

    def served() -> dict[str, Any]:
        model = runtime.current
        return {"url": "this server", "version": model.version if model else None}

    return [Mount("/room", routes=Room(project, "/room/", served).routes())]
