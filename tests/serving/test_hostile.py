"""Hostile input against a real server on 127.0.0.1: schemathesis's generated requests (schema-valid
and schema-violating, on every operation, admin with and without its token) never get a 5xx,
and hand-written cases, one class of attack each, get the answer the Serving page of the docs promises.

- structure depth: meta 300 levels deep, a body of 100,000 nested arrays: 422;
- sizes: 2 MB streamed, a declared 1 TB (refused before reading), 21 records, a 1,001-character
  string, 1,001 meta values: 413 or 422;
- numbers: float32's max 3.4e38 is served, 3.5e38 is out_of_range, 1e999 / 10**400 / NaN: 422,
  -0.0 is served;
- encodings: invalid UTF-8, a lone surrogate, a UTF-8 BOM: 422; NUL inside a category: served
  (logged JSON-escaped);
- duplicate keys: the last value counts, as every JSON parser here reads it;
- content types: predict as text/plain is served; feedback as text or a form: 415;
- token variants: none, wrong, a prefix, an extension, Basic, in the query, another scheme,
  non-ASCII: 401; the right token with the scheme in any case: 200;
- protocol abuse: Content-Length with Transfer-Encoding, a bad chunk size, NUL in a header: 400
  and nothing smuggled; a 64 KB URL: 431; 50 pipelined requests: 50 answers.
"""

import json
import socket

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from flywheel.lifecycle.train import train_challenger
from tests.conftest import SOURCE_TYPES, ServerProcess, example_config, load_project, write_table

# One worker builds this module's shared fixture (a trained model, a server) once.
pytestmark = pytest.mark.xdist_group("serving-test_hostile")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, sba_sample):
    folder = tmp_path_factory.mktemp("fuzz")
    cfg = example_config()
    cfg["model"]["params"] = {"num_boost_round": 40}
    cfg["serving"]["max_records"] = 20  # keep generated lists small
    (folder / "flywheel.yaml").write_text(yaml.safe_dump(cfg))
    project = load_project(folder / "flywheel.yaml", env={"FLYWHEEL_HOME": str(folder / ".flywheel")})
    write_table(sba_sample, project.source_url, "loans", SOURCE_TYPES)
    assert train_challenger(project).promoted
    srv = ServerProcess(project, env={"FLYWHEEL_ADMIN_TOKEN": "fuzz-token"})
    yield srv
    srv.stop()


OPERATIONS = ["POST /v1/predict", "POST /v2/models/{name}/infer", "GET /v2/models/{name}",
              "GET /v1/models", "POST /v1/feedback", "GET /health", "GET /ready", "GET /metrics",
              "POST /admin/reload"]


# Schema-violating cases exist only where there is a body or a parameter to violate.
CASES = [(label, GenerationMode.POSITIVE, None) for label in OPERATIONS] + [
    (label, GenerationMode.NEGATIVE, None) for label in OPERATIONS[:3] + ["POST /v1/feedback"]] + [
    ("POST /admin/reload", GenerationMode.POSITIVE, "Bearer fuzz-token"),
    ("POST /admin/reload", GenerationMode.POSITIVE, "Bearer not-the-token")]


@pytest.mark.parametrize(("label", "mode", "auth"), CASES,
                         ids=[f"{m.value}-{lbl}{'-' + a.split()[1] if a else ''}" for lbl, m, a in CASES])
def test_no_generated_request_gets_a_server_error(fuzz_server, label, mode, auth):
    """250 generated cases per operation and mode (schema-valid and schema-violating requests)."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is missing from the OpenAPI document"
    seen = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def check(case):
        response = case.call(base_url=fuzz_server.url, headers={"authorization": auth} if auth else None)
        seen.append(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])

    check()
    assert seen and max(seen) < 500
    if auth == "Bearer fuzz-token":
        assert 200 in seen
    elif label == "POST /admin/reload":
        assert set(seen) == {401}


@pytest.fixture(scope="module")
def record(fuzz_server, sba_sample):
    from flywheel.registry import Registry
    from flywheel.serving.tabular.runtime import load_version

    spec = load_version(Registry.for_project(fuzz_server.project), 1).spec
    row = sba_sample[spec.input_columns].dropna().iloc[0]
    return {c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()}


def post(server, body: bytes | str, path: str = "/v1/predict", **headers: str) -> httpx.Response:
    data = body.encode() if isinstance(body, str) else body
    return httpx.post(f"{server.url}{path}", content=data,
                      headers={"content-type": "application/json", **headers}, timeout=30)


def number_field(record: dict) -> str:
    return next(k for k, v in record.items() if isinstance(v, float))


def category_field(record: dict) -> str:
    return next(k for k, v in record.items() if isinstance(v, str))


def test_structure_depth(fuzz_server, record):
    meta = {}
    for _ in range(300):
        meta = {"m": meta}
    r = post(fuzz_server, json.dumps({**record, "meta": meta}))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", "meta"]
    r = post(fuzz_server, "[" * 100_000 + "]" * 100_000)
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"


def test_sizes(fuzz_server, record):
    assert post(fuzz_server, b"[" + b"1," * 1_000_000 + b"1]").status_code == 413
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000000000000\r\n\r\n{")
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")  # refused before any body is read
    r = post(fuzz_server, json.dumps([record] * 21))
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "too_long"
    r = post(fuzz_server, json.dumps({**record, category_field(record): "x" * 1001}))
    assert r.status_code == 422
    r = post(fuzz_server, json.dumps({**record, "meta": {f"k{i}": i for i in range(1001)}}))
    assert r.status_code == 422


@pytest.mark.parametrize(("literal", "status", "kind"), [
    ("3.4e38", 200, None), ("3.5e38", 422, "out_of_range"), ("-3.5e38", 422, "out_of_range"),
    ("1e999", 422, "finite_number"), ("1" + "0" * 400, 422, None), ("NaN", 422, "finite_number"),
    ("-0.0", 200, None)])
def test_numbers(fuzz_server, record, literal, status, kind):
    field = number_field(record)
    body = json.dumps({**record, field: 0.5}).replace(f'"{field}": 0.5', f'"{field}": {literal}')
    r = post(fuzz_server, body)
    assert r.status_code == status, r.text
    if kind:
        assert r.json()["detail"][0]["type"] == kind and r.json()["detail"][0]["loc"][-1] == field


def test_encodings(fuzz_server, record):
    cat = category_field(record)
    good = json.dumps(record).encode()
    bad_utf8 = good.replace(b'"' + record[cat].encode() + b'"', b'"\xff\xfe"', 1)
    assert post(fuzz_server, bad_utf8).status_code == 422
    surrogate = json.dumps({**record, cat: "PLACEHOLDER"}).replace("PLACEHOLDER", "\\ud800")
    assert post(fuzz_server, surrogate).status_code == 422
    assert post(fuzz_server, b"\xef\xbb\xbf" + good).status_code == 422  # JSON has no BOM
    nul = post(fuzz_server, json.dumps({**record, cat: "a\u0000b"}))
    assert nul.status_code == 200  # an unseen category, served and logged (JSON-escaped)


def test_duplicate_keys_the_last_value_counts(fuzz_server, record):
    field = number_field(record)
    body = json.dumps(record)[:-1] + f', "{field}": 1e39}}'
    r = post(fuzz_server, body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field
    body = json.dumps({**record, field: 1e39})[:-1] + f', "{field}": {record[field]}}}'
    assert post(fuzz_server, body).status_code == 200


def test_content_types(fuzz_server, record):
    r = post(fuzz_server, json.dumps(record), **{"content-type": "text/plain"})
    assert r.status_code == 200
    rid = r.json()["predictions"][0]["record_id"]
    labels = json.dumps({"labels": [{"record_id": rid, "label": 1}]})
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=b"):
        assert post(fuzz_server, labels, "/v1/feedback", **{"content-type": kind}).status_code == 415
    assert post(fuzz_server, labels, "/v1/feedback").status_code == 200


@pytest.mark.parametrize("header", [
    None, "Bearer wrong", "Bearer fuzz-toke", "Bearer fuzz-tokenX", "Bearer  fuzz-token",
    "Basic ZnV6ei10b2tlbg==", "Token fuzz-token", "fuzz-token", "Bearer fuzz-t\u00f6ken", "Bearer"])
def test_token_variants_are_refused(fuzz_server, header):
    headers = {"authorization": header.encode()} if header else {}  # raw UTF-8 bytes on the wire
    r = httpx.post(f"{fuzz_server.url}/admin/reload?token=fuzz-token", headers=headers, timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_token_in_any_scheme_case_is_accepted(fuzz_server, scheme):
    r = httpx.post(f"{fuzz_server.url}/admin/reload", headers={"authorization": f"{scheme} fuzz-token"},
                   timeout=30)
    assert r.status_code == 200


def raw_exchange(server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
        return out


@pytest.mark.parametrize(("data", "status"), [
    (b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n", b"400"),
    (b"POST /v1/predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
     b"400"),
    (b"GET /health HTTP/1.1\r\nhost: x\r\nx-evil: a\x00b\r\n\r\n", b"400"),
    (b"GET /health?" + b"a" * 65_536 + b" HTTP/1.1\r\nhost: x\r\n\r\n", b"431"),
])
def test_protocol_abuse_is_refused_and_closed(fuzz_server, data, status):
    answer = raw_exchange(fuzz_server, data)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1  # no smuggled second request answered


def test_fifty_pipelined_requests_are_all_answered_in_order(fuzz_server):
    request = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    last = b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    answer = raw_exchange(fuzz_server, request * 49 + last)
    assert answer.count(b"HTTP/1.1 200 ") == 50
