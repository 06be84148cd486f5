"""The prediction server with a real registry and state database: in-process (Starlette's
TestClient runs the app, its lifespan and its log sink) for validation, protocols and error paths;
over real HTTP on 127.0.0.1 for what needs a process (hot swap under load, signals, workers)."""

import gc
import json
import os
import signal
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from flywheel.data.features import build_matrix
from flywheel.data.sources import make_engine
from flywheel.lifecycle.aliases import promote, rollback
from flywheel.lifecycle.train import train_challenger
from flywheel.registry import Registry
from flywheel.serving.http.common import ADMIN_TOKEN_ENV
from flywheel.serving.tabular.app import create_app
from flywheel.serving.tabular.runtime import load_version
from flywheel.state.logread import read_log
from tests.conftest import SOURCE_TYPES, ServerProcess, load_project, write_table

# One worker builds this module's shared fixture (a trained model, a server) once.
pytestmark = pytest.mark.xdist_group("serving-test_app")

TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def project(tmp_path_factory, sba_sample):
    """v1 LightGBM (champion) and v2 scikit-learn (challenger, refused by the gate)."""
    import yaml

    from tests.conftest import example_config

    folder = tmp_path_factory.mktemp("serving")
    cfg = example_config()
    cfg["model"]["params"] = {"num_boost_round": 60}
    cfg["serving"]["reload_interval_s"] = 0.3
    cfg["gate"]["min_improvement"] = 0.5  # v2 never becomes champion by the gate
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES)
    assert train_challenger(project).promoted

    os.environ["FLYWHEEL_MODEL__TYPE"] = "sklearn"
    try:
        sk = load_project(project.path, env={**os.environ, "FLYWHEEL_HOME": str(project.home)})
        assert not train_challenger(sk).promoted
    finally:
        del os.environ["FLYWHEEL_MODEL__TYPE"]
    return project


@pytest.fixture(scope="module")
def server(project):
    srv = ServerProcess(project, env={"FLYWHEEL_ADMIN_TOKEN": TOKEN})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(project):
    """The same app in this process; the worker's GC freeze and switch interval are undone after."""
    switch = sys.getswitchinterval()
    try:
        with TestClient(create_app(project), base_url="http://testserver") as test_client:
            yield test_client
    finally:
        gc.unfreeze()
        sys.setswitchinterval(switch)


@pytest.fixture(scope="module")
def records(project, sba_sample):
    spec = load_version(Registry.for_project(project), 1).spec
    rows = sba_sample[spec.input_columns].head(50)
    out = []
    for _, row in rows.iterrows():
        out.append({c: (None if v is None or (isinstance(v, float) and np.isnan(v)) else
                        (v.item() if hasattr(v, "item") else v)) for c, v in row.items()})
    return out


def test_predict_one_and_many_names_model_version_and_ids(client, records):
    one = client.post("/v1/predict", json=records[0])
    assert one.status_code == 200, one.text
    body = one.json()
    assert (body["model"], body["version"]) == ("sba-loans", 1)
    assert body["request_id"] and one.headers["x-request-id"] == body["request_id"]
    [pred] = body["predictions"]
    assert pred["record_id"].startswith(body["request_id"]) and pred["record_id"].endswith("-0")
    # the tag (16 hex digits), then how many records the request held, then the record's index
    assert pred["record_id"] == f"{body['request_id']}{pred['record_id'][len(body['request_id']):][:16]}.1-0"
    assert 0 <= pred["probability"] <= 1
    assert pred["decision"] == (pred["probability"] >= body["threshold"])
    many = client.post("/v1/predict",
                      json=[{**r, "meta": {"entity_id": f"L{i}"}} for i, r in enumerate(records[:10])])
    assert many.status_code == 200
    assert [p["record_id"][-2:] for p in many.json()["predictions"]][:3] == ["-0", "-1", "-2"]
    assert many.json()["predictions"][0]["probability"] == pytest.approx(pred["probability"])


def test_served_probabilities_equal_the_batch_path(client, project, records, sba_sample):
    served = client.post("/v1/predict", json=records).json()["predictions"]
    model = load_version(Registry.for_project(project), 1)
    batch = model.predict_matrix(build_matrix(model.spec, sba_sample.head(len(records))))
    assert np.allclose([p["probability"] for p in served], batch, atol=1e-6)


@pytest.mark.parametrize(("mutate", "loc", "kind"), [
    (lambda r: r.pop("state"), ["body", "state"], "missing"),
    (lambda r: r.update(favourite_colour="red"), ["body", "favourite_colour"], "extra_forbidden"),
    (lambda r: r.update(gr_appv="a lot"), ["body", "gr_appv"], "type_error"),
    (lambda r: r.update(state=7), ["body", "state"], "type_error"),
    (lambda r: r.update(bank=None), ["body", "bank"], "null_forbidden"),
    (lambda r: r.update(meta="not an object"), ["body", "meta"], "type_error"),
])
def test_invalid_records_get_422_naming_the_field(client, records, mutate, loc, kind):
    record = dict(records[0])
    mutate(record)
    r = client.post("/v1/predict", json=record)
    assert r.status_code == 422
    assert {"loc": loc, "type": kind} in [{"loc": e["loc"], "type": e["type"]} for e in r.json()["detail"]]


def test_true_and_false_are_numbers_as_in_a_batch_file(client, records):
    """A boolean column (is_new_business: true) is read as 1/0 by `flywheel predict` from a file;
    the server used to refuse the same value with a 422."""
    one, yes = dict(records[0]), dict(records[0])
    one["new_exist"], yes["new_exist"] = 1, True
    answers = [client.post("/v1/predict", json=r) for r in (one, yes)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["predictions"][0]["probability"] == \
        answers[1].json()["predictions"][0]["probability"]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_nan_and_infinity_are_refused_with_the_field_named(client, records, literal):
    text = json.dumps({**records[0], "gr_appv": 12345.5}).replace("12345.5", literal)
    r = client.post("/v1/predict", content=text, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "gr_appv"]


def oip_type(records: list[dict], field: str) -> str:
    """The OIP datatype of a field, from the values the records hold for it."""
    return "BYTES" if any(isinstance(r[field], str) for r in records) else "FP64"


def nested(levels: int) -> dict:
    meta: dict = {"leaf": 1}
    for _ in range(levels - 1):
        meta = {"inner": meta}
    return meta


def test_meta_is_bounded_in_depth_and_values_so_every_accepted_request_can_be_logged(client, records):
    ok = client.post("/v1/predict", json={**records[0], "meta": nested(8)})
    assert ok.status_code == 200, ok.text
    for meta in (nested(9), nested(300), {"ids": list(range(1001))}):
        r = client.post("/v1/predict", json={**records[0], "meta": meta})
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["body", "meta"] and "nested at most 8 levels" in error["msg"]
    # the Open Inference Protocol: a tensor named meta, and a name given twice
    rows = records[:1]
    inputs = [{"name": k, "shape": [1], "datatype": oip_type(records, k), "data": [r[k] for r in rows]}
              for k in rows[0]]
    deep = client.post("/v2/models/sba-loans/infer",
                       json={"inputs": [*inputs, {"name": "meta", "shape": [1], "datatype": "BYTES",
                                                  "data": [nested(300)]}]})
    assert deep.status_code == 422 and "nested at most 8 levels" in deep.text
    twice = client.post("/v2/models/sba-loans/infer", json={"inputs": [*inputs, inputs[0]]})
    assert twice.status_code == 422 and f"input '{inputs[0]['name']}' is given twice" in twice.text


def test_numbers_beyond_float32_are_refused_not_served_as_infinity(client, records):
    for value in (1e308, -3.5e38, 10**39):
        r = client.post("/v1/predict", json={**records[0], "gr_appv": value})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"] == ["body", "gr_appv"] and "out of range" in r.text
    assert client.post("/v1/predict", json={**records[0], "gr_appv": 3.0e38}).status_code == 200


def test_error_answers_stay_small_whatever_the_request(client, records):
    wrong = {f"field_{i}": i for i in range(40)}  # 40 unknown fields and every input missing
    body = json.dumps([wrong] * 100).encode()
    r = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert len(detail) == 51 and detail[-1]["type"] == "too_many_errors"
    assert "more errors not shown" in detail[-1]["msg"]
    assert len(r.content) < 3 * len(body), (len(r.content), len(body))  # was about 300x


def test_list_limits_and_bad_json(client, records):
    assert client.post("/v1/predict", json=[]).status_code == 422
    too_many = client.post("/v1/predict", json=[records[0]] * 1001)
    assert too_many.status_code == 422 and "at most 1000" in too_many.text
    bad = client.post("/v1/predict", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["type"] == "json_invalid"
    errors = client.post("/v1/predict", json=[records[0], {"state": 1}]).json()["detail"]
    assert all(e["loc"][1] == 1 for e in errors)  # only the second record is wrong


def test_oversized_bodies_get_413_declared_or_streamed(client):
    big = b"[" + b" " * 1_100_000 + b"]"
    answers = [client.post(path, content=big, headers={"content-type": "application/json"})
               for path in ("/v1/predict", "/v1/feedback", "/v2/models/sba-loans/infer", "/invocations")]
    # one error type, one answer: status, code, detail and the request id, in body and header
    for r in answers:
        body = r.json()
        assert r.status_code == 413 and body["code"] == "body_too_large", r.text
        assert body["detail"] == "body larger than 1048576 bytes"
        assert body["request_id"] == r.headers["x-request-id"]
    assert len({r.json()["request_id"] for r in answers}) == len(answers)

    def chunks():  # no content-length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 50_000

    assert client.post("/v1/predict", content=chunks()).status_code == 413


def test_open_inference_protocol_matches_v1(client, records):
    rows = records[:3]
    inputs = [{"name": k, "shape": [3],
               "datatype": "FP64" if isinstance(rows[0][k], int | float) else "BYTES",
               "data": [r[k] for r in rows]} for k in rows[0]]
    r = client.post("/v2/models/sba-loans/infer", json={"id": "abc", "inputs": inputs})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "sba-loans" and out["model_version"] == "1" and out["id"] == "abc"
    probs = out["outputs"][0]["data"]
    v1 = [p["probability"] for p in client.post("/v1/predict", json=rows).json()["predictions"]]
    assert probs == pytest.approx(v1)
    assert client.post("/v2/models/other/infer", json={"inputs": inputs}).status_code == 404
    meta = client.get("/v2/models/sba-loans").json()
    assert {i["name"] for i in meta["inputs"]} == set(rows[0])


def test_open_inference_protocol_holds_requests_to_their_declared_shape_and_datatype(client, records):
    rows = records[:2]

    def tensors(**override) -> list[dict]:
        out = [{"name": k, "shape": [2], "datatype": oip_type(records, k), "data": [r[k] for r in rows]}
               for k in rows[0]]
        out[0].update(override)
        return out

    assert client.post("/v2/models/sba-loans/infer", json={"inputs": tensors()}).status_code == 200
    column = client.post("/v2/models/sba-loans/infer", json={"inputs": tensors(shape=[2, 1])})
    assert column.status_code == 200
    name = next(iter(rows[0]))
    for override, field, words in (({"shape": [3]}, "shape", "holds 3 values but data has 2"),
                                   ({"shape": "2"}, "shape", "non-negative integers"),
                                   ({"datatype": "COMPLEX"}, "datatype", "one of"),
                                   ({"datatype": "FP32" if oip_type(records, name) == "BYTES" else "BYTES"},
                                    "datatype", f"'{name}' is a")):
        r = client.post("/v2/models/sba-loans/infer", json={"inputs": tensors(**override)})
        assert r.status_code == 422, (override, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", "inputs", 0, field] and words in r.text, r.text


def test_models_health_ready_and_openapi(client):
    models = client.get("/v1/models").json()["models"]
    assert models[0]["version"] == 1 and models[0]["lineage"]["trained_on"]["from"] == "1994-10-01"
    assert len(models[0]["lineage"]["data_hash"]) == 64
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["prediction_log"]["state"] == "ok"
    assert set(health["prediction_log"]) == {"state", "reasons", "queue_depth", "dropped", "sink_restarts"}
    assert client.get("/ready").json()["ready"] is True
    doc = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v2/models/{name}/infer", "/v1/models", "/health", "/ready", "/metrics",
            "/v1/feedback", "/admin/reload"} <= set(doc["paths"])
    body = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]
    record = body["schema"]["oneOf"][0]
    assert record["additionalProperties"] is False and "gr_appv" in record["required"]


def test_docs_page_is_swagger_ui_on_the_served_document_from_local_files(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="docs/swagger-ui-bundle.js"' in page.text and "http" not in page.text.split("<body>")[1]
    assert 'url: "openapi.json"' in client.get("/docs/init.js").text
    bundle = client.get("/docs/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert b"SwaggerUIBundle" in bundle.content and len(bundle.content) > 500_000
    assert client.get("/docs/swagger-ui.css").headers["content-type"].startswith("text/css")
    for other in ("index.html", "swagger-ui-bundle.js.map", "..%2f..%2fpyproject.toml"):
        assert client.get(f"/docs/{other}").status_code == 404


def test_admin_reload_needs_the_bearer_token(client, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)  # read per request; never leaks into server processes
    assert client.post("/admin/reload").status_code == 401
    wrong = client.post("/admin/reload", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    ok = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["version"] == 1


def test_the_admin_token_may_be_a_mounted_secret_file(client, monkeypatch, tmp_path):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    secret = tmp_path / "admin-token"
    secret.write_text(TOKEN + "\n")  # as `kubectl create secret --from-file` leaves it
    monkeypatch.setenv(ADMIN_TOKEN_ENV + "_FILE", str(secret))
    assert client.post("/admin/reload", headers={"authorization": "Bearer nope"}).status_code == 401
    ok = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_load_errors_are_told_only_to_the_admin(client, monkeypatch):
    runtime = client.app.app.state.runtime
    secret = "loading v9: could not open postgresql://flywheel:hunter2@db.internal/state"
    monkeypatch.setattr(runtime, "last_error", secret)
    public = client.get("/v1/models").json()["last_error"]
    assert public == "the champion failed to load; see the server log"
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    admin = client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert admin["last_error"] == secret


def test_feedback_must_be_json_so_a_web_page_cannot_post_it_cross_site(client, records):
    rid = client.post("/v1/predict", json=records[0]).json()["predictions"][0]["record_id"]
    body = json.dumps({"labels": [{"record_id": rid, "label": 1}]})
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        r = client.post("/v1/feedback", content=body, headers={"content-type": kind})
        assert r.status_code == 415 and "application/json" in r.text, (kind, r.text)
    for kind in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert client.post("/v1/feedback", content=body, headers={"content-type": kind}).status_code == 200


def test_feedback_is_idempotent_and_only_for_record_ids_this_deployment_issued(client, project, records):
    rid = client.post("/v1/predict", json=records[0]).json()["predictions"][0]["record_id"]
    label = {"record_id": rid, "label": 1, "observed_at": "2003-05-01T00:00:00+00:00"}
    for _ in range(2):
        r = client.post("/v1/feedback", json={"labels": [label]})
        assert r.status_code == 200 and r.json()["accepted"] == 1
    bad = client.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 3}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "labels", 0, "label"]

    # Guessed, forged and foreign ids are refused, naming each; nothing of the request is stored.
    request_id, _, number = rid.rpartition("-")
    forged = [f"{request_id[:-1]}{'0' if request_id[-1] != '0' else '1'}-{number}",  # tag changed
              f"{request_id[:-16]}-0", "from-last-year-0", f"{request_id}-x"]  # no tag; no number
    refused = client.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 0}] +
                                                [{"record_id": f, "label": 0} for f in forged]})
    assert refused.status_code == 422
    assert [e["loc"] for e in refused.json()["detail"]] == \
        [["body", "labels", i, "record_id"] for i in range(1, 5)]
    assert {e["type"] for e in refused.json()["detail"]} == {"unknown_record"}

    # Another worker or replica on the same state database (here: a second app) knows the ids:
    # the key lives in the database, not in the process.
    with TestClient(create_app(project), base_url="http://testserver") as other:
        assert other.post("/v1/feedback", json={"labels": [label]}).status_code == 200
    with make_engine(project.state_url).connect() as conn:
        rows = conn.execute(sa.text("SELECT record_id, label FROM feedback WHERE record_id IN "
                                    "(:a, :b)"), {"a": rid, "b": "from-last-year-0"}).all()
    assert rows == [(rid, 1)]


def test_feedback_on_a_locked_state_database_gets_a_quick_503_with_retry_after(client, project, records):
    import sqlite3

    rid = client.post("/v1/predict", json=records[0]).json()["predictions"][0]["record_id"]
    locker = sqlite3.connect(project.state_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the file
    try:
        started = time.monotonic()
        r = client.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 1}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert r.json()["detail"].startswith("the state database is unavailable")
        assert time.monotonic() - started < 10  # not the 30 s of the engine's busy timeout
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert client.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 1}]}).status_code == 200


def test_the_shipped_client_waits_out_a_locked_state_database_as_retry_after_asks(client, project,
                                                                                   records):
    """What the replay and the examples send labels with: a 503 is retried after Retry-After, and
    the labels are stored once the lock is gone (the replay used to raise at the first 503)."""
    import sqlite3

    from flywheel.serving.http.client import post_with_retry

    rid = client.post("/v1/predict", json=records[0]).json()["predictions"][0]["record_id"]
    locker = sqlite3.connect(project.state_url.removeprefix("sqlite:///"), isolation_level=None,
                             check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(3.0, lambda: (locker.execute("ROLLBACK"), locker.close()))
    release.start()
    waits: list[float] = []
    try:
        started = time.monotonic()
        r = post_with_retry(client, "/v1/feedback", json={"labels": [{"record_id": rid, "label": 1}]},
                            budget=30, sleep=lambda s: (waits.append(s), time.sleep(s)))
    finally:
        release.join()
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert waits and waits[0] == 5.0  # the server's Retry-After, not a guess
    assert time.monotonic() - started >= 3.0
    # With no budget left the 503 goes back to the caller, who decides.
    locker = sqlite3.connect(project.state_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        r = post_with_retry(client, "/v1/feedback", json={"labels": [{"record_id": rid, "label": 1}]},
                            budget=0)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert r.status_code == 503


def test_labels_for_rows_scored_elsewhere_need_the_config_switch(project, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_SERVING__ACCEPT_UNSIGNED_FEEDBACK", "true")
    lenient = load_project(project.path, env={**os.environ, "FLYWHEEL_HOME": str(project.home)})
    with TestClient(create_app(lenient), base_url="http://testserver") as other:
        late = other.post("/v1/feedback", json={"labels": [{"record_id": "scored-in-batch-7", "label": 0}]})
    assert late.status_code == 200 and late.json()["accepted"] == 1


def test_metrics_count_requests_by_endpoint_status_and_version(client, records):
    client.post("/v1/predict", json={"nope": 1})
    client.post("/v1/predict", json=records[0])
    text = client.get("/metrics").text
    assert 'flywheel_requests_total{endpoint="predict",model_version="1",status="200"}' in text
    assert 'flywheel_requests_total{endpoint="predict",model_version="1",status="422"}' in text
    assert "flywheel_request_latency_seconds_bucket" in text
    assert "flywheel_prediction_log_queue_depth" in text
    assert "flywheel_prediction_log_dropped_total 0.0" in text
    assert "flywheel_prediction_log_degraded 0.0" in text


def test_flywheel_serve_enforces_the_configured_header_cap_and_counts_the_closed_connection(server):
    """`serving.connections` reaches the workers' protocol (the limits: test_protocol.py)."""
    r = httpx.get(f"{server.url}/health", headers={"x-pad": "a" * 40_000})  # default cap: 32 KiB
    assert r.status_code == 431 and "header_too_large" in r.text
    assert httpx.get(f"{server.url}/health", headers={"x-pad": "a" * 20_000}).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'flywheel_http_connections_closed_total{reason="header_too_large"} 1.0' in metrics


def test_hot_swap_under_concurrent_load_fails_no_request(server, project, records):
    """Promote v2, then roll back to v1, while 8 clients send requests: every one succeeds."""
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[int] = set()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as c:
            while not stop.is_set():
                r = c.post("/v1/predict", json=records[0])
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        versions.add(r.json()["version"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        promote(project, 2, reason="test hot swap")
        _wait_for(lambda: 2 in versions)
        rollback(project)
        _wait_for(lambda: httpx.get(f"{server.url}/ready").json()["version"] == 1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 200
    assert set(statuses) == {200}
    assert versions == {1, 2}
    swaps = httpx.get(f"{server.url}/metrics").text
    assert "flywheel_model_swaps_total 2.0" in swaps


def count_predictions(url: str) -> int:
    with make_engine(url).connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM predictions")).scalar())


def _wait_for(cond, timeout: float = 20) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_sigterm_flushes_every_prediction_to_the_log(project, records):
    srv = ServerProcess(project)
    before = count_predictions(project.state_url)
    sent = 0
    with httpx.Client(base_url=srv.url) as c:
        for i in range(300):
            batch = records[: 1 + i % 5]
            assert c.post("/v1/predict", json=batch).status_code == 200
            sent += len(batch)
    # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught: -15 is a clean stop
    assert srv.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    after = count_predictions(project.state_url)
    with make_engine(project.state_url).connect() as conn:
        last = read_log(conn, project.config.registered_model, last=1)
    assert after - before == sent
    assert last.base["model_version"].tolist() == [1] and last.inputs["state"][0] == records[0]["state"]
    log = srv.log_path.read_text().splitlines()
    events = [json.loads(line).get("event") for line in log if line.startswith("{")]
    assert "worker_stopped" in events and "log_sink_stopped" in events


@pytest.mark.postgres
def test_two_workers_with_postgresql_state_aggregate_metrics_and_log_everything(project, records,
                                                                               postgres_url):
    import yaml

    cfg = yaml.safe_load(project.path.read_text())
    cfg["stores"] = {"source": project.source_url, "tracking": project.tracking_url, "state": postgres_url}
    pg_path = project.path.parent / "flywheel-pg.yaml"
    pg_path.write_text(yaml.safe_dump(cfg))
    pg_project = load_project(pg_path, env={"FLYWHEEL_HOME": str(project.home)})
    srv = ServerProcess(pg_project, workers=2)
    sent = 0
    pids = set()
    try:
        def client(n: int) -> None:
            nonlocal sent
            with httpx.Client(base_url=srv.url) as c:
                for _ in range(n):
                    assert c.post("/v1/predict", json=records[:2]).status_code == 200
        threads = [threading.Thread(target=client, args=(100,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent = 4 * 100 * 2
        text = httpx.get(f"{srv.url}/metrics").text
        ok_line = 'flywheel_requests_total{endpoint="predict",model_version="1",status="200"}'
        total = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(ok_line))
        assert total == 400  # summed over both workers, whichever answered the scrape
        assert httpx.post(f"{srv.url}/admin/reload").status_code == 403  # no token configured
    finally:
        assert srv.stop() in (0, -signal.SIGTERM)
    for line in srv.log_path.read_text().splitlines():
        if '"worker_started"' in line:
            pids.add(json.loads(line)["pid"])
    assert len(pids) == 2
    assert count_predictions(postgres_url) == sent


def test_flywheel_predict_scores_a_file_and_a_source_table_like_the_server(server, project, records,
                                                                          sba_sample, tmp_path,
                                                                          monkeypatch):
    import pandas as pd
    from typer.testing import CliRunner

    from flywheel.cli import app

    monkeypatch.setenv("FLYWHEEL_HOME", str(project.home))
    file = tmp_path / "batch.parquet"
    sba_sample.head(len(records)).to_parquet(file)
    runner = CliRunner()
    res = runner.invoke(app, ["predict", "--config", str(project.path), "--input", str(file),
                              "--output", str(tmp_path / "scored.parquet")])
    assert res.exit_code == 0, res.output
    scored = pd.read_parquet(tmp_path / "scored.parquet")
    served = httpx.post(f"{server.url}/v1/predict", json=records).json()["predictions"]
    assert list(scored["loan_nr"]) == list(sba_sample.head(len(records))["loan_nr"])
    assert np.allclose(scored["probability"], [p["probability"] for p in served], atol=1e-6)
    assert (scored["model_version"] == 1).all()
    res = runner.invoke(app, ["predict", "--config", str(project.path), "--input", "loans",
                              "--output", str(tmp_path / "all.csv"), "--keep", "mis_status"])
    assert res.exit_code == 0, res.output
    scored_all = pd.read_csv(tmp_path / "all.csv")
    assert len(scored_all) == len(sba_sample)
    assert list(scored_all.columns) == ["loan_nr", "approval_date", "mis_status", "probability", "decision",
                                        "model_version"]  # the label kept for an offline evaluation
    assert sorted(scored_all["mis_status"].dropna().unique()) == ["CHGOFF", "P I F"]
    res = runner.invoke(app, ["predict", "--config", str(project.path), "--input", "loans",
                              "--output", str(tmp_path / "x.csv"), "--keep", "no_such_column"])
    assert res.exit_code == 1 and "no column(s) no_such_column to keep" in " ".join(res.output.split())
    res = runner.invoke(app, ["predict", "--config", str(project.path), "--input", "no_such_table",
                              "--output", str(tmp_path / "x.csv")])
    assert res.exit_code == 1 and "neither a file nor a table" in res.output


@pytest.mark.serial  # a bound in time (one flush interval): the suite's load must not stretch it
def test_sigkill_loses_at_most_the_unflushed_buffer_and_the_sink_survives(project, records):
    srv = ServerProcess(project)
    before = count_predictions(project.state_url)
    answered = 0
    with httpx.Client(base_url=srv.url) as c:
        started = time.time()
        while time.time() - started < 2:
            assert c.post("/v1/predict", json=records[0]).status_code == 200
            answered += 1
    srv.stop(signal.SIGKILL)
    _wait_for(lambda: '"log_sink_stopped"' in srv.log_path.read_text(), timeout=30)
    stored = count_predictions(project.state_url) - before
    # one client, one request at a time: a 50 ms flush interval holds a few dozen at most
    assert stored <= answered
    assert answered - stored <= max(50, answered // 20), (answered, stored)


def test_sagemaker_invocations_take_json_instances_records_and_csv_and_answer_csv(client, records):
    rows = records[:3]
    v1 = [p["probability"] for p in client.post("/v1/predict", json=rows).json()["predictions"]]
    assert client.get("/ping").status_code == 200
    for body in ({"instances": rows}, rows, {"instances": [list(r.values()) for r in rows]}):
        if isinstance(body, dict) and isinstance(body["instances"][0], list):  # values in input order
            meta = [i["name"] for i in client.get("/v2/models/sba-loans").json()["inputs"]]
            body = {"instances": [[r[n] for n in meta] for r in rows]}
        r = client.post("/invocations", json=body)
        assert r.status_code == 200, r.text
        assert [p["probability"] for p in r.json()["predictions"]] == pytest.approx(v1)
    names = list(rows[0])
    header = ",".join(names) + "\n"
    lines = "".join(",".join("" if r[n] is None else str(r[n]) for n in names) + "\n" for r in rows)
    answer = client.post("/invocations", content=header + lines,
                         headers={"content-type": "text/csv", "accept": "text/csv"})
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv"), answer.text
    out = answer.text.splitlines()
    assert out[0] == "record_id,probability,decision" and len(out) == 4
    assert [float(line.split(",")[1]) for line in out[1:]] == pytest.approx(v1, rel=1e-6)
    short = client.post("/invocations", content="1,2\n", headers={"content-type": "text/csv"})
    assert short.status_code == 422 and short.json()["detail"][0]["type"] == "shape_mismatch"
    wrong = header + lines.splitlines()[0].replace(str(rows[0]["gr_appv"]), "lots", 1) + "\n"
    bad = client.post("/invocations", content=wrong, headers={"content-type": "text/csv"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", 0, "gr_appv"], bad.text
    xml = client.post("/invocations", content="<a/>", headers={"content-type": "application/xml"})
    assert xml.status_code == 422 and "text/csv" in xml.text


def test_vertex_routes_follow_the_aip_variables_and_answer_predictions(project, records, monkeypatch):
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/v1/endpoints/e1/deployedModels/m1:predict")
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/vertex-health")
    switch = sys.getswitchinterval()
    try:
        with TestClient(create_app(project)) as vertex:
            assert vertex.get("/vertex-health").status_code == 200
            r = vertex.post("/v1/endpoints/e1/deployedModels/m1:predict", json={"instances": records[:2]})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
            assert set(r.json()["predictions"][0]) == {"record_id", "probability", "decision"}
            bad = vertex.post("/v1/endpoints/e1/deployedModels/m1:predict", json={"instances": [[1, 2]]})
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "instances", 0]
            missing = vertex.post("/v1/endpoints/e1/deployedModels/m1:predict", json={"rows": []})
            assert missing.status_code == 422 and "instances" in missing.text
    finally:
        gc.unfreeze()
        sys.setswitchinterval(switch)


def test_open_inference_protocol_v2_health_metadata_and_versioned_inference(client, records):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "flywheel"
    assert client.get("/v2/models/sba-loans/ready").json() == {"name": "sba-loans", "ready": True}
    assert client.get("/v2/models/sba-loans/versions/1/ready").status_code == 200
    assert client.get("/v2/models/sba-loans/versions/2/ready").status_code == 404
    assert client.get("/v2/models/other/ready").status_code == 404
    inputs = [{"name": n, "shape": [1], "datatype": "BYTES" if isinstance(v, str) else "FP64", "data": [v]}
              for n, v in records[0].items() if v is not None]
    nulls = [{"name": n, "shape": [1], "datatype": "FP64", "data": [None]}
             for n, v in records[0].items() if v is None]
    ok = client.post("/v2/models/sba-loans/versions/1/infer", json={"inputs": inputs + nulls})
    assert ok.status_code == 200 and ok.json()["model_version"] == "1", ok.text
    gone = client.post("/v2/models/sba-loans/versions/7/infer", json={"inputs": inputs})
    assert gone.status_code == 404 and "version 7" in gone.text
