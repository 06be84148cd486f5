"""The serving contracts of the managed platforms, over the same data plane as `/v1/predict`:

- Amazon SageMaker (bring your own container): `GET /ping`, `POST /invocations` with a JSON body
  (`{"instances": [...]}`, or what `/v1/predict` takes) or `text/csv` rows; `Accept: text/csv`
  answers CSV, anything else JSON.
- Google Vertex AI (custom container): `{"instances": [...]}` in, `{"predictions": [...]}` out on
  the routes Vertex names in AIP_PREDICT_ROUTE and AIP_HEALTH_ROUTE.
- KServe's Open Inference Protocol v2: server and model metadata, liveness and readiness, and
  inference by model or by version.

An instance is a record (an object of the model's inputs) or a list of values in the order of the
model's inputs (`GET /v2/models/{name}` lists them). Every request is validated, scored, logged and
counted exactly as on `/v1/predict`.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from flywheel.serving.http.bodies import is_json, parse_json_body, read_body
from flywheel.serving.http.clients import Clients
from flywheel.serving.http.common import Call, Endpoint, json_response
from flywheel.serving.http.errors import MAX_ERRORS, FieldError, RequestInvalid, Unavailable
from flywheel.serving.http.metrics import ServingMetrics
from flywheel.serving.tabular.oip import oip_metadata, oip_records, oip_response
from flywheel.serving.tabular.runtime import LoadedModel

VERTEX_PREDICT_ENV, VERTEX_HEALTH_ENV = "AIP_PREDICT_ROUTE", "AIP_HEALTH_ROUTE"

Fields = list[tuple[Any, ...]]


class DataPlane(Protocol):
    """What the platform routes need of the tabular service (see `serving.app.TabularService`)."""

    metrics: ServingMetrics
    max_body_bytes: int
    clients: Clients

    @property
    def current(self) -> LoadedModel | None: ...

    async def score_and_log(self, model: LoadedModel, records: list[dict[str, Any]], request_id: str,
                            started: float, client: str = "") -> tuple[list[str], Fields]: ...


def instance_records(instances: Any, model: LoadedModel) -> list[dict[str, Any]]:
    """Vertex/SageMaker `instances`: records, or value lists in the order of the model's inputs."""
    if not isinstance(instances, list) or not instances:
        raise RequestInvalid([FieldError(("body", "instances"), "a non-empty list of instances "
                                         "(objects of the model's inputs, or lists of their values)",
                                         "missing")])
    names = list(model.spec.input_types)
    records: list[Any] = []
    errors: list[FieldError] = []
    more = 0
    for i, item in enumerate(instances):
        if isinstance(item, list):
            if len(item) != len(names):
                if len(errors) < MAX_ERRORS:
                    errors.append(FieldError(("body", "instances", i), f"a list instance needs "
                                             f"{len(names)} values, in the order {', '.join(names)}",
                                             "shape_mismatch"))
                else:
                    more += 1
                continue
            item = dict(zip(names, item, strict=True))
        records.append(item)
    if errors:
        raise RequestInvalid(errors, more)
    try:
        return model.validator.records(records)
    except RequestInvalid as exc:  # (body, i, field) -> (body, instances, i, field)
        raise RequestInvalid([FieldError(("body", "instances", *e.loc[1:]), e.msg, e.type)
                              for e in exc.errors]) from None


def csv_records(text: str, model: LoadedModel) -> list[dict[str, Any]]:
    """CSV rows, in the order of the model's inputs; a first row that names them all is a header
    and may order them differently. An empty cell is null; numeric inputs are read as numbers."""
    try:
        rows = [r for r in csv.reader(io.StringIO(text)) if r]
    except csv.Error as exc:  # a field over the csv module's limit, a NUL, an unclosed quote
        raise RequestInvalid([FieldError(("body",), f"not readable as CSV: {exc}", "csv_error")]) from None
    if not rows:
        raise RequestInvalid([FieldError(("body",), "send at least one CSV row", "too_short")])
    types = model.spec.input_types
    names = list(types)
    if set(rows[0]) == set(names) and len(rows[0]) == len(names):
        names, rows = rows[0], rows[1:]
    records: list[dict[str, Any]] = []
    errors: list[FieldError] = []
    more = 0
    for i, row in enumerate(rows):
        if len(row) != len(names):
            if len(errors) < MAX_ERRORS:  # count the rest: an answer's errors are capped anyway
                errors.append(FieldError(("body", i), f"a row needs {len(names)} values, in the "
                                         f"order {', '.join(names)}", "shape_mismatch"))
            else:
                more += 1
            continue
        if not errors:
            records.append({n: _cell(v, types[n]) for n, v in zip(names, row, strict=True)})
    if errors:
        raise RequestInvalid(errors, more)
    if not records:
        raise RequestInvalid([FieldError(("body",), "send at least one CSV row after the header",
                                         "too_short")])
    return model.validator.records(records)


def _cell(value: str, kind: str) -> Any:
    if value == "":
        return None
    if kind == "number":
        try:
            return float(value)
        except ValueError:
            return value  # the validator names the field and says it must be a number
    return value


def predictions(model: LoadedModel, ids: list[str], fields: Fields) -> list[dict[str, Any]]:
    return model.answers.predictions(ids, fields)


def csv_answer(rows: list[dict[str, Any]]) -> bytes:
    """One CSV line per record: the record id and the task's answer (multiclass: label, probability)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = [k for k in rows[0] if k != "probabilities"]
    writer.writerow(keys)
    for row in rows:
        writer.writerow([row[k] for k in keys])
    return out.getvalue().encode()


def server_metadata() -> dict[str, Any]:
    try:
        ours = version("mlflywheel")
    except PackageNotFoundError:  # a source checkout that was not installed
        ours = "0+unknown"
    return {"name": "flywheel", "version": ours, "extensions": []}


Parse = Callable[[Request, LoadedModel], Awaitable[list[dict[str, Any]]]]


class PlatformRoutes:
    """The routes of every contract; each request goes through `_serve` (validate, score, log),
    and its errors through the one answer path (`Endpoint`)."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def _serve(self, request: Request, call: Call, parse: Parse,
                     render: Callable[[LoadedModel, str, list[str], Fields], Response | dict[str, Any]],
                     model: LoadedModel | None = None) -> Response | dict[str, Any]:
        client = self.plane.clients.caller(request.headers.get("authorization", ""), "predict")
        model = model or self.plane.current
        if model is None:
            raise Unavailable("no champion model is loaded yet")
        call.version = model.version
        records = await parse(request, model)
        ids, fields = await self.plane.score_and_log(model, records, call.request_id, call.started, client)
        return render(model, call.request_id, ids, fields)

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, self.plane.max_body_bytes)

    # SageMaker ------------------------------------------------------------------------------
    async def ping(self, request: Request) -> Response:
        model = self.plane.current
        return json_response({"ready": model is not None}, 200 if model is not None else 503)

    async def invocations(self, request: Request, call: Call) -> Response | dict[str, Any]:
        async def parse(request: Request, model: LoadedModel) -> list[dict[str, Any]]:
            body = await self._body(request)
            kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if kind == "text/csv":
                try:
                    return csv_records(body.decode("utf-8-sig"), model)
                except UnicodeDecodeError:
                    raise RequestInvalid([FieldError(("body",), "CSV must be UTF-8", "type_error")]) from None
            if not is_json(kind):
                raise RequestInvalid([FieldError(("headers", "content-type"), "send application/json or "
                                                 "text/csv", "unsupported_media_type")])
            data = parse_json_body(body)
            if isinstance(data, dict) and "instances" in data:
                return instance_records(data["instances"], model)
            return model.validator.records(data)

        wants_csv = "text/csv" in request.headers.get("accept", "")

        def render(model: LoadedModel, _: str, ids: list[str], fields: Fields) -> Response | dict[str, Any]:
            rows = predictions(model, ids, fields)
            if wants_csv:
                return Response(csv_answer(rows), media_type="text/csv")
            return {"predictions": rows, "model": model.name, "version": model.version,
                    **model.answers.top_level}

        return await self._serve(request, call, parse, render)

    # Vertex AI ------------------------------------------------------------------------------
    async def vertex_predict(self, request: Request, call: Call) -> Response | dict[str, Any]:
        async def parse(request: Request, model: LoadedModel) -> list[dict[str, Any]]:
            data = parse_json_body(await self._body(request))
            if not isinstance(data, dict):
                raise RequestInvalid([FieldError(("body",), 'send {"instances": [...]}', "type_error")])
            return instance_records(data.get("instances"), model)

        def render(model: LoadedModel, _: str, ids: list[str], fields: Fields) -> dict[str, Any]:
            return {"predictions": predictions(model, ids, fields), "deployedModelId": str(model.version)}

        return await self._serve(request, call, parse, render)

    # Open Inference Protocol v2 ---------------------------------------------------------------
    async def v2_server(self, request: Request) -> Response:
        return json_response(server_metadata())

    async def v2_live(self, request: Request) -> Response:
        return json_response({"live": True})

    async def v2_ready(self, request: Request) -> Response:
        ready = self.plane.current is not None
        return json_response({"ready": ready}, 200 if ready else 503)

    def _model(self, request: Request) -> tuple[LoadedModel | None, Response | None]:
        """The served model when the path names it (and its version, if any); else the 404."""
        model, name = self.plane.current, request.path_params["name"]
        wanted = request.path_params.get("version")
        if model is None or name != model.name:
            served = f"; this server serves '{model.name}'" if model else ""
            return None, json_response({"error": f"model '{name}' is not served here{served}"}, 404)
        if wanted is not None and wanted != str(model.version):
            return None, json_response({"error": f"version {wanted} of '{name}' is not served here; "
                                                 f"this server serves version {model.version}"}, 404)
        return model, None

    async def v2_model(self, request: Request) -> Response:
        model, refused = self._model(request)
        return refused or json_response(oip_metadata(model))  # type: ignore[arg-type]

    async def v2_model_ready(self, request: Request) -> Response:
        model, refused = self._model(request)
        return refused or json_response({"name": model.name, "ready": True})  # type: ignore[union-attr]

    async def v2_infer(self, request: Request, call: Call) -> Response | dict[str, Any]:
        if self.plane.current is None:
            raise Unavailable("no champion model is loaded yet")
        model, refused = self._model(request)
        if refused is not None:
            return refused  # the protocol's own 404 body
        body: Any = {}

        async def parse(request: Request, model: LoadedModel) -> list[dict[str, Any]]:
            nonlocal body
            body = parse_json_body(await self._body(request))
            return oip_records(body, model)

        def render(model: LoadedModel, request_id: str, ids: list[str], fields: Fields) -> dict[str, Any]:
            return oip_response(model, body, request_id, ids, fields)

        return await self._serve(request, call, parse, render, model)

    def routes(self, env: dict[str, str] | None = None) -> list[Route]:
        env = dict(os.environ) if env is None else env
        metrics = self.plane.metrics
        infer = Endpoint("infer", metrics, self.v2_infer)
        routes = [
            Route("/ping", self.ping, methods=["GET"]),
            Route("/invocations", Endpoint("invocations", metrics, self.invocations),
                  methods=["POST"]),
            Route("/v2", self.v2_server, methods=["GET"]),
            Route("/v2/health/live", self.v2_live, methods=["GET"]),
            Route("/v2/health/ready", self.v2_ready, methods=["GET"]),
            Route("/v2/models/{name}", self.v2_model, methods=["GET"]),
            Route("/v2/models/{name}/ready", self.v2_model_ready, methods=["GET"]),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}", self.v2_model, methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}/ready", self.v2_model_ready, methods=["GET"]),
            Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        ]
        if env.get(VERTEX_PREDICT_ENV):
            vertex = Endpoint("vertex_predict", metrics, self.vertex_predict)
            routes.append(Route(env[VERTEX_PREDICT_ENV], vertex, methods=["POST"]))
        if env.get(VERTEX_HEALTH_ENV):
            routes.append(Route(env[VERTEX_HEALTH_ENV], self.v2_ready, methods=["GET"]))
        return routes
