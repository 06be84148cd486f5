"""What a hostile or careless caller cannot do to the prediction server and the loop behind it:
label another client's predictions, displace another client's training rows, steer the holdout,
file rows under the wrong time, stall a worker, or get an uncounted 500. In-process (Starlette's
TestClient runs the app with a real registry, state database and log sink); one check runs
`flywheel serve` itself."""

import gc
import os
import subprocess
import sys
import time
from datetime import date

import pytest
import yaml
from starlette.testclient import TestClient

from flywheel.config import ConfigError
from flywheel.core.times import EventTimes
from flywheel.lifecycle.learning import feedback_rows
from flywheel.lifecycle.train import train_challenger
from flywheel.registry import Registry
from flywheel.serving.http.errors import RequestInvalid
from flywheel.serving.tabular.app import create_app
from flywheel.serving.tabular.runtime import load_version
from flywheel.serving.tabular.validation import RecordValidator
from tests.conftest import SOURCE_TYPES, example_config, load_project, write_table

pytestmark = pytest.mark.xdist_group("serving-test_trust")

CLIENTS = [{"name": "web", "token_env": "TRUST_WEB_TOKEN", "scopes": ["predict", "feedback"]},
           {"name": "partner", "token_env": "TRUST_PARTNER_TOKEN", "scopes": ["predict", "feedback"]},
           {"name": "ops", "token_env": "TRUST_OPS_TOKEN", "scopes": ["admin"]}]
TOKENS = {"TRUST_WEB_TOKEN": "web-secret", "TRUST_PARTNER_TOKEN": "partner-secret",
          "TRUST_OPS_TOKEN": "ops-secret"}


def bearer(token):
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def project(tmp_path_factory, sba_sample):
    folder = tmp_path_factory.mktemp("trust")
    cfg = example_config()
    cfg["model"]["params"] = {"num_boost_round": 30}
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES)
    assert train_challenger(project).promoted
    return project


@pytest.fixture(scope="module")
def record(project, sba_sample):
    spec = load_version(Registry.for_project(project), 1).spec
    row = sba_sample[spec.input_columns].dropna().iloc[0]
    return {c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()}


def with_clients(project):
    """The same project (registry, state database) with declared clients."""
    cfg = yaml.safe_load(project.path.read_text())
    cfg["serving"]["clients"] = CLIENTS
    path = project.path.with_name("with-clients.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return load_project(path, env={"FLYWHEEL_HOME": str(project.home)})


@pytest.fixture(scope="module")
def open_client(project):
    with TestClient(create_app(project), base_url="http://testserver") as c:
        yield c
    gc.unfreeze()


@pytest.fixture(scope="module")
def clients_client(project):
    os.environ.update(TOKENS)
    try:
        with TestClient(create_app(with_clients(project)), base_url="http://testserver") as c:
            yield c
    finally:
        for name in TOKENS:
            os.environ.pop(name, None)
        gc.unfreeze()


# ---- clients, scopes and record ids bound to the client that asked -----------------------------

def test_with_clients_declared_each_route_needs_a_token_with_its_scope(clients_client, record):
    c = clients_client
    assert c.post("/v1/predict", json=record).status_code == 401
    assert c.post("/v1/predict", json=record, headers=bearer("guess")).status_code == 401
    assert c.post("/invocations", json=record).status_code == 401
    assert c.post("/v1/feedback", json={"labels": []}).status_code == 401
    refused = c.post("/v1/predict", json=record, headers=bearer("ops-secret"))
    assert refused.status_code == 403 and "may not predict" in refused.json()["detail"]
    assert c.post("/v1/predict", json=record, headers=bearer("web-secret")).status_code == 200
    assert c.post("/admin/reload", headers=bearer("web-secret")).status_code == 403  # no admin scope
    assert c.post("/admin/reload", headers=bearer("guess")).status_code == 401
    assert c.post("/admin/reload", headers=bearer("ops-secret")).status_code == 200
    text = c.get("/metrics").text
    assert 'flywheel_requests_total{endpoint="predict",model_version="0",status="401"}' in text \
        or 'flywheel_requests_total{endpoint="predict",model_version="1",status="401"}' in text


def test_only_the_client_a_record_id_was_issued_to_may_label_it(clients_client, record):
    c = clients_client
    answer = c.post("/v1/predict", json=record, headers=bearer("web-secret"))
    rid = answer.json()["predictions"][0]["record_id"]
    stolen = c.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 1}]},
                    headers=bearer("partner-secret"))
    assert stolen.status_code == 422 and stolen.json()["detail"][0]["type"] == "unknown_record"
    mine = c.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 1}]},
                  headers=bearer("web-secret"))
    assert mine.status_code == 200


def test_a_client_token_that_is_not_set_stops_the_server_at_start(project, monkeypatch):
    monkeypatch.delenv("TRUST_WEB_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="TRUST_WEB_TOKEN"):
        create_app(with_clients(project))


def test_reusing_another_clients_entity_id_never_displaces_its_labelled_row(clients_client, project,
                                                                             record):
    c = clients_client
    meta = {"entity_id": "loan-42", "event_time": "2005-06-01"}
    rows = {}
    for who, label in (("web", 1), ("partner", 0)):
        token = bearer(f"{who}-secret")
        answer = c.post("/v1/predict", json={**record, "meta": meta}, headers=token)
        rid = answer.json()["predictions"][0]["record_id"]
        assert c.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": label}]},
                      headers=token).status_code == 200
        rows[who] = rid
    deadline = time.monotonic() + 30
    while True:
        found = feedback_rows(project, ["gr_appv"], date(2000, 1, 1), date.today())
        loan = found[found[project.config.data.id_column].astype(str) == "loan-42"]
        if len(loan) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the log sink writes the predictions a moment after the answer
    assert sorted(loan["__target__"].tolist()) == [0, 1]  # both kept: web's label still counts


# ---- times: in the project's unit, within a plausible range, never guessed ----------------------

def test_a_year_as_event_time_is_refused_where_the_time_unit_is_a_date(open_client, record):
    """2018 was read as Unix seconds (1970) and every such row filed under 1970, all answered 200."""
    r = open_client.post("/v1/predict", json={**record, "meta": {"event_time": 2018}})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "meta", "event_time"] and error["type"] == "time_error"
    assert "ISO 8601" in error["msg"]
    dated = open_client.post("/v1/predict", json={**record, "meta": {"event_time": "2018-03-01"}})
    assert dated.status_code == 200


@pytest.mark.parametrize("when", ["2999-01-01", "1066-10-14", "yesterday", "2018-02-30"])
def test_implausible_or_unreadable_event_times_are_refused_not_clamped(open_client, record, when):
    r = open_client.post("/v1/predict", json={**record, "meta": {"event_time": when}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "meta", "event_time"]


def test_a_far_future_observed_at_is_refused(open_client, record):
    rid = open_client.post("/v1/predict", json=record).json()["predictions"][0]["record_id"]
    r = open_client.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 1,
                                                           "observed_at": "9999-12-31T23:59:59"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "labels", 0, "observed_at"]


def test_a_time_at_the_edge_of_what_python_can_hold_is_a_field_error_not_a_500(open_client, record):
    """0001-01-01T00:00+00:03 is three minutes before year 1 in UTC: converting it overflowed."""
    rid = open_client.post("/v1/predict", json=record).json()["predictions"][0]["record_id"]
    r = open_client.post("/v1/feedback", json={"labels": [{"record_id": rid, "label": 1,
                                                           "observed_at": "0001-01-01T00:00:00+00:03"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "labels", 0, "observed_at"]
    r = open_client.post("/v1/predict", json={**record, "meta": {"event_time": "0001-01-01T00:00:00+01:00"}})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request"


def test_numbers_are_read_in_the_projects_time_unit(project):
    spec = load_version(Registry.for_project(project), 1).spec
    record = {name: (1.0 if kind == "number" else "x") for name, kind in spec.input_types.items()}
    years = RecordValidator(spec, 10, 100, EventTimes("year"))
    [ok] = years.records([{**record, "meta": {"event_time": 2018}}])
    assert ok["meta"]["event_time"] == "2018-01-01T00:00:00"  # what every reader of the log sees
    months = RecordValidator(spec, 10, 100, EventTimes("month"))
    assert months.records([{**record, "meta": {"event_time": 201803}}])[0]["meta"]["event_time"] \
        == "2018-03-01T00:00:00"
    with pytest.raises(RequestInvalid, match="YYYYMM"):
        months.records([{**record, "meta": {"event_time": 2018}}])


# ---- a caller cannot stall a worker or get an uncounted 500 ------------------------------------

def test_an_open_inference_shape_of_huge_dimensions_is_refused_at_once(open_client, record):
    """47,000 dimensions of 10**9 were multiplied on the event loop: 500 after 7 s, /health waited."""
    tensors = [{"name": k, "shape": [1], "datatype": "FP64" if isinstance(v, int | float) else "BYTES",
                "data": [v]} for k, v in record.items()]
    tensors[0]["shape"] = [10**9] * 47_000
    started = time.perf_counter()
    r = open_client.post("/v2/models/sba-loans/infer", json={"inputs": tensors})
    assert r.status_code == 422 and time.perf_counter() - started < 2.0
    assert r.json()["detail"][0]["loc"][-1] == "shape"


def test_a_non_ascii_record_id_is_a_field_error_not_a_500(open_client):
    r = open_client.post("/v1/feedback", json={"labels": [{"record_id": "é" * 30 + "-0", "label": 1}]})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "unknown_record"


def test_a_csv_field_over_the_csv_modules_limit_is_a_field_error(open_client):
    r = open_client.post("/invocations", content=b"a," + b"x" * 140_000 + b"\n",
                         headers={"content-type": "text/csv"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "csv_error"


def test_a_thousand_bad_csv_rows_get_a_capped_answer(open_client):
    r = open_client.post("/invocations", content=b"1,2\n" * 1000, headers={"content-type": "text/csv"})
    detail = r.json()["detail"]
    assert r.status_code == 422 and len(detail) == 51 and detail[-1]["msg"] == "950 more errors not shown"


def test_every_unexpected_exception_is_one_counted_json_500(open_client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("flywheel.serving.tabular.app.monitoring_gauges", broken)
    r = open_client.get("/metrics")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["detail"] == "internal error; see the server log"
    assert r.headers["x-request-id"] == r.json()["request_id"]
    monkeypatch.undo()
    assert 'flywheel_requests_total{endpoint="metrics",model_version="0",status="500"} 1.0' \
        in open_client.get("/metrics").text


def test_serve_with_the_room_mounted_beyond_loopback_needs_a_viewer_token(project):
    cfg = yaml.safe_load(project.path.read_text())
    cfg["room"] = {"mount_on_serve": True}
    path = project.path.with_name("room-mounted.yaml")
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_VIEWER_TOKEN")}
    done = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--config", str(path),
                           "--host", "0.0.0.0", "--port", "1"],
                          capture_output=True, text=True, timeout=120,
                          env={**env, "FLYWHEEL_HOME": str(project.home)})
    assert done.returncode != 0
    assert "FLYWHEEL_VIEWER_TOKEN" in done.stdout + done.stderr
